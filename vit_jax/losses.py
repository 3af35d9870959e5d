"""Classification losses on dense float labels (one-hot, multi-hot or mixup-mixed).

Both losses compute in float32 whatever the logits' dtype (bf16 logits lose too much
precision in log-sum-exp) and take optional per-example ``weights`` (e.g. a 0/1 mask for
padding examples). ``reduction='mean'`` is the weighted mean over the batch,
``sum(w * loss) / sum(w)`` (plain mean without weights); ``'sum'`` is ``sum(w * loss)``;
``'none'`` returns the per-example losses (times ``weights`` when given).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

VALID_LOSSES = ("softmax_xent", "sigmoid_xent")
_REDUCTIONS = ("mean", "sum", "none")


def _reduce(per_example: jax.Array, weights: jax.Array | None, reduction: str) -> jax.Array:
    """Applies the weights and the requested reduction over the batch axis."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}; valid: {', '.join(_REDUCTIONS)}.")
    if weights is None:
        if reduction == "mean":
            return jnp.mean(per_example)
        return jnp.sum(per_example) if reduction == "sum" else per_example
    weights = jnp.asarray(weights, jnp.float32)
    weighted = per_example * weights
    if reduction == "mean":
        # Guard an all-padding batch: loss 0 rather than NaN.
        return jnp.sum(weighted) / jnp.maximum(jnp.sum(weights), 1e-8)
    return jnp.sum(weighted) if reduction == "sum" else weighted


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    label_smoothing: float = 0.0,
    weights: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Softmax cross-entropy ``-sum_c y_c log softmax(logits)_c`` per example.

    ``labels`` are dense (batch, classes) targets that should sum to 1 per example.
    ``label_smoothing`` ``s`` replaces them by ``(1 - s) * y + s / num_classes``.
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    if label_smoothing:
        labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
    per_example = -jnp.sum(labels * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    return _reduce(per_example, weights, reduction)


def sigmoid_cross_entropy(
    logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None, reduction: str = "mean"
) -> jax.Array:
    """Independent binary cross-entropies, SUMMED over classes, then reduced over the batch.

    Per example: ``sum_c -[y_c log sigmoid(x_c) + (1 - y_c) log sigmoid(-x_c)]``; this is the
    multi-label (JFT / ImageNet-21k) loss, and labels may be soft in [0, 1].
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    log_p = jax.nn.log_sigmoid(logits)
    log_not_p = jax.nn.log_sigmoid(-logits)
    per_example = -jnp.sum(labels * log_p + (1.0 - labels) * log_not_p, axis=-1)
    return _reduce(per_example, weights, reduction)


def get_loss_fn(name: str) -> Callable[..., jax.Array]:
    """Maps a config loss name ('softmax_xent' | 'sigmoid_xent') to its function."""
    if name == "softmax_xent":
        return softmax_cross_entropy
    if name == "sigmoid_xent":
        return sigmoid_cross_entropy
    raise ValueError(f"Unknown loss {name!r}; valid: {', '.join(VALID_LOSSES)}.")


def distillation_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
    weights: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per example, in float32.

    The T^2 keeps the gradient's scale independent of the temperature (Hinton et al., 2015),
    so the weight between this and the label loss means the same at every T.
    """
    student = jnp.asarray(student_logits, jnp.float32) / temperature
    teacher = jnp.asarray(teacher_logits, jnp.float32) / temperature
    log_q = jax.nn.log_softmax(teacher, axis=-1)
    log_p = jax.nn.log_softmax(student, axis=-1)
    per_example = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1) * temperature**2
    return _reduce(per_example, weights, reduction)


def distilled_loss(
    label_loss: jax.Array,
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    weight: float,
    temperature: float,
) -> jax.Array:
    """``(1 - weight) * label_loss + weight * distillation_kl(...)``, averaged over the batch
    (config.distill: weight 1 learns from the teacher alone, as function matching does)."""
    kl = distillation_kl(student_logits, teacher_logits, temperature)
    return (1.0 - weight) * jnp.asarray(label_loss, jnp.float32) + weight * kl
