"""Measures train-pipeline throughput in images/s, or resume latency, and prints JSON.

    python -m vit_jax input_benchmark --config PRESET_OR_FILE [--batch_size 256]
        [--num_batches 40] [--compare_bare] [--repeats 3]
    python -m vit_jax input_benchmark --config jft_synthetic [--num_records 1000000]
        [--num_shards 1024] [--resume_at 0.9] [--compare_legacy] [--data_dir DIR]

``--config`` is a preset name (``digits``, ``folder:/data/x``, ...), a ``.py`` file whose
``get_config()`` returns a data config (or a config with a ``data`` field), or
``sample_photos``: a temporary folder of natural 500x375 JPEGs (see ``sample_photos.py``)
read with ``decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(...)``.
``--compare_bare`` also times the same chain written as bare TensorFlow ops in one plain
tf.data map over the same files (folder sources only) and reports the ratio.

``jft_synthetic`` writes ``--num_records`` tiny JFT-like records (8x8 PNGs, in ``--data_dir``
if given and not there yet, else a temporary folder) and reports the time to the first batch
and the records read from the shard files when starting at step 0 and when resuming
``--resume_at`` of the way into the second epoch; ``--compare_legacy`` also times the old way
(files in a fixed order, a shuffle buffer, skipping by reading).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence

import ml_collections

from vit_jax import cli
from vit_jax.data import pipeline, presets
from vit_jax.data._tf import plain, tf
from vit_jax.data.sources import jft

SYNTHETIC_PP = "decode|value_range(-1, 1)|onehot({num_classes}, multi=True)"


def load_config(spec: str) -> ml_collections.ConfigDict:
    """A data config from a preset name or a Python config file."""
    if spec.endswith(".py") and os.path.exists(spec):
        module_spec = importlib.util.spec_from_file_location("benchmark_config", spec)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        cfg = module.get_config()
        return cfg.data if "data" in cfg else cfg
    return presets.get_data_config(spec)


def _time(batches: Iterator, batch_size: int, num_batches: int, warmup: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process)."""
    for _ in range(warmup):
        next(batches)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    images = batch_size * num_batches
    cpu_s = max(time.process_time() - cpu, 1e-9)
    return images / (time.perf_counter() - wall), images / cpu_s


