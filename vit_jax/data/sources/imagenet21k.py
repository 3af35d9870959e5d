"""ImageNet-21k from its per-class tars: ``root/n01440764.tar``, ... (JPEGs of one class each).

Class index = position of the WordNet id in sorted order. The tars are never extracted: a
one-off scan of the tar headers (cached in ``root/.vit_jax_i21k_index.npz`` when writable)
records each member's byte offset and size, and tf.data reads exactly those bytes with
``FixedLengthRecordDataset`` (pure tf.data, runs in parallel).

All examples form split ``full`` in a fixed pseudo-random order. The first
``heldout_examples`` (default 51,200) of it are held out: ``val`` is its first half, ``test``
its second half, ``heldout`` all of it, and ``train`` is the rest. Every name can be sliced
(``train[:10%]``).
"""

import dataclasses
import functools
import os
import tarfile

import numpy as np

from vit_jax.data import splits
from vit_jax.data._tf import tf
from vit_jax.data.sources.base import DataError, Records

DEFAULT_HELDOUT = 51_200
INDEX_FILE = ".vit_jax_i21k_index.npz"
_IMAGE_EXT = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class TarIndex:
    """Every member of every class tar, in the fixed ``full`` order."""

    tars: tuple[str, ...]  # Tar paths, sorted by WordNet id; position = class index.
    tar_id: np.ndarray  # Per example: which tar (= label).
    offset: np.ndarray  # Byte offset of the member's data in its tar.
    size: np.ndarray  # Member size in bytes.


def _tars(root: str) -> list[str]:
    if not root or not os.path.isdir(root):
        raise DataError(
            f"ImageNet-21k folder {root!r} does not exist; set data_dir to the folder holding "
            "the per-class tars (n01440764.tar, ...)"
        )
    tars = sorted(f for f in os.listdir(root) if f.endswith(".tar"))
    if not tars:
        raise DataError(f"no per-class .tar files found in {root!r}")
    return tars


def _scan(root: str, tars: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tar_id, offset, size = [], [], []
    for i, name in enumerate(tars):
        with tarfile.open(os.path.join(root, name), "r:") as tf_:
            for m in tf_:
                if m.isfile() and m.size > 0 and m.name.lower().endswith(_IMAGE_EXT):
                    tar_id.append(i)
                    offset.append(m.offset_data)
                    size.append(m.size)
    return (np.asarray(tar_id, np.int64), np.asarray(offset, np.int64), np.asarray(size, np.int64))


@functools.lru_cache(maxsize=4)
def load_index(root: str) -> TarIndex:
    """Scans (or loads the cached scan of) the tar headers under ``root``."""
    tars = _tars(root)
    cache = os.path.join(root, INDEX_FILE)
    arrays = None
    if os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as z:
            if list(z["tars"]) == tars:
                arrays = (z["tar_id"], z["offset"], z["size"])
    if arrays is None:
        arrays = _scan(root, tars)
        try:
            np.savez(
                cache, tars=np.asarray(tars), tar_id=arrays[0], offset=arrays[1], size=arrays[2]
            )
        except OSError:
            pass  # Read-only dataset folder: rescan next time.
    order = splits.deterministic_order(len(arrays[0]))
    return TarIndex(tuple(os.path.join(root, t) for t in tars), *(a[order] for a in arrays))


def _split_indices(cfg, n: int) -> np.ndarray:
    heldout = DEFAULT_HELDOUT if cfg.heldout_examples is None else int(cfg.heldout_examples)
    heldout = min(heldout, n)
    name, _, _ = splits.parse_split(cfg.split)
    ranges = {
        "full": (0, n),
        "train": (heldout, n),
        "heldout": (0, heldout),
        "val": (0, heldout // 2),
        "validation": (0, heldout // 2),
        "test": (heldout // 2, heldout),
    }
    if name not in ranges:
        raise DataError(f"ImageNet-21k splits are {sorted(ranges)} (sliceable), not {name!r}")
    start, stop = ranges[name]
    _, idx = splits.slice_indices(cfg.split, stop - start)
    return idx + start


def _reader(tars: tuple[str, ...]):
    """(index, record) dataset -> (index, features with the member's bytes), order kept."""
    paths = tf.constant(list(tars))
    file_sizes = tf.constant([os.path.getsize(t) for t in tars], tf.int64)

    def one(i, rec):
        tar = tf.gather(paths, rec["label"])
        tail = tf.gather(file_sizes, rec["label"]) - rec["offset"] - rec["size"]
        body = tf.data.FixedLengthRecordDataset(
            tar, rec["size"], header_bytes=rec["offset"], footer_bytes=tail
        )
        return body.map(lambda b: (i, {"image": b, "label": rec["label"]}))

    def read(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.interleave(
            one,
            cycle_length=16,
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    return read


def open_split(cfg, process_index: int, process_count: int) -> Records:
    """Records (tar, offset, size, label) of ``cfg.split`` for one process."""
    root = cfg.data_dir or cfg.name
    index = load_index(root)
    idx = _split_indices(cfg, len(index.offset))
    total = len(idx)
    idx = splits.shard(idx, process_index, process_count)
    ds = tf.data.Dataset.from_tensor_slices(
        {"label": index.tar_id[idx], "offset": index.offset[idx], "size": index.size[idx]}
    )
    return Records(
        ds,
        prepare=_reader(index.tars),
        num_examples=len(idx),
        max_examples=splits.max_shard_size(total, process_count),
    )


def num_examples(cfg) -> int:
    """Examples in ``cfg.split`` (all processes)."""
    return len(_split_indices(cfg, len(load_index(cfg.data_dir or cfg.name).offset)))


def num_classes(cfg) -> int:
    """Number of class tars."""
    return len(_tars(cfg.data_dir or cfg.name))
