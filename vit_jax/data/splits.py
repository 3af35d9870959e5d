"""Split strings for non-TFDS sources (``train``, ``train[:90%]``, ``full[100:200]``) and the
per-process sharding rule shared by all of them."""

import math
import re

import numpy as np

_SLICE = re.compile(r"^\s*([\w\-]+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def parse_split(split: str) -> tuple[str, str | None, str | None]:
    """Splits ``name[start:stop]`` into its parts (start/stop may be None or end with %)."""
    m = _SLICE.match(split)
    if not m:
        raise ValueError(
            f"bad split {split!r}: expected NAME or NAME[start:stop] with ints or percents"
        )
    return m.group(1), m.group(2), m.group(3)


def _bound(value: str | None, n: int, default: int) -> int:
    if value is None:
        return default
    if value.endswith("%"):
        k = int(round(int(value[:-1]) * n / 100))
    else:
        k = int(value)
    if k < 0:
        k += n
    return min(max(k, 0), n)


def slice_indices(split: str, n: int) -> tuple[str, np.ndarray]:
    """Returns (base name, indices into the base split's n examples) for a split string."""
    name, start, stop = parse_split(split)
    return name, np.arange(_bound(start, n, 0), _bound(stop, n, n))


def shard(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's examples: every ``process_count``-th, starting at ``process_index``.

    The parts are disjoint, cover everything, and differ in size by at most one.
    """
    check_process(process_index, process_count)
    return indices[process_index::process_count]


def max_shard_size(n: int, process_count: int) -> int:
    """Size of the largest part when n examples are sharded by ``shard``."""
    return math.ceil(n / process_count)


def check_process(process_index: int, process_count: int) -> None:
    """Raises ValueError unless 0 <= process_index < process_count."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} for process_count={process_count}")


def deterministic_order(n: int, seed: int = 0) -> np.ndarray:
    """A fixed permutation of range(n): mixes classes before splits are sliced off."""
    return np.random.default_rng(seed).permutation(n)
