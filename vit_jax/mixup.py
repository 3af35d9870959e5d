"""On-device Mixup / CutMix for use inside a jitted train step.

One mixing coefficient per batch (drawn from Beta(alpha, alpha)); every example is mixed
with its neighbour in the batch (``jnp.roll`` by one along the batch axis), which under a
sharded batch is a cheap collective permute rather than a gather. Labels are mixed with the
same weights, so normalized labels stay normalized.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _partner(x: jax.Array) -> jax.Array:
    return jnp.roll(x, shift=1, axis=0)


def _mix_labels(labels: jax.Array, lam: jax.Array) -> jax.Array:
    labels_f = labels.astype(jnp.float32)
    return lam * labels_f + (1.0 - lam) * _partner(labels_f)


def _mixup(
    rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
    """Blends whole images: ``x = lam * x + (1 - lam) * x_partner``."""
    lam = jax.random.beta(rng, alpha, alpha)
    mixed = lam * images.astype(jnp.float32) + (1.0 - lam) * _partner(images).astype(jnp.float32)
    return mixed.astype(images.dtype), _mix_labels(labels, lam)


def cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array) -> jax.Array:
    """A (height, width) boolean box covering about ``1 - lam`` of the image.

    Box side ``floor(side * sqrt(1 - lam))`` around a uniformly drawn centre, clipped to the
    image (so the real area can be smaller; the label weight uses the real area).
    """
    ky, kx = jax.random.split(rng)
    cut = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut).astype(jnp.int32)
    cut_w = jnp.floor(width * cut).astype(jnp.int32)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    y1 = jnp.clip(cy - cut_h // 2, 0, height)
    y2 = jnp.clip(cy + cut_h - cut_h // 2, 0, height)
    x1 = jnp.clip(cx - cut_w // 2, 0, width)
    x2 = jnp.clip(cx + cut_w - cut_w // 2, 0, width)
    rows = jnp.arange(height)
    cols = jnp.arange(width)
    in_rows = (rows >= y1) & (rows < y2)
    in_cols = (cols >= x1) & (cols < x2)
    return in_rows[:, None] & in_cols[None, :]


def _cutmix(
    rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
    """Pastes a box of the partner image; label weight = fraction of own pixels kept."""
    k_lam, k_box = jax.random.split(rng)
    lam = jax.random.beta(k_lam, alpha, alpha)
    height, width = images.shape[1], images.shape[2]
    box = cutmix_box(k_box, height, width, lam)
    mixed = jnp.where(box[None, :, :, None], _partner(images), images)
    lam_actual = 1.0 - jnp.mean(box.astype(jnp.float32))
    return mixed, _mix_labels(labels, lam_actual)


def mix_batch(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """Applies Mixup or CutMix to a batch of NHWC ``images`` and dense float ``labels``.

    ``mixup_alpha`` / ``cutmix_alpha`` are static Python floats; 0 turns that method off and
    with both off the inputs are returned unchanged (no random numbers drawn). With both on,
    CutMix is used with probability ``switch_prob`` (one choice per batch). Returned labels
    are float32; Mixup keeps the images' dtype (use float images).
    """
    mixup_alpha = float(mixup_alpha)
    cutmix_alpha = float(cutmix_alpha)
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"alphas must be >= 0, got mixup={mixup_alpha}, cutmix={cutmix_alpha}.")
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC, got shape {images.shape}.")
    if mixup_alpha > 0 and not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"Mixup needs float images, got {images.dtype}.")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return images, labels
    if cutmix_alpha == 0:
        return _mixup(rng, images, labels, mixup_alpha)
    if mixup_alpha == 0:
        return _cutmix(rng, images, labels, cutmix_alpha)
    k_switch, k_mix = jax.random.split(rng)
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
    return jax.lax.cond(
        use_cutmix,
        lambda: _cutmix(k_mix, images, labels, cutmix_alpha),
        lambda: _mixup(k_mix, images, labels, mixup_alpha),
    )
