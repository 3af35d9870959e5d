"""JFT-like multi-label shards: TFRecord files of ``tf.train.Example`` plus JSON metadata.

Record schema (one image per record):
  ``image/encoded``  bytes       the encoded image (JPEG or PNG)
  ``image/labels``   int64 list  the image's class ids, any length (multi-label)
  ``image/id``       bytes       optional identifier

A split ``S`` in folder ``D`` is described by ``D/S.json``:
  {"split": S, "num_classes": C, "num_examples": N,
   "shards": [{"file": "S-00000-of-00004.tfrecord", "num_examples": n0,
               "num_bytes": b0 (optional)}, ...],
   "class_names": [...] (optional)}
``python -m vit_jax write_shards`` produces this layout.

Training order (when every process owns at least one whole file, the usual case): process
``i`` of ``P`` owns files ``i, i + P, ...``. Each epoch visits them in a new order drawn from
(seed, epoch), ``cycle_length`` files at a time (a *round*): the round's records are
interleaved across its files in a seeded random order, then permuted within windows of
``window`` records (the shuffle buffer, capped by a byte budget from the average record
size). Every random choice is a pure function of (seed, epoch, round, window) and all file
sizes are known from the metadata, so resuming at any position opens only the current round:
earlier rounds are skipped by their record counts without being read, and only the records of
the current round before the current window are read again (at most one round, i.e.
``cycle_length`` shards, per process, wherever the position is).

Evaluation, sliced splits (``train[:1000]``) and splits with fewer files than processes read
records in file order (every ``process_count``-th record when files are fewer than processes).

The folder may be local or a ``gs://`` URL. The metadata, the folder listing and the shard
sizes go through ``vit_jax.storage``; the records themselves are read by
``tf.data.TFRecordDataset``, i.e. TensorFlow's own file system (its GCS client for ``gs://``).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable

from vit_jax import storage
from vit_jax.data import splits
from vit_jax.data._tf import plain, tf
from vit_jax.data.sources.base import DataError, Records

CYCLE_LENGTH = 4  # Files interleaved per round: the jft preset's default `cycle_length`.
SHUFFLE_BYTES = 1 << 30  # Byte budget of one shuffle window.
DEFAULT_WINDOW = 10_000  # Shuffle window when ``cfg.shuffle_buffer`` is unset.


def _features() -> dict:
    """The features of one record (a function: TensorFlow is set up when first used)."""
    return {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/labels": tf.io.VarLenFeature(tf.int64),
    }


def _records(files: tf.Tensor | list[str]) -> tf.data.Dataset:
    """The records of one or more shard files: every read of this source goes through here."""
    return tf.data.TFRecordDataset(files)


@functools.lru_cache(maxsize=16)
def load_metadata(root: str, split: str) -> dict:
    """Reads ``root/split.json`` (a local folder or a ``gs://`` URL, through vit_jax.storage)."""
    path = storage.join(root or "", f"{split}.json")
    try:
        text = storage.read_text(path)
    except (FileNotFoundError, NotADirectoryError):
        have = sorted(f[: -len(".json")] for f in _listing(root) if f.endswith(".json"))
        raise DataError(
            f"no metadata {path!r} for JFT-like split {split!r} (splits found: {have}); write "
            "shards with `python -m vit_jax write_shards --input ... --output DIR "
            f"--split {split}` and set data_dir to DIR"
        ) from None
    try:
        meta = json.loads(text)
        if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
            raise ValueError("no 'shards' list")
    except ValueError as e:
        raise DataError(
            f"metadata {path!r} is not valid JFT-like metadata ({e}); rewrite it with "
            "`python -m vit_jax write_shards`"
        ) from None
    return meta


def _listing(root: str) -> dict[str, int]:
    """The files directly in ``root`` and their sizes ({} when it is not a folder)."""
    try:
        return storage.list_entries(root)[1] if root else {}
    except (FileNotFoundError, NotADirectoryError):
        return {}


def _shard_paths(root: str, meta: dict) -> list[str]:
    """The split's shard files; raises DataError naming missing ones (one listing of
    ``root``, not one request per shard)."""
    present = _listing(root)
    files = [storage.join(root, s["file"]) for s in meta["shards"]]
    missing = [
        path
        for s, path in zip(meta["shards"], files, strict=True)
        if s["file"] not in present and not storage.exists(path)  # Names in sub-folders.
    ]
    if missing:
        raise DataError(f"JFT-like shard files missing: {missing[:5]}")
    return files


def parse_record(serialized: tf.Tensor) -> dict:
    """Parses one serialized example into ``{'image': bytes, 'label': int64 [k]}``."""
    ex = tf.io.parse_single_example(serialized, _features())
    return {"image": ex["image/encoded"], "label": tf.sparse.to_dense(ex["image/labels"])}


def _key(seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """The stateless RNG key of one epoch."""
    return tf.stack([tf.constant(seed % 2**63, tf.int64), tf.cast(epoch, tf.int64)])


def _shuffle(values: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_shuffle(values, seed=key)


def ordered_epochs(
    paths: list[str], sizes: list[int], *, cycle_length: int, window: int
) -> Callable[[int, int, int], tf.data.Dataset]:
    """``Records.epochs`` for files ``paths`` of ``sizes`` records (see module doc).

    All randomness is stateless, keyed by (seed, epoch), then folded with the round and the
    window index, so every part of an epoch can be rebuilt on its own.
    """
    k = max(1, min(cycle_length, len(paths)))
    rounds = -(-len(paths) // k)
    # A padding file index (past the end) has 0 records; its path is never read.
    sizes_t = tf.constant(list(sizes) + [0], tf.int64)
    paths_t = tf.constant(list(paths) + [paths[0]])

    def round_records(files, offset, key):
        """The records of one round from position ``offset`` in it (see module doc)."""
        counts = tf.gather(sizes_t, files)
        choices = _shuffle(tf.repeat(tf.range(k, dtype=tf.int64), counts), key)
        first = offset // window * window  # Start of the window holding ``offset``.
        skips = tf.math.bincount(choices[:first], minlength=k, maxlength=k, dtype=tf.int64)
        readers = [
            _records(paths_t[files[j]]).skip(skips[j]).take(counts[j] - skips[j]) for j in range(k)
        ]
        ds = tf.data.Dataset.choose_from_datasets(
            readers, tf.data.Dataset.from_tensor_slices(choices[first:])
        )

        def permute(w, records):
            perm = _shuffle(tf.range(tf.shape(records, out_type=tf.int64)[0]), fold(key, w))
            return tf.gather(records, perm)

        ds = ds.batch(window).enumerate(start=first // window).map(plain(permute))
        return ds.unbatch().skip(offset - first)

    def fold(key, value):
        return tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))

    def epoch_records(seed, epoch, start):
        """Rounds of ``epoch`` from record ``start`` on; earlier rounds are not opened."""
        key = _key(seed, epoch)
        order = _shuffle(tf.range(len(paths), dtype=tf.int64), key)
        order = tf.pad(order, [[0, rounds * k - len(paths)]], constant_values=len(paths))
        groups = tf.reshape(order, [rounds, k])
        totals = tf.reduce_sum(tf.gather(sizes_t, groups), axis=1)
        ends = tf.cumsum(totals)
        r0 = tf.reduce_sum(tf.cast(ends <= start, tf.int64))  # Rounds wholly before ``start``.
        offsets = tf.maximum(start - (ends - totals), 0)
        idx = tf.range(r0, rounds, dtype=tf.int64)
        plan = tf.data.Dataset.from_tensor_slices(
            (tf.gather(groups, idx), tf.gather(offsets, idx), idx)
        )
        return plan.flat_map(plain(lambda files, off, r: round_records(files, off, fold(key, r))))

    def epochs(seed: int, first_epoch: int, skip: int) -> tf.data.Dataset:
        first = epoch_records(seed, first_epoch, tf.constant(skip, tf.int64))
        rest = tf.data.Dataset.range(first_epoch + 1, 2**62).flat_map(
            plain(lambda e: epoch_records(seed, e, tf.constant(0, tf.int64)))
        )
        return first.concatenate(rest)

    return epochs


def _record_bytes(root: str, meta: dict) -> float:
    """Average bytes per record, from the metadata or the sizes of a few shard files."""
    shards = meta["shards"][:16]
    if all("num_bytes" in s for s in shards):
        nbytes = sum(int(s["num_bytes"]) for s in shards)
    else:
        present = _listing(root)
        nbytes = sum(
            present[s["file"]]
            if s["file"] in present
            else storage.size(storage.join(root, s["file"]))
            for s in shards
        )
    return nbytes / max(1, sum(int(s["num_examples"]) for s in shards))


def shuffle_window(cfg, root: str, meta: dict) -> int:
    """Records per shuffle window: ``cfg.shuffle_buffer`` capped by ``SHUFFLE_BYTES``."""
    wanted = int(cfg.shuffle_buffer or DEFAULT_WINDOW)
    return max(1, min(wanted, int(SHUFFLE_BYTES // max(1.0, _record_bytes(root, meta)))))


def open_split(cfg, process_index: int, process_count: int, *, epoch_order: bool = True) -> Records:
    """Serialized records of ``cfg.split`` for one process; parsed after shuffling.

    With ``epoch_order`` (and whole files per process) the records carry ``epochs``: the
    seeded per-epoch file order with cheap resume described in the module doc.
    """
    splits.check_process(process_index, process_count)
    root = cfg.data_dir or cfg.name
    name, start, stop = splits.parse_split(cfg.split)
    meta = load_metadata(root, name)
    files = _shard_paths(root, meta)
    sizes = [int(s["num_examples"]) for s in meta["shards"]]
    sliced = start is not None or stop is not None
    if not sliced and len(files) >= process_count:
        mine = list(range(process_index, len(files), process_count))
        counts = [sum(sizes[j::process_count]) for j in range(process_count)]
        epochs = None
        if epoch_order:
            epochs = ordered_epochs(
                [files[j] for j in mine],
                [sizes[j] for j in mine],
                cycle_length=int(cfg.get("cycle_length") or CYCLE_LENGTH),
                window=shuffle_window(cfg, root, meta),
            )
        return Records(
            _records([files[j] for j in mine]),
            parse=parse_record,
            num_examples=counts[process_index],
            max_examples=max(counts),
            epochs=epochs,
        )
    _, idx = splits.slice_indices(cfg.split, sum(sizes))
    ds = _records(files)
    if len(idx):
        ds = ds.skip(int(idx[0])).take(len(idx))
    else:
        ds = ds.take(0)
    ds = ds.shard(process_count, process_index)
    local = len(splits.shard(idx, process_index, process_count))
    return Records(
        ds, parse=parse_record, num_examples=local, max_examples=math.ceil(len(idx) / process_count)
    )


def num_examples(cfg) -> int:
    """Records in ``cfg.split`` (all processes)."""
    name, _, _ = splits.parse_split(cfg.split)
    meta = load_metadata(cfg.data_dir or cfg.name, name)
    return len(splits.slice_indices(cfg.split, int(meta["num_examples"]))[1])


def num_classes(cfg) -> int:
    """``num_classes`` from the split's metadata."""
    name, _, _ = splits.parse_split(cfg.split)
    return int(load_metadata(cfg.data_dir or cfg.name, name)["num_classes"])
