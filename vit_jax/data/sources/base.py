"""What every source returns: a dataset of encoded records for one process plus its sizes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from vit_jax.data._tf import tf
from vit_jax.errors import UserError


class DataError(UserError, ValueError):
    """A data source is misconfigured or its files are missing or broken."""


@dataclasses.dataclass
class Records:
    """Encoded (undecoded) examples of one split for one process.

    Attributes:
      dataset: elements are cheap records (file paths, offsets, serialized bytes or small
        arrays) in a fixed order, so shuffling and skipping them is cheap.
      parse: per-record function (pure TF) that turns a record into a feature dict with at
        least ``image`` (encoded bytes or uint8 pixels) and ``label``; runs after shuffling,
        fused into the preprocessing map. None if records are already feature dicts.
      prepare: optional dataset transform applied after shuffling and before ``parse`` to
        elements ``(index, record)``, for reads that need a dataset op (tar members).
      num_examples: examples in this process's part, or None if unknown.
      max_examples: examples in the largest process part (what every process must pad its
        evaluation to), or None if unknown.
      epochs: optional ``(seed, first_epoch, skip) -> dataset``: the records of epochs
        ``first_epoch, first_epoch + 1, ...`` already shuffled by the source, starting ``skip``
        records into ``first_epoch``, for sources that can order epochs themselves and resume
        without reading what precedes (needs ``num_examples``). When None the pipeline
        shuffles ``dataset`` with a buffer and skips by reading.
    """

    dataset: tf.data.Dataset
    parse: Callable[[Any], dict[str, Any]] | None = None
    prepare: Callable[[tf.data.Dataset], tf.data.Dataset] | None = None
    num_examples: int | None = None
    max_examples: int | None = None
    epochs: Callable[[int, int, int], tf.data.Dataset] | None = None