def bare_dataset(paths: Sequence[str], batch_size: int, size: int = 224) -> tf.data.Dataset:
    """decode + inception crop + flip + value range as bare TF ops in one tf.data map."""

    def fn(path):
        data = tf.io.read_file(path)
        begin, crop, _ = tf.image.sample_distorted_bounding_box(
            tf.io.extract_jpeg_shape(data),
            tf.zeros([1, 0, 4]),
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.05, 1.0),
            use_image_if_no_bounding_boxes=True,
        )
        window = tf.concat([begin[:2], crop[:2]], 0)
        image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
        image = tf.image.resize(image, (size, size))
        image = tf.image.random_flip_left_right(image)
        return image * (2.0 / 255.0) - 1.0

    ds = tf.data.Dataset.from_tensor_slices(list(paths)).shuffle(len(paths)).repeat()
    ds = ds.map(plain(fn), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def measure(
    cfg: ml_collections.ConfigDict,
    *,
    batch_size: int,
    num_batches: int,
    warmup: int,
    compare_bare: bool,
    repeats: int = 1,
) -> dict:
    """Times the train pipeline (and optionally the bare chain); returns the figures.

    With ``repeats`` > 1 the two pipelines are timed alternately and the best run of each
    is reported, which damps noise from other load on the machine. Images per CPU second
    (this process's user + system time) are reported too: on a shared machine they compare
    the pipelines' cost better than wall-clock rates do.
    """
    paths = None
    if compare_bare:
        if cfg.train.source != "folder":
            raise SystemExit("--compare_bare needs a folder source (e.g. --config sample_photos)")
        from vit_jax.data import splits
        from vit_jax.data.sources import folder

        name, _, _ = splits.parse_split(cfg.train.split)  # The same slice as the pipeline's.
        found = folder.scan_split(cfg.train.data_dir or cfg.train.name, name)
        _, idx = splits.slice_indices(cfg.train.split, len(found.paths))
        paths = [found.paths[i] for i in idx]
    runs: dict[str, list[tuple[float, float]]] = {"framework": [], "bare": []}
    for _ in range(max(1, repeats)):
        batches = pipeline.train_batches(
            cfg, global_batch_size=batch_size, seed=0, process_index=0, process_count=1
        )
        runs["framework"].append(_time(batches, batch_size, num_batches, warmup))
        del batches
        if paths is not None:
            bare = bare_dataset(paths, batch_size, cfg.image_size).as_numpy_iterator()
            runs["bare"].append(_time(bare, batch_size, num_batches, warmup))
            del bare
    result = {
        "config": cfg.name,
        "pp": pipeline.format_pp(cfg.train.pp, cfg),
        "batch_size": batch_size,
        "num_batches": num_batches,
        "images_per_s": round(max(r[0] for r in runs["framework"]), 1),
        "images_per_cpu_s": round(max(r[1] for r in runs["framework"]), 1),
    }
    if paths is not None:
        result["bare_images_per_s"] = round(max(r[0] for r in runs["bare"]), 1)
        result["bare_images_per_cpu_s"] = round(max(r[1] for r in runs["bare"]), 1)
        result["ratio"] = round(result["images_per_s"] / result["bare_images_per_s"], 3)
        result["cpu_ratio"] = round(result["images_per_cpu_s"] / result["bare_images_per_cpu_s"], 3)
    if repeats > 1:
        result["runs_images_per_s"] = {k: [round(r[0], 1) for r in v] for k, v in runs.items() if v}
    return result


@contextlib.contextmanager
def counting_reads() -> Iterator[tf.Variable]:
    """Counts the records the JFT shard readers hand out while the block runs (those read
    only to be skipped too: the reading work of a pipeline), by wrapping `jft._records`,
    the one function every shard read goes through."""
    counter = tf.Variable(0, dtype=tf.int64, trainable=False)
    original = jft._records

    def count(record):
        with tf.control_dependencies([counter.assign_add(1)]):
            return tf.identity(record)

    jft._records = lambda files: original(files).map(count)
    try:
        yield counter
    finally:
        jft._records = original


def first_batch(
    cfg: ml_collections.ConfigDict,
    step: int,
    *,
    batch_size: int,
    process_count: int = 1,
    legacy: bool = False,
) -> dict:
    """Seconds to the first batch at ``step`` and the records read until then (process 0)."""
    with counting_reads() as counter:
        start = time.perf_counter()
        records = jft.open_split(cfg.train, 0, process_count, epoch_order=not legacy)
        batches = pipeline.train_dataset(
            cfg,
            global_batch_size=batch_size,
            seed=0,
            start_step=step,
            process_index=0,
            process_count=process_count,
            records=records,
        ).as_numpy_iterator()
        next(batches)
        seconds = time.perf_counter() - start
        read = int(counter.numpy())
    return {"step": step, "first_batch_s": round(seconds, 3), "records_read": read}


def resume_benchmark(
    cfg: ml_collections.ConfigDict,
    *,
    batch_size: int,
    resume_at: float,
    process_count: int = 1,
    compare_legacy: bool = False,
) -> dict:
    """Time to first batch at step 0 and ``resume_at`` into the second epoch (see doc)."""
    local_batch = batch_size // process_count
    per_process = jft.open_split(cfg.train, 0, process_count).num_examples
    steps_per_epoch = per_process // local_batch
    steps = [0, steps_per_epoch + int(resume_at * steps_per_epoch)]
    first_batch(cfg, 0, batch_size=batch_size, process_count=process_count)  # Warm-up.
    result = {
        "records_per_process": per_process,
        "position": [s * local_batch for s in steps],
        "resume": [
            first_batch(cfg, s, batch_size=batch_size, process_count=process_count) for s in steps
        ],
    }
    if compare_legacy:
        result["legacy"] = [
            first_batch(cfg, s, batch_size=batch_size, process_count=process_count, legacy=True)
            for s in steps
        ]
    return result


def synthetic_jft(
    root: str, num_records: int, num_shards: int
) -> tuple[ml_collections.ConfigDict, float]:
    """A JFT-like data config over generated records in ``root`` (written if missing)."""
    from vit_jax.tools import write_shards

    seconds = 0.0
    if not os.path.exists(os.path.join(root, "train.json")):
        start = time.perf_counter()
        write_shards.write_synthetic(root, num_records, num_shards)
        seconds = time.perf_counter() - start
    split = {"data_dir": root, "split": "train", "pp": SYNTHETIC_PP}
    cfg = presets.get_data_config("jft", image_size=8, train=split, evals={"val": split})
    cfg.name = "jft_synthetic"
    return cfg, seconds


def parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser("input_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--num_photos", type=int, default=512, help="images written for --config sample_photos"
    )
    parser.add_argument("--compare_bare", action="store_true")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="alternate the timed runs this often and report the best of each",
    )
    parser.add_argument("--num_records", type=int, default=1_000_000, help="jft_synthetic size")
    parser.add_argument("--num_shards", type=int, default=1024, help="jft_synthetic shards")
    parser.add_argument(
        "--resume_at", type=float, default=0.9, help="jft_synthetic: resume this far into epoch 2"
    )
    parser.add_argument("--process_count", type=int, default=1, help="jft_synthetic processes")
    parser.add_argument("--compare_legacy", action="store_true")
    parser.add_argument("--data_dir", default=None, help="jft_synthetic: keep the records here")
    return parser


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if args.config == "jft_synthetic":
            root = args.data_dir or tmp
            cfg, write_s = synthetic_jft(root, args.num_records, args.num_shards)
            meta = jft.load_metadata(root, "train")
            result = {
                "config": cfg.name,
                "num_records": meta["num_examples"],
                "num_shards": len(meta["shards"]),
                "batch_size": args.batch_size,
                "process_count": args.process_count,
                "write_s": round(write_s, 1),
                **resume_benchmark(
                    cfg,
                    batch_size=args.batch_size,
                    resume_at=args.resume_at,
                    process_count=args.process_count,
                    compare_legacy=args.compare_legacy,
                ),
            }
            print(json.dumps(result))
            return 0
        if args.config == "sample_photos":
            from vit_jax.tools.sample_photos import write_photo_folder

            write_photo_folder(tmp, num_images=args.num_photos)
            cfg = presets.get_data_config(f"folder:{tmp}")
            cfg.name = "sample_photos"
        else:
            cfg = load_config(args.config)
        result = measure(
            cfg,
            batch_size=args.batch_size,
            num_batches=args.num_batches,
            warmup=args.warmup,
            compare_bare=args.compare_bare,
            repeats=args.repeats,
        )
    print(json.dumps(result))
    return 0
