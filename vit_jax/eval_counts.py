"""Evaluation metrics as masked SUMS, so they can be added over batches, devices and hosts.

A prediction is correct when the label vector is positive at the predicted class, which
covers one-hot labels (top-1 accuracy), multi-hot ImageNet ReaL labels (ReaL accuracy) and
multi-label data (precision@1). Padding examples carry mask 0 and contribute nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import losses


def classification_counts(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
    loss_name: str | None = "softmax_xent",
) -> dict[str, jax.Array]:
    """Masked sums for one batch: ``correct_top1``, ``correct_top5``, ``loss_sum``, ``count``.

    ``labels`` are dense (batch, classes); ``mask`` is a float per-example weight (all ones
    when None). ``correct_top5`` counts an example when any of its top-5 logits (top-C when
    there are fewer than 5 classes) has a positive label. ``loss_sum`` is left out when
    ``loss_name`` is None. All values are float32 scalars.
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    if mask is None:
        mask = jnp.ones(logits.shape[:1], jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)

    top1 = jnp.argmax(logits, axis=-1)
    hit1 = jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
    _, top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    hit5 = jnp.any(jnp.take_along_axis(labels, top5, axis=-1) > 0, axis=-1)

    counts = {
        "correct_top1": jnp.sum(hit1 * mask),
        "correct_top5": jnp.sum(hit5 * mask),
        "count": jnp.sum(mask),
    }
    if loss_name is not None:
        loss_fn = losses.get_loss_fn(loss_name)
        counts["loss_sum"] = loss_fn(logits, labels, weights=mask, reduction="sum")
    return counts


def add_counts(
    total: Mapping[str, jax.Array] | None, counts: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
    """Accumulates one batch's counts into a running total (``total`` None starts one)."""
    if total is None:
        return dict(counts)
    return {k: total[k] + counts[k] for k in counts}


def finalize(counts: Mapping[str, jax.Array]) -> dict[str, float]:
    """Turns accumulated sums into means: ``top1``, ``top5``, ``loss`` (and keeps ``count``).

    With zero examples the means are NaN (nothing was evaluated).
    """
    n = float(np.asarray(counts["count"]))

    def mean(key: str) -> float:
        return float(np.asarray(counts[key])) / n if n > 0 else float("nan")

    out = {"top1": mean("correct_top1"), "top5": mean("correct_top5"), "count": n}
    if "loss_sum" in counts:
        out["loss"] = mean("loss_sum")
    return out
