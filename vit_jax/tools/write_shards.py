"""Writes JFT-like multi-label TFRecord shards plus their JSON metadata.

    python -m vit_jax write_shards --input DIR_OR_CSV --output OUT --num_shards N \
        [--split train] [--num_classes C] [--seed 0]

Input is either a folder ``<class>/*.{jpg,jpeg,png}`` (one label per image, classes in
sorted order) or a CSV of ``path,labels`` rows with space-separated label ids
(``img/1.jpg,3 17 42``; relative paths are relative to the CSV; a header row is skipped).
Examples are shuffled with ``--seed`` before sharding so every shard mixes all classes.
The record schema and metadata layout are documented in ``vit_jax.data.sources.jft``.

Input and output may be local paths or ``gs://`` URLs; every file goes through
``vit_jax.storage``. Shards are written by TensorFlow's ``TFRecordWriter`` into the output
folder when it is local, or into a local temporary file that is then uploaded whole; the
metadata is written last and atomically, so a split is visible only once complete.
"""

import argparse
import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

from vit_jax import cli, storage
from vit_jax.data.sources.folder import EXTENSIONS

Example = tuple[str, list[int]]


def read_folder(root: str) -> tuple[list[Example], list[str]]:
    """(path, [label]) for every image of a ``<class>/*`` folder, and the class names."""
    classes, _ = storage.list_entries(root)
    if not classes:
        raise ValueError(f"no class folders in {root!r}; expected {root}/<class>/*.jpg")
    examples = []
    for i, cls in enumerate(classes):
        for fname in storage.list_entries(storage.join(root, cls))[1]:
            if fname.lower().endswith(EXTENSIONS):
                examples.append((storage.join(root, cls, fname), [i]))
    return examples, classes


def read_csv(path: str) -> list[Example]:
    """(path, labels) rows of a CSV ``path,labels`` file (labels space-separated ints)."""
    base = storage.dirname(storage.absolute(path))
    examples = []
    with io.StringIO(storage.read_text(path), newline="") as f:
        for row_no, row in enumerate(csv.reader(f)):
            if not row or not row[0].strip():
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{row_no + 1}: expected 'path,labels', got {row!r}")
            try:
                labels = [int(x) for x in row[1].split()]
            except ValueError:
                if row_no == 0:
                    continue  # Header.
                raise ValueError(f"{path}:{row_no + 1}: labels must be ints: {row[1]!r}") from None
            image = row[0].strip()
            absolute = storage.is_remote(image) or os.path.isabs(image)
            examples.append((image if absolute else storage.join(base, image), labels))
    return examples


def _example(image: bytes, labels: list[int], image_id: str) -> bytes:
    from vit_jax.data._tf import tf

    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "image/labels": tf.train.Feature(int64_list=tf.train.Int64List(value=labels)),
        "image/id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id.encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shards(
    examples: Sequence[Example],
    output: str,
    num_shards: int,
    *,
    split: str = "train",
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
) -> dict:
    """Writes ``output/<split>-XXXXX-of-YYYYY.tfrecord`` files and ``output/<split>.json``."""
    if not examples:
        raise ValueError("no examples to write")
    top = max((max(labels) for _, labels in examples if labels), default=-1)
    if num_classes is None:
        num_classes = top + 1
    bad = [(p, ls) for p, ls in examples if any(not 0 <= x < num_classes for x in ls)]
    if bad:
        raise ValueError(
            f"{len(bad)} example(s) have labels outside [0, {num_classes}), "
            f"e.g. {bad[0]}; pass --num_classes or fix the labels"
        )

    def record(i: int) -> bytes:
        path, labels = examples[i]
        return _example(storage.read_bytes(path), list(labels), storage.basename(path))

    order = np.random.default_rng(seed).permutation(len(examples))
    return write_records(
        record,
        order,
        output,
        num_shards,
        split=split,
        num_classes=num_classes,
        class_names=class_names,
    )


def write_records(
    record: Callable[[int], bytes],
    order: Sequence[int],
    output: str,
    num_shards: int,
    *,
    split: str,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Writes serialized records ``record(i)`` for ``i`` in ``order`` into ``num_shards``
    near-equal shards plus the split's metadata (records and bytes per shard)."""
    from vit_jax.data._tf import tf

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    storage.make_dirs(output)
    shards = []
    with tempfile.TemporaryDirectory() as scratch:
        for k, part in enumerate(np.array_split(np.asarray(order), num_shards)):
            fname = f"{split}-{k:05d}-of-{num_shards:05d}.tfrecord"
            # TFRecordWriter writes local files only here (never through TF's GCS client).
            local = os.path.join(scratch, fname) if storage.is_remote(output) else None
            path = local or storage.join(output, fname)
            with tf.io.TFRecordWriter(path) as writer:
                for i in part:
                    writer.write(record(int(i)))
            num_bytes = os.path.getsize(path)
            if local:
                with open(local, "rb") as f:
                    storage.write_bytes(storage.join(output, fname), f.read())
                os.remove(local)
            shards.append({"file": fname, "num_examples": int(len(part)), "num_bytes": num_bytes})
    meta = {
        "split": split,
        "num_classes": int(num_classes),
        "num_examples": int(sum(s["num_examples"] for s in shards)),
        "shards": shards,
    }
    if class_names is not None:
        meta["class_names"] = list(class_names)
    storage.write_text(storage.join(output, f"{split}.json"), json.dumps(meta, indent=1))
    return meta


def write_synthetic(
    output: str,
    num_examples: int,
    num_shards: int,
    *,
    split: str = "train",
    num_classes: int = 10,
    image_size: int = 8,
    seed: int = 0,
) -> dict:
    """Writes ``num_examples`` tiny multi-label records (for benchmarks and tests).

    Images are ``image_size`` px PNGs drawn from a pool of 256 random ones; record ``i`` has
    id ``str(i)`` and labels ``{i % C, (7 i + 3) % C}``, so every record is distinct. A
    million records take under a minute to write.
    """
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(256):
        pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        pool.append(buf.getvalue())

    def record(i: int) -> bytes:
        labels = sorted({i % num_classes, (7 * i + 3) % num_classes})
        return _example(pool[i % len(pool)], labels, str(i))

    return write_records(
        record, range(num_examples), output, num_shards, split=split, num_classes=num_classes
    )


def parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser("write_shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="folder <class>/*.jpg or CSV path,labels")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--num_shards", type=int, default=1)
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_classes", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    names = None
    if storage.is_dir(args.input):
        examples, names = read_folder(args.input)
    else:
        examples = read_csv(args.input)
    meta = write_shards(
        examples,
        args.output,
        args.num_shards,
        split=args.split,
        num_classes=args.num_classes,
        class_names=names,
        seed=args.seed,
    )
    print(json.dumps({k: meta[k] for k in ("split", "num_classes", "num_examples")}))
    return 0
