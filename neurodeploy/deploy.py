"""Deployment: a converted network mapped onto a hardware profile by a backend.

``deploy(snn, profile, backend, seed)`` builds a :class:`Deployment` once
(quantise, program, map); ``dep.run(x)`` then streams samples through it and
returns a :class:`~neurodeploy.trace.Trace`. Backends live in one table,
:data:`BACKENDS`, name -> "module:class", imported on first use; adding a
backend is one line here and a module of its own.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DeployError, UsageError
from .profile import HardwareProfile, load_profile
from .trace import Trace
from .ttfs import TTFSNetwork

BACKENDS: dict[str, str] = {
    "emulator": "neurodeploy.backends.emulator:EmulatorDeployment",
    "crossbar": "neurodeploy.backends.crossbar:CrossbarDeployment",
    "lava": "neurodeploy.backends.lava:LavaDeployment",
}


@dataclass(frozen=True)
class StageRunner:
    """How a deployment computes each stage, one at a time (the cross-check's attribution
    runs one stage on the hardware and the others exactly).

    encode(x) -> input spike times (N, *input_shape) as the hardware encodes raw x;
    spiking(stage, t_in, shortcut_in) -> (spike times, saturated, early neurons) of a hidden
    layer (as run_stages takes it);
    output(stage, t_in, shortcut_in) -> logits (N, classes). stage: a stage of the
    deployment's own network; times in its windows (time units, inf for silence), as
    :func:`neurodeploy.simulate.run_stages` passes them."""

    encode: Callable
    spiking: Callable
    output: Callable


class Deployment(ABC):
    """A network programmed onto one hardware profile (the interface every backend implements).

    hardware_kinds: the profile ``hardware`` kinds the backend runs.
    """

    backend: str = ""
    hardware_kinds: tuple[str, ...] = ()
    # True when run(x, keep=..., stream=ChunkStream(...)) hands every chunk's spike times of
    # every stage to a consumer as it runs (neurodeploy.simulate.ChunkStream): the
    # cross-check then holds one chunk of them at a time.
    streams_chunks: bool = False

    def __init__(self, snn: TTFSNetwork, profile: HardwareProfile, seed: int = 0):
        if profile.hardware not in self.hardware_kinds:
            raise DeployError(
                f"profile '{profile.name}' describes {profile.hardware} hardware; the "
                f"{self.backend} backend runs {' or '.join(self.hardware_kinds)} profiles"
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
        self.snn = snn
        self.profile = profile
        self.seed = int(seed)

    @abstractmethod
    def run(self, x, *, keep=None) -> Trace:
        """Run raw inputs x (N, *input_shape); return a Trace with latency_s and energy_j.

        keep: names of the stages whose spike times the trace holds (as
        :func:`~neurodeploy.simulate.simulate`'s: "input", hidden layers, pools; None,
        the default: every stage; ``()``: none; an unknown name is a UsageError). The
        output, latency_s, energy_j, the spike counts of every stage
        (``Trace.spikes_per_layer``) and the saturated, early and overflow counts are
        those of a full run. What needs a dropped stage's spike times (metrics, the
        cross-check) refuses the trace with a UsageError naming it. How much memory
        keep saves is the backend's to say (the emulator and the crossbar hold one
        chunk of the stages not kept)."""

    def stage_runner(self) -> StageRunner | None:
        """The stage functions of this deployment (see :class:`StageRunner`), or None when
        the backend cannot compute a stage on its own (the cross-check then models it)."""
        return None

    def energy_breakdown(self, trace: Trace) -> dict | None:
        """The mean energy per inference of ``trace`` (a run of this deployment) by kind of
        operation: {"energy_j": {part: J}, "counts": {part: operations}, "per_operation_j":
        {part: J}, "figures_from": citation}; None when the backend prices no operations
        apart."""
        return None

    @abstractmethod
    def summary(self) -> dict:
        """The mapping: per layer resources, weight format, window steps; latency and energy."""

    @abstractmethod
    def quantization_terms(self) -> dict[str, tuple]:
        """What quantisation alone can do to each stage, for the cross-check.

        stage name -> (own, weight_error, input_error): ``own`` the largest |value
        error| (time units; scalar or per neuron) the stage's own rounding adds
        (spike steps, threshold, ramp, ADC, bias); ``weight_error`` |W_hw - W| in the
        shape of the stage's dense/conv weight, or None; ``input_error`` the largest
        error the stage adds to each nonzero input of its dense/conv map, after any
        average pooling and flattening in front of it (e.g. a DAC's half level).
        "input" -> (rounding of the encoded input, None, 0). Pools are exact. A join
        layer's i-th shortcut group has its own entry under
        :func:`shortcut_term_key` (stage, i) ("stage/shortcut<i>"), in the same
        form: weight_error in the shape of the shortcut's dense/conv weight, input_error
        per nonzero source value; the cross-check adds it on the source's values."""


def shortcut_term_key(stage: str, index: int) -> str:
    """Key of a stage's ``index``-th shortcut in :meth:`Deployment.quantization_terms`."""
    return f"{stage}/shortcut{index}"


def backend_class(name: str) -> type[Deployment]:
    if name not in BACKENDS:
        raise UsageError(f"backend: unknown {name!r}; choose one of {', '.join(BACKENDS)}")
    module_name, _, class_name = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def deploy(
    snn: TTFSNetwork,
    profile: HardwareProfile | str | Path,
    backend: str = "emulator",
    seed: int = 0,
    **options,
) -> Deployment:
    """Map ``snn`` onto ``profile`` (a HardwareProfile, shipped name or YAML path).

    options go to the backend (e.g. lava: ``tag="floating_pt"``, ``batch=256``).
    """
    if not isinstance(profile, HardwareProfile):
        profile = load_profile(profile)
    return backend_class(backend)(snn, profile, seed=seed, **options)
