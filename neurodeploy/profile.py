"""Hardware profiles: typed, validated, frozen dataclasses loaded from YAML.

A profile describes one kind of hardware (``hardware:``):

- ``ideal``: continuous time, float weights, no noise; every backend accepts it
  and reproduces the reference simulator;
- ``digital``: a Loihi-style core (discrete time steps, fixed-point weights
  and membrane, core limits); run by the emulator and Lava backends;
- ``crossbar``: an analog memristive crossbar (conductance pairs, noise,
  drift, faults, converters); run by the crossbar backend.

Each section is a dataclass; a section or key that does not apply to the
profile's hardware is refused, never ignored. ``extends: NAME`` starts from
another profile and overrides the keys given. Errors are
:class:`ProfileError` naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ProfileError
from .yamlio import read_yaml

# Package data: the shipped profiles, loadable by name ("pcm").
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
HARDWARE_KINDS = ("ideal", "digital", "crossbar")


class _Origins(dict):
    """Dotted key -> the file (or override origin) that set it, plus how late it was set:
    a profile's own file outranks the ones it extends, and overrides outrank both."""

    def __init__(self):
        super().__init__()
        self.depth: dict[str, int] = {}

    def mark(self, dotted: str, origin: str, depth: int) -> None:
        self[dotted] = origin
        self.depth[dotted] = depth

    def newest(self, *keys: str) -> str:
        """Of keys, the one set last (the first key when none was set)."""
        return max(keys, key=lambda k: self.depth.get(k, -(10**9)))

    def newest_under(self, prefix: str) -> str:
        """The latest-set dotted key inside a section (the section itself if none)."""
        inside = [k for k in self if k.startswith(prefix + ".")]
        return max(inside, key=lambda k: self.depth[k]) if inside else prefix


def _spec(
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_min: bool = False,
    choices: tuple[str, ...] | None = None,
    kinds: tuple[str, ...] = HARDWARE_KINDS,
):
    """Field metadata: a one-line meaning with unit, its range, and the hardware it applies to."""
    return {
        "doc": doc,
        "min": minimum,
        "max": maximum,
        "exclusive_min": exclusive_min,
        "choices": choices,
        "kinds": kinds,
    }


DIGITAL = ("digital",)
CROSSBAR = ("crossbar",)
DISCRETE = ("digital", "crossbar")

# Sanity bounds on sizes and counts: they keep a typo (1e11) from hanging or
# exhausting memory before anything runs. Each lies far above real hardware:
# - 2^16 steps per window: a window resolution of 16 bits, twice Loihi 2's
#   graded-spike payload of 8 bits (Intel, "Loihi 2 brief", 2021); the
#   simulators' work grows linearly with it.
MAX_STEPS_PER_WINDOW = 2**16
# - 2^16 conductance levels: 16 bits per device, far beyond what analog PCM
#   or RRAM cells are programmed to.
MAX_LEVELS = 2**16
# - 2^16 rows or columns per tile: the IBM HERMES chip's crossbars are
#   256 x 256 (Le Gallo et al., "A 64-core mixed-signal in-memory compute chip
#   based on phase-change memory", Nature Electronics 2023).
MAX_TILE_SIDE = 2**16
# - 2^32 neurons, synapses or cores: beyond any chip's address space (Loihi 2:
#   8192 neurons and 128 cores per chip).
MAX_CORE_COUNT = 2**32


@dataclass(frozen=True)
class Timing:
    steps_per_window: int | None = field(
        default=None,
        metadata=_spec(
            "time steps per layer window; null = continuous time",
            minimum=1,
            maximum=MAX_STEPS_PER_WINDOW,
            kinds=DISCRETE,
        ),
    )
    step_time_s: float | None = field(
        default=None,
        metadata=_spec(
            "duration of one time step (s)", minimum=0, exclusive_min=True, kinds=DISCRETE
        ),
    )
    time_unit_s: float | None = field(
        default=None,
        metadata=_spec(
            "duration of one conversion time unit in continuous time (s)",
            minimum=0,
            exclusive_min=True,
        ),
    )


@dataclass(frozen=True)
class Weights:
    bits: int | None = field(
        default=None,
        metadata=_spec(
            "weight mantissa bits, sign included; null = float weights",
            minimum=1,
            maximum=32,
            kinds=DIGITAL,
        ),
    )


