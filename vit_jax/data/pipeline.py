"""Builds train and eval input pipelines from a data config (see ``presets.py``).

Train: records (encoded bytes, paths or offsets) are shuffled per epoch with a seed derived
from (seed, epoch), numbered with a global example counter, skipped to the requested step
while still encoded, then read, decoded and preprocessed in one parallel map whose random
ops are seeded from (seed, counter). Hence the same seed gives the same batches and
``start_step=k`` reproduces a fresh iterator's batches from batch k on, bit for bit.
A source that provides ``Records.epochs`` shuffles its own epochs under the same contract
and resumes without reading what precedes the current round (JFT-like shards).

Eval: one pass in file order, every example once; the last batch is padded to full size
and ``mask`` marks real examples, and all processes yield the same number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import ml_collections
import numpy as np

from vit_jax.data import registry
from vit_jax.data._tf import plain, tf
from vit_jax.data.sources import DataError, Records, get_source

_EPOCHS = 2**62  # "Forever" for the epoch counter.


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
    return process_index, process_count


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}"
        )
    return global_batch_size // process_count


def num_classes(data_config: ml_collections.ConfigDict) -> int:
    """``data_config.num_classes``, or read from the train source when it is None."""
    if data_config.num_classes is not None:
        return int(data_config.num_classes)
    cfg = _split_config(data_config, "train")
    return int(get_source(cfg).num_classes(cfg))


def _split_config(data_config: ml_collections.ConfigDict, split_name: str):
    if split_name == "train":
        return _with_data_dir(data_config, data_config.train)
    if split_name in data_config.evals:
        return _with_data_dir(data_config, data_config.evals[split_name])
    raise KeyError(
        f"unknown split {split_name!r}; have 'train' and evals {sorted(data_config.evals)}"
    )


def _with_data_dir(data_config, cfg):
    """`cfg` with its `data_dir` falling back to the data config's own."""
    if cfg.data_dir is None and data_config.get("data_dir"):
        cfg = ml_collections.ConfigDict(cfg.to_dict())
        cfg.data_dir = data_config.data_dir
    return cfg


def num_examples(data_config: ml_collections.ConfigDict, split_name: str = "train") -> int | None:
    """Examples in the train split or in eval ``split_name`` (all processes); None if unknown."""
    cfg = _split_config(data_config, split_name)
    return get_source(cfg).num_examples(cfg)


def num_bad_examples(data_config: ml_collections.ConfigDict, split_name: str = "train") -> int:
    """Examples the source skipped as unreadable (e.g. broken image files); 0 if untold."""
    cfg = _split_config(data_config, split_name)
    count = getattr(get_source(cfg), "num_bad_examples", None)
    return int(count(cfg)) if count is not None else 0


def _named_errors(batches: Iterator, cfg) -> Iterator:
    """Re-raises a label-range failure inside tf.data as a DataError naming the dataset.

    The error class is bound when the generator is made: a generator closed at interpreter
    exit evaluates the `except` clause after the `tf` module is torn down."""
    return _named_errors_as(batches, cfg, tf.errors.InvalidArgumentError)


def _named_errors_as(batches: Iterator, cfg, invalid_argument: type) -> Iterator:
    try:
        yield from batches
    except invalid_argument as e:
        text = str(e)
        if "label out of range" not in text:
            raise
        detail = text[text.index("label out of range") :].splitlines()[0]
        detail = detail.replace("\\'", "'").replace(":] [", ": [")
        raise DataError(f"{_dataset(cfg)} split {cfg.split!r}: {detail}") from None


def _dataset(cfg) -> str:
    """'dataset <name> in <data_dir>' for messages."""
    return f"dataset {cfg.name!r}" + (f" in {cfg.data_dir}" if cfg.data_dir else "")


