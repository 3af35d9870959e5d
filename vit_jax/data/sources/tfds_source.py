"""Any TFDS dataset by name and split (slicing included), read as encoded bytes.

Images are read undecoded (``SkipDecoding``) so that shuffling moves bytes, not pixels, and
decoding happens in the pp map. TFDS writes its shards pre-shuffled, so files are read in a
fixed order and the pipeline's seeded buffer shuffle does the rest, which keeps the stream
reproducible. Each process reads ``tfds.even_splits(split, process_count)[process_index]``.
"""

import functools

import tensorflow_datasets as tfds

from vit_jax.data._tf import tf
from vit_jax.data.sources.base import DataError, Records


@functools.lru_cache(maxsize=32)
def _builder(name: str, data_dir: str | None):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"unknown TFDS dataset {name!r}: {str(e).splitlines()[0]} "
            "(see https://www.tensorflow.org/datasets/catalog)"
        ) from e


def _split_for(split: str, process_index: int, process_count: int):
    if process_count == 1:
        return split
    return tfds.even_splits(split, n=process_count)[process_index]


def _count(builder, split) -> int | None:
    try:
        n = builder.info.splits[split].num_examples
    except (KeyError, ValueError, TypeError, AssertionError):
        return None
    return int(n) if n else None


def _not_prepared(builder, name: str, data_dir: str | None, err: Exception) -> DataError:
    root = data_dir or "~/tensorflow_datasets"
    where = data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if manual:
        steps = " ".join(str(manual).split())
        return DataError(
            f"TFDS dataset {name!r} is not prepared in {where} and needs a manual download. "
            f"Put the source files in {root}/downloads/manual (or pass --manual_dir) and run "
            f"`tfds build {name} --data_dir {root}` once. "
            f"TFDS instructions: {steps}"
        )
    return DataError(
        f"TFDS dataset {name!r} is not prepared in {where} ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). This pipeline never downloads; run "
        f"`tfds build {name} --data_dir {root}` once first."
    )


def open_split(cfg, process_index: int, process_count: int) -> Records:
    """Records of ``cfg.split`` for one process: TFDS feature dicts with encoded images."""
    builder = _builder(cfg.name, cfg.data_dir)
    split = _split_for(cfg.split, process_index, process_count)
    decoders = None
    features = builder.info.features
    if "image" in features and isinstance(features["image"], tfds.features.Image):
        decoders = {"image": tfds.decode.SkipDecoding()}
    read_config = tfds.ReadConfig(add_tfds_id=False, try_autocache=False)
    try:
        ds = builder.as_dataset(
            split=split, shuffle_files=False, decoders=decoders, read_config=read_config
        )
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
        raise _not_prepared(builder, cfg.name, cfg.data_dir, e) from e
    except (ValueError, KeyError) as e:
        raise DataError(f"TFDS dataset {cfg.name!r}: bad split {cfg.split!r}: {e}") from e
    total = _count(builder, cfg.split)
    local = _count(builder, split) if process_count > 1 else total
    largest = None
    if process_count > 1 and total is not None:
        largest = max(_count(builder, s) or 0 for s in tfds.even_splits(cfg.split, process_count))
    return Records(ds, num_examples=local, max_examples=largest if process_count > 1 else total)


def num_examples(cfg) -> int | None:
    """Examples in ``cfg.split`` from the builder's info (None when unknown, e.g. mocked)."""
    return _count(_builder(cfg.name, cfg.data_dir), cfg.split)


def num_classes(cfg, key: str = "label") -> int:
    """Class count from the builder's info: ``info.features['label'].num_classes``."""
    features = _builder(cfg.name, cfg.data_dir).info.features
    feature = features[key] if key in features else None
    n = getattr(feature, "num_classes", None)
    if not n:
        raise DataError(
            f"TFDS dataset {cfg.name!r} has no ClassLabel feature {key!r}; set num_classes "
            "in the data config"
        )
    return int(n)
