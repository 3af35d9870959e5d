"""Tests for vit_jax.fewshot on scikit-learn digits and against numpy.linalg.lstsq."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from vit_jax import fewshot


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm].astype(np.float32), y[perm]
    return x[:1000], y[:1000], x[1000:], y[1000:]


def test_digits_fewshot_accuracy(digits):
    acc = fewshot.fewshot_accuracy(*digits, shots=(1, 5, 10, 25))
    assert set(acc) == {1, 5, 10, 25}
    assert acc[10] > 0.7  # chance is 0.1
    assert acc[1] > 0.3
    assert acc[1] < acc[5] < acc[10]
    # Deterministic given the seed; another seed draws other shots.
    assert fewshot.fewshot_accuracy(*digits, shots=(1,)) == {1: acc[1]}
    assert fewshot.fewshot_accuracy(*digits, shots=(1,), seed=1)[1] != acc[1]


@pytest.mark.parametrize("n,d", [(12, 30), (40, 7)])  # dual (n < d) and primal (n >= d)
def test_ridge_matches_lstsq_on_augmented_system(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)) * 3 + 1
    y = 2.0 * np.eye(4)[rng.integers(0, 4, n)] - 1.0
    lam = 2.5
    w, b = fewshot.fit_ridge(x, y, lam)
    # [X 1; sqrt(lam) I 0] [w; b] = [Y; 0] : ridge with an unregularized bias.
    a = np.block([[x, np.ones((n, 1))], [np.sqrt(lam) * np.eye(d), np.zeros((d, 1))]])
    rhs = np.vstack([y, np.zeros((d, 4))])
    sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
    np.testing.assert_allclose(w, sol[:d], atol=1e-4)
    np.testing.assert_allclose(b, sol[d], atol=1e-4)


def test_sample_shots_nested_and_balanced():
    labels = np.repeat(np.arange(3), 10)
    one, five = fewshot.sample_shots(labels, 1), fewshot.sample_shots(labels, 5)
    assert np.bincount(labels[five]).tolist() == [5, 5, 5]
    assert set(one) <= set(five)
    with pytest.raises(ValueError, match="only 10"):
        fewshot.sample_shots(labels, 11)