@dataclass(frozen=True)
class Neuron:
    membrane_bits: int | None = field(
        default=None,
        metadata=_spec(
            "signed saturating membrane and current registers (bits); null = float",
            minimum=2,
            maximum=52,
            kinds=DIGITAL,
        ),
    )
    number_format: str = field(
        default="generic",
        metadata=_spec(
            "register formats: 'loihi2' = Lava's bit-accurate Loihi models (8-bit weight "
            "mantissas, weight exponent 0..7, 6-bit activation and threshold shifts, 16-bit "
            "dendritic sum and 24-bit current that wrap, 24-bit membrane that saturates, "
            "13-bit bias mantissa with 3-bit exponent); 'generic' = saturating registers of "
            "neuron.membrane_bits, any integer threshold and ramp",
            choices=("generic", "loihi2"),
            kinds=DIGITAL,
        ),
    )


@dataclass(frozen=True)
class Cores:
    """One core holds a slice of a layer's neurons with all their input synapses."""

    neurons_per_core: int = field(
        default=8192,
        metadata=_spec("neurons one core holds", minimum=1, maximum=MAX_CORE_COUNT, kinds=DIGITAL),
    )
    synaptic_memory_bits: int = field(
        default=937_500,
        metadata=_spec(
            "synaptic memory of one core (bits): a neuron's input synapses take its fan-in x "
            "weights.bits (32 for float weights), all on the neuron's core",
            minimum=1,
            maximum=MAX_CORE_COUNT,
            kinds=DIGITAL,
        ),
    )
    cores_per_chip: int = field(
        default=128,
        metadata=_spec("cores on one chip", minimum=1, maximum=MAX_CORE_COUNT, kinds=DIGITAL),
    )
    input_axons_per_core: int | None = field(
        default=None,
        metadata=_spec(
            "input axons of one core: the distinct presynaptic neurons whose spikes reach "
            "its neurons (Loihi 1: 4,096 distribution lists); null = not limited",
            minimum=1,
            maximum=MAX_CORE_COUNT,
            kinds=DIGITAL,
        ),
    )


@dataclass(frozen=True)
class GenericDevice:
    """A device model given by plain Gaussian statistics (used for RRAM)."""

    prog_sigma_us: float = field(
        default=0.0, metadata=_spec("programming noise sigma (uS)", minimum=0, kinds=CROSSBAR)
    )
    read_sigma_rel: float = field(
        default=0.0,
        metadata=_spec("read noise sigma per read, relative to |G|", minimum=0, kinds=CROSSBAR),
    )
    drift_nu_mean: float = field(
        default=0.0, metadata=_spec("mean drift exponent nu", minimum=0, kinds=CROSSBAR)
    )
    drift_nu_std: float = field(
        default=0.0, metadata=_spec("device-to-device sigma of nu", minimum=0, kinds=CROSSBAR)
    )


@dataclass(frozen=True)
class Crossbar:
    device_model: str = field(
        default="pcm",
        metadata=_spec(
            "noise model: pcm (aihwkit PCMLikeNoiseModel) or generic",
            choices=("pcm", "generic"),
            kinds=CROSSBAR,
        ),
    )
    g_min_us: float = field(
        default=0.0,
        metadata=_spec("lowest programmable conductance (uS)", minimum=0, kinds=CROSSBAR),
    )
    g_max_us: float = field(
        default=25.0,
        metadata=_spec(
            "highest programmable conductance (uS)", minimum=0, exclusive_min=True, kinds=CROSSBAR
        ),
    )
    levels: int | None = field(
        default=None,
        metadata=_spec(
            "conductance levels per device; null = continuous",
            minimum=2,
            maximum=MAX_LEVELS,
            kinds=CROSSBAR,
        ),
    )
    tile_rows: int = field(
        default=256,
        metadata=_spec(
            "word lines (inputs) per tile", minimum=1, maximum=MAX_TILE_SIDE, kinds=CROSSBAR
        ),
    )
    tile_cols: int = field(
        default=256,
        metadata=_spec(
            "bit-line pairs (outputs) per tile", minimum=1, maximum=MAX_TILE_SIDE, kinds=CROSSBAR
        ),
    )
    prog_noise_scale: float = field(
        default=1.0,
        metadata=_spec(
            "multiplier of the programming noise model (0 = off)", minimum=0, kinds=CROSSBAR
        ),
    )
    read_noise_scale: float = field(
        default=1.0,
        metadata=_spec("multiplier of the read noise model (0 = off)", minimum=0, kinds=CROSSBAR),
    )
    drift_scale: float = field(
        default=1.0,
        metadata=_spec("multiplier of the drift exponents (0 = off)", minimum=0, kinds=CROSSBAR),
    )
    t_inference_s: float = field(
        default=0.0,
        metadata=_spec("time since programming at inference (s)", minimum=0, kinds=CROSSBAR),
    )
    drift_compensation: bool = field(
        default=False, metadata=_spec("global drift compensation per layer", kinds=CROSSBAR)
    )
    variability: float = field(
        default=0.0,
        metadata=_spec("device-to-device relative sigma of conductance", minimum=0, kinds=CROSSBAR),
    )
    v_read_v: float = field(
        default=0.2,
        metadata=_spec("read voltage (V)", minimum=0, exclusive_min=True, kinds=CROSSBAR),
    )
    t_read_s: float = field(
        default=250e-9,
        metadata=_spec("duration of one read (s)", minimum=0, exclusive_min=True, kinds=CROSSBAR),
    )
    generic: GenericDevice = field(default_factory=GenericDevice, metadata={"kinds": CROSSBAR})


