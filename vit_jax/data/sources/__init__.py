"""Data sources, selected by ``cfg.source``: tfds, folder, imagenet21k, jft, digits.

Each source module provides ``open_split(cfg, process_index, process_count) -> Records``,
``num_examples(cfg)`` and ``num_classes(cfg)``.
"""

from types import ModuleType

from vit_jax.data.sources import digits, folder, imagenet21k, jft, tfds_source
from vit_jax.data.sources.base import DataError, Records

SOURCES: dict[str, ModuleType] = {
    "tfds": tfds_source,
    "folder": folder,
    "imagenet21k": imagenet21k,
    "jft": jft,
    "digits": digits,
}


def get_source(cfg) -> ModuleType:
    """The source module named by ``cfg.source``."""
    try:
        return SOURCES[cfg.source]
    except KeyError:
        raise DataError(
            f"unknown data source {cfg.source!r}; known sources: {sorted(SOURCES)}"
        ) from None


__all__ = ["SOURCES", "DataError", "Records", "get_source"]
