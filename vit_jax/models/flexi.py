"""FlexiViT ("FlexiViT: One Model for All Patch Sizes", Beyer et al., CVPR 2023): one set of
ViT weights that runs at any patch size.

The parameters keep the shapes of one underlying patch size p0: a (p0, p0, C, D) patch
embedding kernel and a position embedding of the img/p0 grid. Running at patch size p:

- the kernel is PI-resized (`pi_resize_kernel`): with B the (p*p, p0*p0) matrix of bilinear
  resizing of a p0 x p0 patch to p x p (`resize_matrix`), the new kernel is
  w' = pinv(B^T) w. When p >= p0, B^T pinv(B^T) = I, so <B x, w'> = <x, w> for every patch
  x: the token of a patch upsampled by p/p0 equals the token of the patch itself. When
  p < p0 it is the least-squares best such kernel.
- the position embedding's grid is resized bilinearly to the new grid
  (`resize_posemb_grid`); the class token's slot is kept (register tokens have none).

B and pinv(B^T) depend only on (p0, p): they are computed once on the host, in float32, when
a step is traced, and enter the compiled program as constants. Training draws each step's
patch size from the listed ones (`patch_size_at`), from the seed and the step alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def resize_matrix(old: int, new: int) -> np.ndarray:
    """B, shape (new*new, old*old), float32: `B @ x.ravel()` is `jax.image.resize` of an
    old x old patch x to new x new, bilinear (half-pixel centres; a triangle filter widened
    to the scale when shrinking). Built from the resized basis patches, on the host."""
    with jax.ensure_compile_time_eval():
        basis = jnp.eye(old * old, dtype=jnp.float32).reshape(old * old, old, old)
        resized = jax.image.resize(basis, (old * old, new, new), "bilinear")
    matrix = np.asarray(resized, np.float32).reshape(old * old, new * new).T
    matrix.flags.writeable = False
    return matrix


@functools.cache
def pi_resize_matrix(old: int, new: int) -> np.ndarray:
    """pinv(B^T), shape (new*new, old*old), float32: maps a flattened old x old kernel to the
    new x new one (pinv computed in float64, then rounded)."""
    matrix = np.linalg.pinv(resize_matrix(old, new).T.astype(np.float64)).astype(np.float32)
    matrix.flags.writeable = False
    return matrix


def pi_resize_kernel(kernel: jax.Array, new: int) -> jax.Array:
    """A (p0, p0, C, D) patch-embedding kernel PI-resized to (new, new, C, D), in float32
    (the input itself when new == p0)."""
    old, width, channels, out = kernel.shape
    if old != width:
        raise ValueError(f"PI-resize needs a square kernel, got {kernel.shape}")
    if new == old:
        return kernel
    matrix = jnp.asarray(pi_resize_matrix(old, new))
    flat = kernel.astype(jnp.float32).reshape(old * old, channels, out)
    resized = jnp.einsum("nm,mcd->ncd", matrix, flat, precision=jax.lax.Precision.HIGHEST)
    return resized.reshape(new, new, channels, out)


def resize_posemb_grid(
    posemb: jax.Array,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
) -> jax.Array:
    """A (1, prefix + gh*gw, D) position embedding with its grid resized bilinearly
    (`jax.image.resize`) to `new_grid`, in float32; the prefix (class) slots kept as they are.
    The input itself when the grids are equal."""
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return posemb
    width = posemb.shape[-1]
    posemb = posemb.astype(jnp.float32)
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    grid = grid.reshape(1, *old_grid, width)
    grid = jax.image.resize(grid, (1, *new_grid, width), "bilinear")
    return jnp.concatenate([prefix, grid.reshape(1, new_grid[0] * new_grid[1], width)], axis=1)


def patch_size_at(patch_sizes: Sequence[int], seed: int, step: int) -> int:
    """The patch size of train step `step` (the step that makes the state's step `step`):
    uniform over `patch_sizes`, a function of (seed, step) alone, so that a resumed run
    draws the same sizes as the uninterrupted one."""
    rng = np.random.default_rng([seed % 2**32, step])
    return int(patch_sizes[int(rng.integers(len(patch_sizes)))])
