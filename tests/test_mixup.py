"""Tests for vit_jax.mixup (Mixup / CutMix inside jit)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import mixup

B, H, W, C, K = 4, 8, 6, 3, 5


def constant_batch():
    """Image i is filled with the value i + 1; label i is class i (all distinct)."""
    images = jnp.broadcast_to(jnp.arange(1.0, B + 1.0)[:, None, None, None], (B, H, W, C))
    labels = jax.nn.one_hot(jnp.arange(B), K)
    return images, labels


def jitted(**alphas):
    return jax.jit(functools.partial(mixup.mix_batch, **alphas))


def test_identity_when_off():
    images, labels = constant_batch()
    out_img, out_lab = mixup.mix_batch(
        jax.random.key(0), images, labels, mixup_alpha=0.0, cutmix_alpha=0.0
    )
    assert out_img is images and out_lab is labels


def test_mixup_blends_with_rolled_partner():
    images, labels = constant_batch()
    out_img, out_lab = jitted(mixup_alpha=0.4, cutmix_alpha=0.0)(jax.random.key(1), images, labels)
    out_img, out_lab = np.asarray(out_img), np.asarray(out_lab)
    np.testing.assert_allclose(out_lab.sum(-1), 1.0, rtol=1e-6)
    lam = out_lab[0, 0]
    assert 0.0 <= lam <= 1.0
    partner = np.roll(np.arange(B), 1)
    for i in range(B):
        np.testing.assert_allclose(out_lab[i, i], lam, rtol=1e-6)
        np.testing.assert_allclose(out_lab[i, partner[i]], 1 - lam, atol=1e-6)
        np.testing.assert_allclose(
            out_img[i], lam * (i + 1) + (1 - lam) * (partner[i] + 1), rtol=1e-5
        )


CUTMIX = jitted(mixup_alpha=0.0, cutmix_alpha=1.0)  # compiled once for all seeds


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_label_weight_is_pasted_area(seed):
    images, labels = constant_batch()
    out_img, out_lab = CUTMIX(jax.random.key(seed), images, labels)
    out_img, out_lab = np.asarray(out_img), np.asarray(out_lab)
    partner = np.roll(np.arange(B), 1)
    np.testing.assert_allclose(out_lab.sum(-1), 1.0, rtol=1e-6)
    for i in range(B):
        own = np.mean(out_img[i] == i + 1)
        pasted = np.mean(out_img[i] == partner[i] + 1)
        assert own + pasted == pytest.approx(1.0)  # pixels are copied, never blended
        np.testing.assert_allclose(out_lab[i, i], own, rtol=1e-6)
        np.testing.assert_allclose(out_lab[i, partner[i]], pasted, atol=1e-6)
    # Same box for the whole batch: pasted region is identical in every example.
    masks = [out_img[i, :, :, 0] != i + 1 for i in range(B)]
    for m in masks[1:]:
        np.testing.assert_array_equal(m, masks[0])


def test_cutmix_box_is_rectangle_of_expected_size():
    cutmix_box = jax.jit(mixup.cutmix_box, static_argnums=(1, 2))  # one compile, not one per op
    box = np.asarray(cutmix_box(jax.random.key(3), 100, 100, jnp.float32(0.75)))
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    # A filled axis-aligned rectangle, at most 50x50 (sqrt(1 - 0.75) * 100), clipped.
    assert box.sum() == len(rows) * len(cols)
    assert len(rows) <= 50 and len(cols) <= 50
    assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)


def test_deterministic_and_switch():
    images, labels = constant_batch()

    # One program for every switch probability: mix_batch only compares a uniform draw
    # with it, so it may as well be an argument (three constants would be three compiles).
    @jax.jit
    def switched(key, switch_prob):
        return mixup.mix_batch(
            key, images, labels, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=switch_prob
        )

    def fn(key):
        return switched(key, 0.5)

    a = fn(jax.random.key(7))
    b = fn(jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    c = fn(jax.random.key(8))
    assert not np.array_equal(np.asarray(a[1]), np.asarray(c[1]))

    def is_cutmix(img):  # CutMix only copies values; Mixup makes non-integer blends.
        img = np.asarray(img)
        return bool(np.all(img == np.round(img)))

    kinds = {is_cutmix(fn(jax.random.key(s))[0]) for s in range(12)}
    assert kinds == {True, False}
    for s in range(4):
        assert is_cutmix(switched(jax.random.key(s), 1.0)[0])  # always CutMix
        assert not is_cutmix(switched(jax.random.key(s), 0.0)[0])  # never


def test_bad_inputs():
    images, labels = constant_batch()
    with pytest.raises(ValueError, match="float"):
        mixup.mix_batch(
            jax.random.key(0), images.astype(jnp.uint8), labels, mixup_alpha=0.2, cutmix_alpha=0.0
        )
    with pytest.raises(ValueError, match=">= 0"):
        mixup.mix_batch(jax.random.key(0), images, labels, mixup_alpha=-1.0, cutmix_alpha=0.0)
