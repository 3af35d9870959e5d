"""scikit-learn's bundled 8x8 digits as a real, offline dataset with fixed splits.

1,797 images of 10 classes. ``test`` holds the 5th, 10th, ... example of each class (in file
order), 355 images; ``train`` holds the other 1,442. Pixels (0..16) are scaled to uint8 0..255 and
shaped 8x8x1 so the usual pp strings (``decode(3)|resize(...)``) apply.
"""

import functools
import importlib.util
import os

import numpy as np

from vit_jax.data import splits
from vit_jax.data._tf import tf
from vit_jax.data.sources.base import DataError, Records

NUM_CLASSES = 10


def _read_file() -> tuple[np.ndarray, np.ndarray]:
    """(pixels 0..16 [1797, 64], labels [1797]) from scikit-learn's `digits.csv.gz`, the file
    its `load_digits()` reads, found without importing scikit-learn (seconds per process)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits dataset comes with scikit-learn: pip install scikit-learn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1]


@functools.lru_cache(maxsize=1)
def load_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8 images [N, 8, 8, 1], int64 labels [N]) of split ``train`` or ``test``."""
    pixels, target = _read_file()
    images = np.round(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = target.astype(np.int64)
    is_test = np.zeros(len(labels), bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        is_test[idx[4::5]] = True
    if name == "train":
        keep = ~is_test
    elif name == "test":
        keep = is_test
    else:
        raise DataError(f"digits has splits 'train' and 'test' (sliceable), not {name!r}")
    return images[keep], labels[keep]


def _select(split: str) -> tuple[np.ndarray, np.ndarray]:
    name, _, _ = splits.parse_split(split)
    images, labels = load_split(name)
    _, idx = splits.slice_indices(split, len(labels))
    return images[idx], labels[idx]


def open_split(cfg, process_index: int, process_count: int) -> Records:
    """Records of ``cfg.split`` for one process: the pixels themselves (all in memory)."""
    images, labels = _select(cfg.split)
    total = len(labels)
    idx = splits.shard(np.arange(total), process_index, process_count)
    ds = tf.data.Dataset.from_tensor_slices({"image": images[idx], "label": labels[idx]})
    return Records(
        ds, num_examples=len(idx), max_examples=splits.max_shard_size(total, process_count)
    )


def num_examples(cfg) -> int:
    """Examples in ``cfg.split`` (all processes)."""
    return len(_select(cfg.split)[1])


def num_classes(cfg) -> int:
    """Always 10."""
    del cfg
    return NUM_CLASSES
