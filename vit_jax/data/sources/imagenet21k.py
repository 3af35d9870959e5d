"""ImageNet-21k from its per-class tars: ``root/n01440764.tar``, ... (JPEGs of one class each).

Class index = position of the WordNet id in sorted order. The tars are never extracted: a
one-off scan of the tar headers (cached in ``root/.vit_jax_i21k_index.npz`` when writable,
replaced atomically) records each member's byte offset and size, and tf.data reads exactly
those bytes with ``FixedLengthRecordDataset`` (pure tf.data, runs in parallel). ``root`` may
be a local folder or a ``gs://`` URL: the listing, the header scan and the cache go through
``vit_jax.storage``; the member bytes are read by TensorFlow's own file system.

All examples form split ``full`` in a fixed pseudo-random order. The first
``heldout_examples`` (default 51,200) of it are held out: ``val`` is its first half, ``test``
its second half, ``heldout`` all of it, and ``train`` is the rest. Every name can be sliced
(``train[:10%]``).
"""

import dataclasses
import functools
import io
import logging
import tarfile
import zipfile

import numpy as np

from vit_jax import storage
from vit_jax.data import splits
from vit_jax.data._tf import plain, tf
from vit_jax.data.sources.base import DataError, Records

DEFAULT_HELDOUT = 51_200
INDEX_FILE = ".vit_jax_i21k_index.npz"
INDEX_VERSION = 2  # Bumped when the cached index's layout changes.
_IMAGE_EXT = (".jpg", ".jpeg", ".png")
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TarIndex:
    """Every member of every class tar, in the fixed ``full`` order."""

    tars: tuple[str, ...]  # Tar paths, sorted by WordNet id; position = class index.
    tar_sizes: tuple[int, ...]  # Bytes of each tar.
    tar_id: np.ndarray  # Per example: which tar (= label).
    offset: np.ndarray  # Byte offset of the member's data in its tar.
    size: np.ndarray  # Member size in bytes.


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # tar_id, offset, size (scan order).


def _tars(root: str) -> dict[str, int]:
    """The class tars under ``root`` (name -> bytes, sorted by name), from one listing."""
    try:
        _, files = storage.list_entries(root) if root else (None, None)
    except (FileNotFoundError, NotADirectoryError):
        files = None
    if files is None:
        raise DataError(
            f"ImageNet-21k folder {root!r} does not exist; set data_dir to the folder holding "
            "the per-class tars (n01440764.tar, ...)"
        )
    tars = {name: size for name, size in files.items() if name.endswith(".tar")}
    if not tars:
        raise DataError(f"no per-class .tar files found in {root!r}")
    return tars


def _scan(root: str, tars: list[str]) -> Arrays:
    """Reads the tar headers (streamed through vit_jax.storage, member data skipped)."""
    tar_id, offset, size = [], [], []
    for i, name in enumerate(tars):
        with (
            storage.open_file(storage.join(root, name)) as f,
            tarfile.open(fileobj=f, mode="r:") as tar,
        ):
            for m in tar:
                if m.isfile() and m.size > 0 and m.name.lower().endswith(_IMAGE_EXT):
                    tar_id.append(i)
                    offset.append(m.offset_data)
                    size.append(m.size)
    return (np.asarray(tar_id, np.int64), np.asarray(offset, np.int64), np.asarray(size, np.int64))


def _encode_index(tars: dict[str, int], arrays: Arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        version=np.int64(INDEX_VERSION),
        tars=np.asarray(list(tars)),
        tar_sizes=np.asarray(list(tars.values()), np.int64),
        tar_id=arrays[0],
        offset=arrays[1],
        size=arrays[2],
    )
    return buffer.getvalue()


def _decode_index(content: bytes, tars: dict[str, int]) -> Arrays | None:
    """The arrays of a cached index of exactly ``tars`` (names and sizes); None when the
    cache describes other tars. Raises ValueError when the content is not a valid index."""
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as z:
            if "version" not in z.files or int(z["version"]) != INDEX_VERSION:
                return None  # Written by another version: rebuilt without a warning.
            if z["tars"].tolist() != list(tars) or z["tar_sizes"].tolist() != list(tars.values()):
                return None  # The tars changed since.
            arrays = tuple(np.asarray(z[k]) for k in ("tar_id", "offset", "size"))
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"not a readable index ({type(e).__name__}: {e})") from None
    tar_id, offset, size = arrays
    sizes = np.asarray(list(tars.values()), np.int64)
    if not (
        all(a.ndim == 1 and a.dtype == np.int64 and len(a) == len(tar_id) for a in arrays)
        and np.all((tar_id >= 0) & (tar_id < len(sizes)))
        and np.all((offset >= 0) & (size > 0))
        and np.all(offset + size <= sizes[np.clip(tar_id, 0, len(sizes) - 1)])
    ):
        raise ValueError("inconsistent arrays (members outside their tars)")
    return arrays


def _cached_arrays(cache: str, tars: dict[str, int]) -> Arrays | None:
    try:
        content = storage.read_bytes(cache)
    except FileNotFoundError:
        return None
    try:
        return _decode_index(content, tars)
    except ValueError as e:
        _log.warning("ImageNet-21k index cache %s is broken (%s); rebuilding it", cache, e)
        return None


@functools.lru_cache(maxsize=4)
def load_index(root: str) -> TarIndex:
    """Scans (or loads the cached scan of) the tar headers under ``root``.

    The cache ``root/INDEX_FILE`` is replaced atomically (``storage.write_bytes``): processes
    building it at once each write a complete, identical index and readers never see half
    of one; a cache that is unreadable or does not match the tars is rebuilt.
    """
    tars = _tars(root)
    cache = storage.join(root, INDEX_FILE)
    arrays = _cached_arrays(cache, tars)
    if arrays is None:
        arrays = _scan(root, list(tars))
        try:
            storage.write_bytes(cache, _encode_index(tars, arrays))
        except OSError as e:  # Read-only dataset folder or bucket: rescan next time.
            _log.warning("cannot write the ImageNet-21k index cache %s (%s)", cache, e)
    order = splits.deterministic_order(len(arrays[0]))
    return TarIndex(
        tuple(storage.join(root, t) for t in tars),
        tuple(tars.values()),
        *(a[order] for a in arrays),
    )


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


def _reader(index: TarIndex):
    """(index, record) dataset -> (index, features with the member's bytes), order kept.

    The member bytes are read by tf.data (TensorFlow's own file system, also for gs://)."""
    paths = tf.constant(list(index.tars))
    file_sizes = tf.constant(list(index.tar_sizes), tf.int64)

    def one(i, rec):
        tar = tf.gather(paths, rec["label"])
        tail = tf.gather(file_sizes, rec["label"]) - rec["offset"] - rec["size"]
        body = tf.data.FixedLengthRecordDataset(
            tar, rec["size"], header_bytes=rec["offset"], footer_bytes=tail
        )
        return body.map(plain(lambda b: (i, {"image": b, "label": rec["label"]})))

    def read(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.interleave(
            plain(one),
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
        prepare=_reader(index),
        num_examples=len(idx),
        max_examples=splits.max_shard_size(total, process_count),
    )


def num_examples(cfg) -> int:
    """Examples in ``cfg.split`` (all processes)."""
    return len(_split_indices(cfg, len(load_index(cfg.data_dir or cfg.name).offset)))


def num_classes(cfg) -> int:
    """Number of class tars."""
    return len(_tars(cfg.data_dir or cfg.name))
