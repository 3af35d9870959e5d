"""Tests for vit_jax.losses against NumPy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import losses


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def make_batch(seed=0, b=6, c=5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, c)) * 3
    onehot = np.eye(c)[rng.integers(0, c, b)]
    multihot = (rng.random((b, c)) < 0.4).astype(np.float64)
    return logits, onehot, multihot


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_xent_matches_numpy(smoothing):
    logits, onehot, _ = make_batch()
    # Mixed (mixup-style) labels as well as one-hot.
    mixed = 0.7 * onehot + 0.3 * np.roll(onehot, 1, axis=0)
    for labels in (onehot, mixed):
        y = labels * (1 - smoothing) + smoothing / labels.shape[1]
        ref = -(y * np_log_softmax(logits)).sum(-1)
        got = losses.softmax_cross_entropy(
            jnp.asarray(logits), jnp.asarray(labels), label_smoothing=smoothing
        )
        np.testing.assert_allclose(float(got), ref.mean(), rtol=1e-5)
        per_ex = losses.softmax_cross_entropy(logits, labels, smoothing, reduction="none")
        np.testing.assert_allclose(np.asarray(per_ex), ref, rtol=1e-5)


def test_sigmoid_xent_sums_classes_means_batch():
    logits, _, multihot = make_batch(1)
    p = 1 / (1 + np.exp(-logits))
    ref = -(multihot * np.log(p) + (1 - multihot) * np.log(1 - p)).sum(-1)
    got = losses.sigmoid_cross_entropy(jnp.asarray(logits), jnp.asarray(multihot))
    np.testing.assert_allclose(float(got), ref.mean(), rtol=1e-5)
    # Stable for huge logits (no inf / nan).
    big = losses.sigmoid_cross_entropy(jnp.asarray([[100.0, -100.0]]), jnp.asarray([[0.0, 1.0]]))
    np.testing.assert_allclose(float(big), 200.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["softmax_xent", "sigmoid_xent"])
def test_weights_mask_padding(name):
    logits, onehot, _ = make_batch(2)
    fn = losses.get_loss_fn(name)
    mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
    # Garbage in padded rows must not matter.
    logits_pad = logits.copy()
    logits_pad[4:] = 1e4
    got = fn(jnp.asarray(logits_pad), jnp.asarray(onehot), weights=jnp.asarray(mask))
    ref = fn(jnp.asarray(logits[:4]), jnp.asarray(onehot[:4]))
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    summed = fn(jnp.asarray(logits_pad), jnp.asarray(onehot), weights=mask, reduction="sum")
    np.testing.assert_allclose(float(summed), 4 * float(ref), rtol=1e-6)


def test_bf16_logits_computed_in_float32():
    logits, onehot, _ = make_batch(3)
    lb = jnp.asarray(logits, jnp.bfloat16)
    got = losses.softmax_cross_entropy(lb, jnp.asarray(onehot, jnp.bfloat16))
    assert got.dtype == jnp.float32
    ref = -(onehot * np_log_softmax(np.asarray(lb.astype(jnp.float32), np.float64))).sum(-1)
    np.testing.assert_allclose(float(got), ref.mean(), rtol=1e-6)


def test_get_loss_fn_errors():
    assert losses.get_loss_fn("softmax_xent") is losses.softmax_cross_entropy
    with pytest.raises(ValueError, match="softmax_xent.*sigmoid_xent"):
        losses.get_loss_fn("xent")
    with pytest.raises(ValueError, match="reduction"):
        losses.softmax_cross_entropy(jnp.zeros((1, 2)), jnp.ones((1, 2)), reduction="avg")
