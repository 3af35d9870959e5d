"""Few-shot linear evaluation of frozen features (the ViT paper's "few-shot accuracy").

For each k in ``shots``, k training examples per class are drawn deterministically, the
features are standardized with that sample's per-dimension mean and std, and a closed-form
ridge regression maps them to {-1, +1} one-hot targets; test accuracy is the argmax hit rate.

The regularizer is fixed (default ``2**10``, as in the paper's setup) rather than tuned: a
k-shot task has no validation data, tuning on the test set would be optimistic, and the
standardization makes one value usable across feature widths and models. It runs on the host
in float64 NumPy (tiny systems: at most ``k * classes`` rows or ``dim`` columns).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2_REG = 2.0**10


def fit_ridge(
    features: np.ndarray, targets: np.ndarray, l2_reg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unregularized bias: returns ``(weights, bias)``.

    Minimizes ``||X w + 1 b^T - Y||^2 + l2_reg ||w||^2``. Centring X and Y removes the bias;
    then ``w = (Xc^T Xc + l2 I)^-1 Xc^T Yc`` (primal, n >= d) or the equal dual form
    ``w = Xc^T (Xc Xc^T + l2 I)^-1 Yc`` (n < d), and ``b = mean(Y) - mean(X) w``.
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    if l2_reg <= 0:
        raise ValueError(f"l2_reg must be > 0, got {l2_reg}.")
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    n, d = xc.shape
    if n >= d:
        w = np.linalg.solve(xc.T @ xc + l2_reg * np.eye(d), xc.T @ yc)
    else:
        w = xc.T @ np.linalg.solve(xc @ xc.T + l2_reg * np.eye(n), yc)
    return w, y_mean - x_mean @ w


def sample_shots(labels: np.ndarray, shots: int, seed: int = 0) -> np.ndarray:
    """Indices of ``shots`` examples per class, deterministic in ``seed``.

    Each class's indices are permuted once per seed and the first k are taken, so the k-shot
    sets are nested (the 5-shot set contains the 1-shot set). Raises ValueError when a class
    has fewer than k examples.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if len(idx) < shots:
            raise ValueError(f"Class {cls} has only {len(idx)} examples, {shots} shots asked.")
        picked.append(idx[:shots])
    return np.concatenate(picked)


def fewshot_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    shots: Sequence[int] = DEFAULT_SHOTS,
    *,
    l2_reg: float = DEFAULT_L2_REG,
    seed: int = 0,
) -> dict[int, float]:
    """Few-shot ridge-regression accuracy on the test set for each k in ``shots``.

    Features are (n, d) arrays (e.g. pre-logits), labels int class ids. Classes are those
    present in ``train_labels``; a test example of another class always counts as wrong.
    """
    train_features = np.asarray(train_features, np.float64)
    test_features = np.asarray(test_features, np.float64)
    train_labels = np.asarray(train_labels).astype(np.int64)
    test_labels = np.asarray(test_labels).astype(np.int64)
    classes = np.unique(train_labels)
    results = {}
    for k in shots:
        idx = sample_shots(train_labels, int(k), seed)
        x, y = train_features[idx], train_labels[idx]
        mean, std = x.mean(axis=0), x.std(axis=0) + 1e-5
        targets = 2.0 * (y[:, None] == classes[None, :]) - 1.0
        w, b = fit_ridge((x - mean) / std, targets, l2_reg)
        scores = ((test_features - mean) / std) @ w + b
        preds = classes[np.argmax(scores, axis=1)]
        results[int(k)] = float(np.mean(preds == test_labels))
    return results
