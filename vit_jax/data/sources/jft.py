"""JFT-like multi-label shards: TFRecord files of ``tf.train.Example`` plus JSON metadata.

Record schema (one image per record):
  ``image/encoded``  bytes       the encoded image (JPEG or PNG)
  ``image/labels``   int64 list  the image's class ids, any length (multi-label)
  ``image/id``       bytes       optional identifier

A split ``S`` in folder ``D`` is described by ``D/S.json``:
  {"split": S, "num_classes": C, "num_examples": N,
   "shards": [{"file": "S-00000-of-00004.tfrecord", "num_examples": n0}, ...],
   "class_names": [...] (optional)}
``python -m vit_jax.data.write_shards`` produces this layout. Processes read disjoint sets
of shard files when there are at least as many files as processes, otherwise every
``process_count``-th record. Splits can be sliced (``train[:1000]``); slices read records
in file order.
"""

import functools
import json
import math
import os

from vit_jax.data import splits
from vit_jax.data._tf import tf
from vit_jax.data.sources.base import DataError, Records

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/labels": tf.io.VarLenFeature(tf.int64),
}


@functools.lru_cache(maxsize=16)
def load_metadata(root: str, split: str) -> dict:
    """Reads ``root/split.json``."""
    path = os.path.join(root or "", f"{split}.json")
    if not os.path.exists(path):
        have = (
            sorted(f[:-5] for f in os.listdir(root) if f.endswith(".json"))
            if root and os.path.isdir(root)
            else []
        )
        raise DataError(
            f"no metadata {path!r} for JFT-like split {split!r} (splits found: {have}); write "
            "shards with `python -m vit_jax.data.write_shards --input ... --output DIR "
            f"--split {split}` and set data_dir to DIR"
        )
    with open(path) as f:
        return json.load(f)


def parse_record(serialized: tf.Tensor) -> dict:
    """Parses one serialized example into ``{'image': bytes, 'label': int64 [k]}``."""
    ex = tf.io.parse_single_example(serialized, FEATURES)
    return {"image": ex["image/encoded"], "label": tf.sparse.to_dense(ex["image/labels"])}


def open_split(cfg, process_index: int, process_count: int) -> Records:
    """Serialized records of ``cfg.split`` for one process; parsed after shuffling."""
    splits.check_process(process_index, process_count)
    root = cfg.data_dir or cfg.name
    name, start, stop = splits.parse_split(cfg.split)
    meta = load_metadata(root, name)
    files = [os.path.join(root, s["file"]) for s in meta["shards"]]
    sizes = [int(s["num_examples"]) for s in meta["shards"]]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise DataError(f"JFT-like shard files missing: {missing[:5]}")
    sliced = start is not None or stop is not None
    if not sliced and len(files) >= process_count:
        mine = list(range(process_index, len(files), process_count))
        counts = [sum(sizes[j::process_count]) for j in range(process_count)]
        ds = tf.data.TFRecordDataset([files[j] for j in mine])
        return Records(
            ds, parse=parse_record, num_examples=counts[process_index], max_examples=max(counts)
        )
    _, idx = splits.slice_indices(cfg.split, sum(sizes))
    ds = tf.data.TFRecordDataset(files)
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