@dataclass(frozen=True)
class Converter:
    dac_bits: int | None = field(
        default=None,
        metadata=_spec(
            "input DAC resolution (bits); null = ideal", minimum=1, maximum=32, kinds=CROSSBAR
        ),
    )
    adc_bits: int | None = field(
        default=None,
        metadata=_spec(
            "output ADC resolution (bits); null = ideal", minimum=1, maximum=32, kinds=CROSSBAR
        ),
    )
    adc_headroom: float = field(
        default=1.0,
        metadata=_spec(
            "ADC full scale as a multiple of the largest |column sum| of its tile on "
            "the calibration set",
            minimum=0,
            exclusive_min=True,
            kinds=CROSSBAR,
        ),
    )


@dataclass(frozen=True)
class Faults:
    stuck_on: float = field(
        default=0.0,
        metadata=_spec("fraction of devices stuck at g_max", minimum=0, maximum=1, kinds=CROSSBAR),
    )
    stuck_off: float = field(
        default=0.0,
        metadata=_spec("fraction of devices stuck at g_min", minimum=0, maximum=1, kinds=CROSSBAR),
    )


@dataclass(frozen=True)
class Energy:
    synop_j: float = field(
        default=0.0, metadata=_spec("energy per synaptic event (J)", minimum=0, kinds=DIGITAL)
    )
    neuron_update_j: float = field(
        default=0.0,
        metadata=_spec(
            "energy per inactive neuron update per time step (J): a neuron with no input and "
            "no integration that step",
            minimum=0,
            kinds=DIGITAL,
        ),
    )
    neuron_active_update_j: float = field(
        default=0.0,
        metadata=_spec(
            "energy per active neuron update per time step (J): integrating inputs or ramping "
            "towards its spike",
            minimum=0,
            kinds=DIGITAL,
        ),
    )
    spike_j: float = field(default=0.0, metadata=_spec("energy to route one spike (J)", minimum=0))
    figures_from: str = field(
        default="",
        metadata=_spec(
            "where the per-operation energies come from: paper, table and the chip "
            "generation it measures (shown with the energy breakdown)"
        ),
    )
    adc_conversion_j: float = field(
        default=0.0, metadata=_spec("energy per ADC conversion (J)", minimum=0, kinds=CROSSBAR)
    )
    dac_conversion_j: float = field(
        default=0.0, metadata=_spec("energy per DAC conversion (J)", minimum=0, kinds=CROSSBAR)
    )


@dataclass(frozen=True)
class Crosscheck:
    required_agreement: float = field(
        default=0.99,
        metadata=_spec(
            "fraction of predictions that must agree with the reference SNN", minimum=0, maximum=1
        ),
    )
    max_beyond_bound: float = field(
        default=0.0,
        metadata=_spec(
            "fraction of a layer's neuron outputs allowed beyond the bound quantisation explains",
            minimum=0,
            maximum=1,
        ),
    )


