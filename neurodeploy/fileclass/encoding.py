"""Correlative temporal encoding of key-value metadata.

Every key owns a group of input neurons; a key-value pair fires its group at
pseudo-random times drawn from a generator seeded by a hash of the pair, so two
files that share a pair share those spikes exactly:

- categorical keys: the value alone picks every neuron's spike time;
- ordinal keys (numbers, buckets): the extended encoding. Neuron g of the group
  has a fixed random offset o_g in [0, W); its spike time is picked by the bucket
  floor((v + o_g) / W). Two values d apart fall in the same bucket for a fraction
  max(0, 1 - d / W) of the neurons: nearby values share spikes in proportion to
  their closeness;
- set-valued keys (parent directories, name tokens): each element fires its own
  hash-chosen subset of the group; a neuron chosen by several elements fires at
  the earliest of their times; neurons no element chooses stay silent.

Hashes are BLAKE2b of the key, the value and the neuron, so the encoding is the
same in every process and on every machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

SILENT = -1  # spike step of a neuron that does not fire


@dataclass(frozen=True)
class KeySpec:
    """How one metadata key is encoded.

    kind: "categorical", "ordinal" or "set". neurons: group size. width: for
    ordinal keys, the distance W at which two values share no spikes. subset: for
    set keys, neurons each element fires. weight: its share of the file
    similarity (defaults to the group size, so similarity and spike overlap align).
    """

    name: str
    kind: str
    neurons: int
    width: float = 1.0
    subset: int = 0
    weight: float | None = None

    def __post_init__(self):
        if self.kind not in ("categorical", "ordinal", "set"):
            raise ValueError(f"key '{self.name}': unknown kind {self.kind!r}")
        if self.kind == "set" and not 0 < self.subset <= self.neurons:
            raise ValueError(f"key '{self.name}': subset must be in (0, neurons]")

    @property
    def similarity_weight(self) -> float:
        return float(self.neurons if self.weight is None else self.weight)


# The metadata keys of tools/snapshot_files.py and how each is encoded.
FILE_KEYS = (
    KeySpec("extension", "categorical", 32),
    KeySpec("size_bucket", "ordinal", 32, width=3.0),
    KeySpec("depth", "ordinal", 16, width=2.0),
    KeySpec("parents", "set", 48, subset=16),
    KeySpec("name_tokens", "set", 48, subset=12),
    KeySpec("mode", "categorical", 16),
    KeySpec("executable", "categorical", 8),
    KeySpec("owner", "categorical", 8),
    KeySpec("links", "ordinal", 8, width=2.0),
    KeySpec("age_bucket", "ordinal", 16, width=2.0),
)


def _digest(*parts) -> int:
    text = "\x00".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _uniform(*parts) -> float:
    """A hash-determined number in [0, 1)."""
    return (_digest(*parts) >> 11) / float(1 << 53)


@dataclass(frozen=True)
class Encoder:
    """Maps metadata records (dicts) to input spike steps in [0, steps)."""

    keys: tuple[KeySpec, ...] = FILE_KEYS
    steps: int = 20
    seed: int = 0
    offsets: dict = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        return sum(k.neurons for k in self.keys)

    def groups(self) -> list[slice]:
        out, start = [], 0
        for key in self.keys:
            out.append(slice(start, start + key.neurons))
            start += key.neurons
        return out

    def encode(self, records: list[dict]) -> np.ndarray:
        """Spike steps (N, size) int, SILENT for neurons that do not fire."""
        out = np.full((len(records), self.size), SILENT, dtype=np.int64)
        for key, group in zip(self.keys, self.groups(), strict=True):
            for i, record in enumerate(records):
                out[i, group] = self._group(key, record.get(key.name))
        return out

    def _group(self, key: KeySpec, value) -> np.ndarray:
        if key.kind == "set":
            items = tuple(sorted(set(value or ())))
            return _set_times(self.seed, key, items, self.steps)
        if key.kind == "ordinal":
            return _ordinal_times(self.seed, key, float(value), self.steps)
        return _categorical_times(self.seed, key, _canonical(value), self.steps)


def _canonical(value) -> str:
    return repr(value)


@lru_cache(maxsize=65536)
def _categorical_times(seed: int, key: KeySpec, value: str, steps: int) -> np.ndarray:
    rng = np.random.default_rng(_digest(seed, key.name, value))
    return rng.integers(0, steps, key.neurons)


@lru_cache(maxsize=65536)
def _ordinal_times(seed: int, key: KeySpec, value: float, steps: int) -> np.ndarray:
    times = np.empty(key.neurons, dtype=np.int64)
    for g in range(key.neurons):
        offset = _uniform(seed, key.name, "offset", g) * key.width
        bucket = int(np.floor((value + offset) / key.width))
        times[g] = _digest(seed, key.name, g, bucket) % steps
    return times


@lru_cache(maxsize=65536)
def _set_times(seed: int, key: KeySpec, items: tuple, steps: int) -> np.ndarray:
    times = np.full(key.neurons, SILENT, dtype=np.int64)
    for item in items:
        rng = np.random.default_rng(_digest(seed, key.name, item))
        chosen = rng.choice(key.neurons, key.subset, replace=False)
        item_times = rng.integers(0, steps, key.subset)
        current = times[chosen]
        times[chosen] = np.where((current == SILENT) | (item_times < current), item_times, current)
    return times


def similarity(a: dict, b: dict, keys: tuple[KeySpec, ...] = FILE_KEYS) -> float:
    """Weighted fraction of matching key-value pairs of two records, in [0, 1].

    Categorical keys match or not; ordinal keys match by max(0, 1 - |a - b| / W);
    set keys by their Jaccard index (1 for two empty sets)."""
    total = weight = 0.0
    for key in keys:
        va, vb = a.get(key.name), b.get(key.name)
        if key.kind == "categorical":
            match = float(_canonical(va) == _canonical(vb))
        elif key.kind == "ordinal":
            match = max(0.0, 1.0 - abs(float(va) - float(vb)) / key.width)
        else:
            sa, sb = set(va or ()), set(vb or ())
            match = 1.0 if not sa and not sb else len(sa & sb) / len(sa | sb)
        total += key.similarity_weight * match
        weight += key.similarity_weight
    return total / weight


def spike_overlap(a: np.ndarray, b: np.ndarray, encoder: Encoder | None = None) -> float:
    """Input correlation of two encoded files, the counterpart of :func:`similarity`:
    per key group, the fraction of the neurons firing in either file that fire at the
    same step in both (1 when the group is silent in both), weighted like the keys."""
    encoder = encoder or Encoder()
    total = weight = 0.0
    for key, group in zip(encoder.keys, encoder.groups(), strict=True):
        ga, gb = a[group], b[group]
        either = (ga != SILENT) | (gb != SILENT)
        agree = 1.0 if not either.any() else float(np.mean(ga[either] == gb[either]))
        total += key.similarity_weight * agree
        weight += key.similarity_weight
    return total / weight


__all__ = ["Encoder", "FILE_KEYS", "KeySpec", "SILENT", "similarity", "spike_overlap"]
