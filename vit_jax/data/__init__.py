"""Input pipeline: presets, sources, preprocessing ops, multi-host batching.

Typical use::

    cfg = get_data_config("digits", image_size=16)
    batches = train_batches(cfg, global_batch_size=128, seed=0)
    for batch in prefetch_to_device(batches, sharding): ...
"""

from vit_jax.data.multihost import prefetch_to_device, to_global_batch
from vit_jax.data.pipeline import (
    eval_batches,
    format_pp,
    num_classes,
    num_examples,
    train_batches,
    train_dataset,
)
from vit_jax.data.pp_parse import PPError
from vit_jax.data.presets import get_data_config, preset_names
from vit_jax.data.sources import DataError

__all__ = [
    "DataError",
    "PPError",
    "eval_batches",
    "format_pp",
    "get_data_config",
    "num_classes",
    "num_examples",
    "prefetch_to_device",
    "preset_names",
    "to_global_batch",
    "train_batches",
    "train_dataset",
]
