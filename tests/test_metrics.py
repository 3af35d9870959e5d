"""Tests for vit_jax.eval_counts against NumPy references, including a padded batch."""

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import eval_counts


def np_counts(logits, labels, mask):
    top1 = logits.argmax(-1)
    hit1 = labels[np.arange(len(labels)), top1] > 0
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    hit5 = (np.take_along_axis(labels, top5, axis=-1) > 0).any(-1)
    ls = logits - logits.max(-1, keepdims=True)
    logp = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
    loss = -(labels * logp).sum(-1)
    return {
        "correct_top1": (hit1 * mask).sum(),
        "correct_top5": (hit5 * mask).sum(),
        "loss_sum": (loss * mask).sum(),
        "count": mask.sum(),
    }


def test_counts_match_numpy_with_padding():
    rng = np.random.default_rng(0)
    b, c = 16, 12
    logits = rng.normal(size=(b, c)).astype(np.float32)
    labels = np.eye(c, dtype=np.float32)[rng.integers(0, c, b)]
    mask = np.ones(b, np.float32)
    mask[-5:] = 0.0
    logits[-5:] = 0.0
    got = jax.jit(eval_counts.classification_counts)(logits, labels, mask)
    ref = np_counts(logits.astype(np.float64), labels, mask)
    for k, v in ref.items():
        np.testing.assert_allclose(float(got[k]), v, rtol=1e-5, err_msg=k)
    assert float(got["count"]) == 11.0
    # Padding rows (even correct ones) add nothing.
    labels_fake = labels.copy()
    labels_fake[-5:] = 1.0
    got2 = eval_counts.classification_counts(logits, labels_fake, mask)
    np.testing.assert_allclose(float(got2["correct_top1"]), float(got["correct_top1"]))


def test_multihot_real_labels_and_small_class_count():
    logits = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [1.0, 0.0, 2.0]], np.float32)
    # ReaL-style: several correct labels, or none (an all-zero row is never correct).
    labels = np.array([[0, 0, 1], [1, 1, 0], [0, 0, 0]], np.float32)
    got = eval_counts.classification_counts(logits, labels, np.ones(3), loss_name=None)
    assert float(got["correct_top1"]) == 1.0  # only row 1 (argmax 1, label 1)
    assert float(got["correct_top5"]) == 2.0  # C=3 < 5: top-3 covers everything but row 2
    assert "loss_sum" not in got


def test_accumulate_and_finalize():
    rng = np.random.default_rng(1)
    total = None
    all_logits, all_labels = [], []
    for _ in range(3):
        logits = rng.normal(size=(8, 10)).astype(np.float32)
        labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)]
        all_logits.append(logits)
        all_labels.append(labels)
        total = eval_counts.add_counts(
            total,
            eval_counts.classification_counts(
                jnp.asarray(logits), jnp.asarray(labels), jnp.ones(8), "sigmoid_xent"
            ),
        )
    out = eval_counts.finalize(total)
    logits, labels = np.concatenate(all_logits), np.concatenate(all_labels)
    np.testing.assert_allclose(
        out["top1"], np.mean(labels[np.arange(24), logits.argmax(-1)]), rtol=1e-6
    )
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    ref_loss = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).sum(-1).mean()
    np.testing.assert_allclose(out["loss"], ref_loss, rtol=1e-5)
    assert out["count"] == 24.0 and 0.0 <= out["top1"] <= out["top5"] <= 1.0
    assert np.isnan(
        eval_counts.finalize({"correct_top1": 0.0, "correct_top5": 0.0, "count": 0.0})["top1"]
    )