@dataclass(frozen=True)
class HardwareProfile:
    """A validated hardware description; see the module docstring."""

    name: str
    hardware: str
    description: str = ""
    timing: Timing = field(default_factory=Timing)
    weights: Weights = field(default_factory=Weights)
    neuron: Neuron = field(default_factory=Neuron)
    cores: Cores = field(default_factory=Cores, metadata={"kinds": DIGITAL})
    crossbar: Crossbar = field(default_factory=Crossbar, metadata={"kinds": CROSSBAR})
    converter: Converter = field(default_factory=Converter, metadata={"kinds": CROSSBAR})
    faults: Faults = field(default_factory=Faults, metadata={"kinds": CROSSBAR})
    energy: Energy = field(default_factory=Energy)
    crosscheck: Crosscheck = field(default_factory=Crosscheck)
    source: str = field(default="", compare=False)

    @property
    def discrete(self) -> bool:
        """True when time advances in steps of a layer window."""
        return self.timing.steps_per_window is not None

    def get(self, key: str) -> Any:
        """Value of a dotted key, e.g. ``profile.get("crossbar.levels")``."""
        value: Any = self
        for part in key.split("."):
            if not dataclasses.is_dataclass(value) or part not in _field_names(type(value)):
                raise ProfileError(f"{self.source or self.name}: unknown key '{key}'")
            value = getattr(value, part)
        return value

    def with_overrides(
        self, overrides: dict[str, Any], origin: str = "override"
    ) -> HardwareProfile:
        """A new profile with dotted keys replaced, validated like a file."""
        doc = to_document(self)
        files = _Origins()
        for key, value in overrides.items():
            _set_dotted(doc, key, value, origin)
            files.mark(key, origin, 1)
        return _build(doc, files, self.source or origin)

    def to_dict(self) -> dict:
        return to_document(self)


PROFILE_SECTIONS = {
    f.name: f.type
    for f in fields(HardwareProfile)
    if f.name not in ("name", "hardware", "description", "source")
}


def _field_names(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls)}


def to_document(profile: HardwareProfile) -> dict:
    """The profile as a plain nested dict (its YAML form without ``extends``), holding
    only the sections and keys that apply to its hardware."""

    def section(obj) -> dict:
        out = {}
        for f in fields(obj):
            if profile.hardware not in f.metadata.get("kinds", HARDWARE_KINDS):
                continue
            if f.name == "generic" and profile.crossbar.device_model != "generic":
                continue
            value = getattr(obj, f.name)
            out[f.name] = section(value) if dataclasses.is_dataclass(value) else value
        return out

    doc = {"name": profile.name, "hardware": profile.hardware, "description": profile.description}
    for name in PROFILE_SECTIONS:
        f = _field_names(HardwareProfile)[name]
        if profile.hardware in f.metadata.get("kinds", HARDWARE_KINDS):
            doc[name] = section(getattr(profile, name))
    return doc


def _set_dotted(doc: dict, key: str, value, origin: str) -> None:
    """Set a dotted key of the schema in a profile document, creating sections as needed
    (whether the key applies to the hardware is checked when the document is built)."""
    if key not in {row[0] for row in describe_keys()}:
        raise ProfileError(f"{origin}: unknown key '{key}'")
    parts = key.split(".")
    node = doc
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _type_name(annotation: str) -> tuple[type, bool]:
    """(base type, nullable) from a field annotation string such as 'int | None'."""
    text = str(annotation).replace(" ", "")
    nullable = text.endswith("|None")
    base = text.removesuffix("|None")
    return {"int": int, "float": float, "bool": bool, "str": str}[base], nullable