class _Placeholders(dict):
    """Fills ``{image_size}`` etc. in pp templates; ``{num_classes}`` is resolved lazily."""

    def __init__(self, data_config):
        super().__init__()
        self._config = data_config

    def __missing__(self, key):
        size = int(self._config.image_size)
        values = {
            "image_size": lambda: size,
            "resize_size": lambda: int(round(size * 8 / 7)),  # 224 -> 256.
            "pad": lambda: max(1, size // 8),
            "num_classes": lambda: num_classes(self._config),
        }
        if key not in values:
            raise DataError(f"unknown placeholder {{{key}}} in pp string; known: {sorted(values)}")
        self[key] = values[key]()
        return self[key]


def format_pp(template: str, data_config: ml_collections.ConfigDict) -> str:
    """Fills the placeholders of a pp template from the data config."""
    return template.format_map(_Placeholders(data_config))


def _finish(data: dict) -> dict:
    for key in ("image", "labels"):
        if key not in data:
            raise DataError(
                f"preprocessing produced no {key!r} (have {sorted(data)}); the pp string must "
                "produce 'image' and end with onehot(...) making 'labels'"
            )
    return {
        "image": tf.cast(data["image"], tf.float32),
        "labels": tf.cast(data["labels"], tf.float32),
    }


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    return options


def _preprocess(
    ds: tf.data.Dataset,
    records: Records,
    pp_spec: str,
    seed: int,
    process_index: int,
    process_count: int,
) -> tf.data.Dataset:
    """(local index, record) -> preprocessed example; random ops keyed by global index."""
    if records.prepare is not None:
        ds = records.prepare(ds)
    pp = registry.build_pp(pp_spec, seed=seed)

    def fn(i, rec):
        data = records.parse(rec) if records.parse is not None else dict(rec)
        return _finish(pp(data, i * process_count + process_index))

    return ds.map(plain(fn), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _open(cfg, process_index: int, process_count: int) -> Records:
    records = get_source(cfg).open_split(cfg, process_index, process_count)
    if cfg.cache:
        records.dataset = records.dataset.cache()
    return records


def _epochs(records: Records, cfg, seed: int, first_epoch: int, to_skip: int) -> tf.data.Dataset:
    """(global-counter index, record) pairs from ``to_skip`` records into ``first_epoch`` on."""
    n = records.num_examples
    if records.epochs is not None and n:
        # The source shuffles its own epochs and resumes without reading earlier rounds.
        ds = records.epochs(int(seed), first_epoch, to_skip)
        return ds.enumerate(start=first_epoch * n + to_skip)
    buffer = int(cfg.shuffle_buffer or 10_000)
    base = records.dataset
    seed_base = (int(seed) * 1_000_003) % (2**62)

    def epoch(e):
        return base.shuffle(buffer, seed=e + seed_base, reshuffle_each_iteration=False)

    ds = tf.data.Dataset.range(first_epoch, _EPOCHS).flat_map(plain(epoch))
    ds = ds.enumerate(start=first_epoch * n if n else 0)
    return ds.skip(to_skip) if to_skip else ds


def train_dataset(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    records: Records | None = None,
) -> tf.data.Dataset:
    """The infinite, batched train ``tf.data.Dataset`` of one process (see module doc).

    ``records`` replaces the opened train split (the benchmark compares read orders with it).
    """
    pi, pc = _process(process_index, process_count)
    local_batch = _local_batch(global_batch_size, pc)
    cfg = _split_config(data_config, "train")
    pp_spec = format_pp(cfg.pp, data_config)
    records = _open(cfg, pi, pc) if records is None else records
    n = records.num_examples
    if n == 0:
        raise DataError(
            f"{_dataset(cfg)}: train split {cfg.split!r} has no examples "
            f"for process {pi}; "
            "check the split name and data_dir"
        )
    to_skip = int(start_step) * local_batch
    first_epoch = 0
    if n:
        first_epoch, to_skip = divmod(to_skip, n)
    ds = _epochs(records, cfg, seed, first_epoch, to_skip)
    ds = _preprocess(ds, records, pp_spec, seed, pi, pc)
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def train_batches(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of process-local numpy batches ``{'image', 'labels'}``."""
    ds = train_dataset(
        data_config,
        global_batch_size=global_batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
    )
    return _named_errors(ds.as_numpy_iterator(), _split_config(data_config, "train"))


def _count(ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality())
    if n >= 0:
        return n
    return int(ds.reduce(np.int64(0), lambda c, _: c + 1))


def eval_batches(
    data_config: ml_collections.ConfigDict,
    eval_name: str,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over eval ``eval_name``: ``{'image', 'labels', 'mask'}`` batches, padded.

    Every process yields ceil(largest process part / local batch) batches so that
    multi-host evaluation stays in lockstep; padding rows are zero with ``mask`` 0.
    """
    if eval_name not in data_config.evals:
        raise KeyError(f"unknown eval {eval_name!r}; have {sorted(data_config.evals)}")
    pi, pc = _process(process_index, process_count)
    local_batch = _local_batch(global_batch_size, pc)
    cfg = _with_data_dir(data_config, data_config.evals[eval_name])
    pp_spec = format_pp(cfg.pp, data_config)
    records = _open(cfg, pi, pc)
    largest = records.max_examples
    if largest is None:
        largest = (
            records.num_examples if records.num_examples is not None else _count(records.dataset)
        )
    num_batches = math.ceil(largest / local_batch)
    ds = _preprocess(records.dataset.enumerate(), records, pp_spec, 0, pi, pc)
    ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE).with_options(_options())
    return _named_errors(_padded(ds, num_batches, local_batch, bool(cfg.mask_empty_labels)), cfg)


def _padded(
    ds: tf.data.Dataset, num_batches: int, local_batch: int, mask_empty_labels: bool
) -> Iterator[dict[str, np.ndarray]]:
    spec = ds.element_spec
    shapes = {k: tuple(spec[k].shape[1:]) for k in ("image", "labels")}
    produced = 0
    for batch in ds.as_numpy_iterator():
        if produced >= num_batches:
            raise DataError("eval split has more examples than its reported size")
        yield _pad(batch, local_batch, mask_empty_labels)
        shapes = {k: batch[k].shape[1:] for k in ("image", "labels")}
        produced += 1
    while produced < num_batches:
        if any(d is None for s in shapes.values() for d in s):
            raise DataError("cannot pad an empty eval part whose image shape is not static")
        yield {
            "image": np.zeros((local_batch, *shapes["image"]), np.float32),
            "labels": np.zeros((local_batch, *shapes["labels"]), np.float32),
            "mask": np.zeros((local_batch,), np.float32),
        }
        produced += 1


def _pad(batch: dict[str, np.ndarray], local_batch: int, mask_empty_labels: bool):
    n = len(batch["image"])
    mask = np.ones((local_batch,), np.float32)
    mask[n:] = 0.0
    out = {"mask": mask}
    for key in ("image", "labels"):
        value = batch[key]
        if n < local_batch:
            value = np.concatenate(
                [value, np.zeros((local_batch - n, *value.shape[1:]), value.dtype)]
            )
        out[key] = value
    if mask_empty_labels:
        out["mask"] = out["mask"] * (out["labels"].sum(axis=-1) > 0)
    return out
