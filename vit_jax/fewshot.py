"""Few-shot linear evaluation of frozen features (the ViT paper's "few-shot accuracy").

For each k in ``shots``, k training examples per class are drawn deterministically, the
features are standardized with that sample's per-dimension mean and std, and a closed-form
ridge regression maps them to {-1, +1} one-hot targets; test accuracy is the argmax hit rate.

The regularizer is fixed (default ``2**10``, as in the paper's setup) rather than tuned: a
k-shot task has no validation data, tuning on the test set would be optimistic, and the
standardization makes one value usable across feature widths and models. It runs on the host
in float64 NumPy (tiny systems: at most ``k * classes`` rows or ``dim`` columns).

A class with fewer than k examples among those read refuses the run (``check_shots``, called
before training) rather than drawing fewer shots: an accuracy logged as "k-shot" must come
from k examples of every class, and silently using fewer would make numbers incomparable
across runs and datasets, while failing at the first few-shot evaluation would throw away
the training done until then. The one-line message names the dataset, the class and its
count, and the two fixes (more examples read, or fewer shots).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vit_jax.errors import UserError

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


class NotEnoughShotsError(UserError, ValueError):
    """A class of a few-shot dataset has fewer examples than the largest shot count."""


def check_shots(
    labels: np.ndarray,
    num_classes: int,
    shots: Sequence[int],
    *,
    dataset: str,
    split: str = "train",
    max_examples: int | None = None,
) -> None:
    """Raises `NotEnoughShotsError` unless every class 0..num_classes-1 has max(shots) labels.

    ``labels`` are those of the examples the shots are drawn from; the message names the
    class with the fewest (and how many others are short).
    """
    if not len(shots):
        return
    k = max(int(s) for s in shots)
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    short = np.flatnonzero(counts < k)
    if not len(short):
        return
    worst = int(short[np.argmin(counts[short])])
    others = f" (and {len(short) - 1} other classes)" if len(short) > 1 else ""
    bounded = bool(max_examples) and len(labels) >= max_examples  # the split has more
    where = (
        f"the {len(labels)} examples read from split {split!r} "
        f"(config.fewshot.max_train_examples={max_examples})"
        if bounded
        else f"split {split!r} ({len(labels)} examples)"
    )
    fix = "raise config.fewshot.max_train_examples or " if bounded else ""
    raise NotEnoughShotsError(
        f"few-shot dataset {dataset!r}: class {worst}{others} has {int(counts[worst])} "
        f"example(s) in {where}, fewer than the {k} shots asked; "
        f"{fix}lower config.fewshot.shots"
    )


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