def _check_value(where: str, f: dataclasses.Field, value):
    base, nullable = _type_name(f.type)
    if value is None:
        if nullable:
            return None
        raise ProfileError(f"{where}: must not be null")
    if base is bool:
        if not isinstance(value, bool):
            raise ProfileError(f"{where}: expected true or false, got {value!r}")
        return value
    if base is str:
        if not isinstance(value, str):
            raise ProfileError(f"{where}: expected a string, got {value!r}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ProfileError(f"{where}: {value!r} is not one of {', '.join(choices)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = " (YAML reads exponents without a dot as text: write e.g. 1.0e-6)"
            except ValueError:
                pass
        raise ProfileError(f"{where}: expected a number, got {value!r}{hint}")
    if base is int:
        if isinstance(value, float) and not value.is_integer():
            raise ProfileError(f"{where}: expected an integer, got {value!r}")
        value = int(value)
    else:
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ProfileError(f"{where}: must be finite, got {value!r}")
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is not None and (value < lo or (f.metadata.get("exclusive_min") and value == lo)):
        relation = ">" if f.metadata.get("exclusive_min") else ">="
        raise ProfileError(f"{where}: must be {relation} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ProfileError(f"{where}: must be <= {hi}, got {value}")
    return value


def _build_section(cls, data, prefix: str, kind: str, files: _Origins, default_file: str):
    if not isinstance(data, dict):
        raise ProfileError(f"{files.get(prefix, default_file)}: '{prefix}' must be a mapping")
    known = _field_names(cls)
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}"
        where = f"{files.get(dotted, default_file)}: '{dotted}'"
        if key not in known:
            raise ProfileError(f"{where}: unknown key; known: {', '.join(known)}")
        f = known[key]
        kinds = f.metadata.get("kinds", HARDWARE_KINDS)
        if kind not in kinds:
            raise ProfileError(
                f"{where}: does not apply to {kind} hardware (only to {', '.join(kinds)})"
            )
        if dataclasses.is_dataclass(
            f.default_factory if f.default_factory is not dataclasses.MISSING else None
        ):
            values[key] = _build_section(
                f.default_factory, value, dotted, kind, files, default_file
            )
        else:
            values[key] = _check_value(where, f, value)
    return cls(**values)


def _build(doc: dict, files: _Origins, default_file: str) -> HardwareProfile:
    """Validate a merged profile document; ``files`` maps dotted keys to the file that set them."""
    for key in ("name", "hardware"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise ProfileError(
                f"{files.get(key, default_file)}: '{key}' must be a non-empty string"
            )
    kind = doc["hardware"]
    if kind not in HARDWARE_KINDS:
        raise ProfileError(
            f"{files.get('hardware', default_file)}: 'hardware': {kind!r} is not one of "
            f"{', '.join(HARDWARE_KINDS)}"
        )
    top = {"name", "hardware", "description", *PROFILE_SECTIONS}
    for key in doc:
        if key not in top:
            known = ", ".join(sorted(top))
            where = files.get(key, default_file)
            raise ProfileError(f"{where}: '{key}': unknown key; known: {known}")
    _drop_stale_generic(doc, files, default_file)
    sections = {}
    for name, f in _field_names(HardwareProfile).items():
        if name not in PROFILE_SECTIONS or name not in doc:
            continue
        kinds = f.metadata.get("kinds", HARDWARE_KINDS)
        section_cls = f.default_factory
        if kind not in kinds:
            key = files.newest_under(name)
            raise ProfileError(
                f"{files.get(key, default_file)}: '{key}': does not apply to {kind} hardware"
            )
        sections[name] = _build_section(section_cls, doc[name], name, kind, files, default_file)
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise ProfileError(f"{default_file}: 'description' must be a string")
    profile = HardwareProfile(
        name=doc["name"], hardware=kind, description=description, source=default_file, **sections
    )
    _check_consistency(profile, files, default_file)
    return profile


def _check_consistency(p: HardwareProfile, files: _Origins, default_file: str) -> None:
    def fail(key: str, message: str):
        raise ProfileError(f"{files.get(key, default_file)}: '{key}': {message}")

    if p.hardware == "ideal":
        if p.timing.steps_per_window is not None:
            fail("timing.steps_per_window", "ideal hardware runs in continuous time")
    if p.hardware == "digital":
        if p.timing.steps_per_window is None:
            fail("timing.steps_per_window", "digital hardware needs a number of steps")
        if p.timing.time_unit_s is not None:
            fail("timing.time_unit_s", "digital hardware is timed by timing.step_time_s")
        if p.neuron.membrane_bits is not None and p.weights.bits is None:
            fail(
                files.newest("neuron.membrane_bits", "weights.bits"),
                "an integer membrane needs integer weights (set weights.bits)",
            )
        if p.neuron.number_format == "loihi2":
            if p.neuron.membrane_bits != 24:
                fail(
                    files.newest("neuron.membrane_bits", "neuron.number_format"),
                    "neuron.number_format 'loihi2' has 24-bit current and membrane registers "
                    f"(got {p.neuron.membrane_bits}); set neuron.number_format: generic to "
                    "explore other widths",
                )
            if p.weights.bits is None or p.weights.bits > 8:
                fail(
                    files.newest("weights.bits", "neuron.number_format"),
                    "neuron.number_format 'loihi2' holds weights as at most 8-bit mantissas "
                    f"(got {p.weights.bits}); set neuron.number_format: generic for wider ones",
                )
    if p.discrete and p.timing.step_time_s is None:
        fail("timing.step_time_s", "required with timing.steps_per_window")
    if not p.discrete and p.timing.step_time_s is not None:
        fail("timing.step_time_s", "applies only with timing.steps_per_window")
    if p.hardware == "crossbar":
        cb = p.crossbar
        if cb.g_min_us >= cb.g_max_us:
            if files.newest("crossbar.g_min_us", "crossbar.g_max_us") == "crossbar.g_max_us":
                fail("crossbar.g_max_us", f"must be above crossbar.g_min_us ({cb.g_min_us})")
            fail("crossbar.g_min_us", f"must be below crossbar.g_max_us ({cb.g_max_us})")
        if p.faults.stuck_on + p.faults.stuck_off > 1:
            fail(
                files.newest("faults.stuck_off", "faults.stuck_on"),
                "faults.stuck_on + faults.stuck_off exceeds 1",
            )


def _drop_stale_generic(doc: dict, files: _Origins, default_file: str) -> None:
    """``crossbar.generic`` applies only with ``device_model: generic``. Set after (or with)
    a pcm model it is an error; inherited from a generic parent that a later file or
    override switched to pcm, it is dropped."""
    crossbar = doc.get("crossbar")
    if not isinstance(crossbar, dict) or crossbar.get("device_model", "pcm") != "pcm":
        return
    if "generic" not in crossbar:
        return
    generic_key = files.newest_under("crossbar.generic")
    model_depth = files.depth.get("crossbar.device_model", -(10**9))
    if generic_key in files and files.depth.get(generic_key, -(10**9)) >= model_depth:
        raise ProfileError(
            f"{files.get(generic_key, default_file)}: '{generic_key}': applies only with "
            "crossbar.device_model: generic"
        )
    del crossbar["generic"]


def _merge(base: dict, over: dict, files: _Origins, file: str, depth: int, prefix: str = ""):
    out = dict(base)
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            files.mark(dotted, file, depth)
            out[key] = _merge(out[key], value, files, file, depth, f"{dotted}.")
        else:
            out[key] = value
            _mark(files, dotted, value, file, depth)
    return out


def _mark(files: _Origins, dotted: str, value, file: str, depth: int) -> None:
    files.mark(dotted, file, depth)
    if isinstance(value, dict):
        for key, sub in value.items():
            _mark(files, f"{dotted}.{key}", sub, file, depth)


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """A profile file path (ends in .yaml/.yml or names a folder), or the name of a shipped
    profile (package data in neurodeploy/profiles/)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        if not path.is_file():
            raise ProfileError(f"{path}: profile file does not exist")
        return path
    shipped = PROFILE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
    raise ProfileError(f"{name_or_path}: no such profile (shipped: {', '.join(names)})")


def _read_document(path: Path, files: _Origins, chain: tuple[Path, ...]) -> dict:
    if path.resolve() in chain:
        raise ProfileError(f"{path.resolve()}: 'extends' forms a cycle")
    doc = read_yaml(path, ProfileError)
    if not isinstance(doc, dict):
        raise ProfileError(f"{path}: expected a mapping at top level")
    parent = doc.pop("extends", None)
    base: dict = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise ProfileError(f"{path}: 'extends' must be a profile name or path")
        parent_path = (path.parent / parent) if parent.endswith((".yaml", ".yml")) else parent
        try:
            parent_file = resolve_profile_path(parent_path)
        except ProfileError as exc:
            raise ProfileError(f"{path}: 'extends': {exc}") from None
        base = _read_document(parent_file, files, chain + (path.resolve(),))
        for key in ("name", "description"):  # a profile's own, never inherited
            base.pop(key, None)
            files.pop(key, None)
            files.depth.pop(key, None)
    return _merge(base, doc, files, str(path), depth=-len(chain))


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """Load and validate a hardware profile by shipped name (``"pcm"``) or file path."""
    path = resolve_profile_path(name_or_path)
    files = _Origins()
    doc = _read_document(path, files, ())
    return _build(doc, files, str(path))


def profile_from_dict(doc: dict, source: str = "<dict>") -> HardwareProfile:
    """Validate a profile document (the form of :func:`to_document`, no ``extends``)."""
    files = _Origins()
    for key in doc:
        _mark(files, key, doc[key], source, 0)
    return _build(json_copy(doc), files, source)


def json_copy(doc: dict) -> dict:
    """A deep copy of a plain nested document."""
    return {k: json_copy(v) if isinstance(v, dict) else v for k, v in doc.items()}


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, kinds, meaning) of every profile key, for documentation."""
    rows = []

    def walk(cls, prefix):
        for f in fields(cls):
            if f.name in ("name", "hardware", "description", "source"):
                continue
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
                f.default_factory
            ):
                walk(f.default_factory, f"{prefix}{f.name}.")
            else:
                rows.append(
                    (
                        f"{prefix}{f.name}",
                        ",".join(f.metadata.get("kinds", ())),
                        f.metadata.get("doc", ""),
                    )
                )

    walk(HardwareProfile, "")
    return rows
