"""Resizing position embeddings to another patch grid (fine-tuning at a new resolution).

The class-token slot is kept as is; the patch grid is interpolated. Bilinear (corner-aligned,
as `scipy.ndimage.zoom(order=1)`) is what the ViT release and big_vision did; bicubic (Keys
a=-0.5, half-pixel centres, antialiased when shrinking) is timm's.
"""

from __future__ import annotations

import math

import numpy as np

INTERPOLATIONS = ("bilinear", "bicubic")


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """Corner-aligned linear interpolation, as `scipy.ndimage.zoom(order=1)` (the release)."""
    coords = np.linspace(0.0, n_in - 1.0, n_out)
    weights = np.zeros((n_out, n_in))
    if n_in == 1:
        weights[:, 0] = 1.0
        return weights
    low = np.minimum(np.floor(coords).astype(int), n_in - 2)
    frac = coords - low
    rows = np.arange(n_out)
    weights[rows, low] = 1.0 - frac
    weights[rows, low + 1] += frac
    return weights


def _cubic_kernel(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _cubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """Keys bicubic (a=-0.5), half-pixel centres, antialiased when shrinking, renormalised
    at the borders: the same as `jax.image.resize(..., 'bicubic')` and PIL/timm."""
    scale = n_out / n_in
    kernel_scale = max(1.0 / scale, 1.0)
    centres = (np.arange(n_out) + 0.5) / scale - 0.5
    weights = _cubic_kernel((np.arange(n_in)[None, :] - centres[:, None]) / kernel_scale)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_posemb(
    posemb: np.ndarray,
    new_grid: tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
    method: str = "bilinear",
) -> np.ndarray:
    """Resizes a (1, prefix + gh*gw, D) position embedding to `new_grid`, prefix kept as is.

    `method='bilinear'` is what the ViT release and big_vision did (`scipy.ndimage.zoom`,
    order 1, corner-aligned); `'bicubic'` is timm's choice (half-pixel, antialiased). The old
    grid defaults to a square. Resizing to the same grid returns the input unchanged.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"unknown posemb interpolation {method!r}; valid: {list(INTERPOLATIONS)}")
    posemb = np.asarray(posemb)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"expected a position embedding of shape (1, N, D), got {posemb.shape}")
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    if old_grid is None:
        side = math.isqrt(grid.shape[0])
        if side * side != grid.shape[0]:
            raise ValueError(
                f"cannot infer the grid of a position embedding with {grid.shape[0]} patch "
                f"tokens (not a square); pass old_grid"
            )
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != grid.shape[0]:
        raise ValueError(f"old_grid {old_grid} does not match {grid.shape[0]} patch tokens")
    if old_grid == new_grid:
        return posemb
    weights = _linear_weights if method == "bilinear" else _cubic_weights
    rows = weights(old_grid[0], new_grid[0])
    cols = weights(old_grid[1], new_grid[1])
    grid = grid.reshape(*old_grid, -1).astype(np.float64)
    resized = np.einsum("ph,qw,hwd->pqd", rows, cols, grid).astype(posemb.dtype)
    return np.concatenate([prefix, resized.reshape(1, new_grid[0] * new_grid[1], -1)], axis=1)
