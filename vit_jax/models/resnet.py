"""The ResNet (v2-style bottleneck) stem of the hybrid ViTs ("R50+ViT-B/16", ...).

As in the public ViT release: weight-standardised convolutions without bias, GroupNorm with
32 groups, a 7x7/2 root conv and 3x3/2 max-pool, then stages of bottleneck units (the first
stage at stride 1, later ones at stride 2). Attribute names follow the release's parameter
names (`conv_root`, `gn_root`, `block{s}/unit{u}/conv1`, ...), so checkpoint keys are the
parameter paths themselves.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import layers

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
# The release standardises kernels as (w - mean) / (std + 1e-5) and uses flax's GroupNorm
# default epsilon (1e-6); both are kept so that released weights give released outputs.
WS_EPSILON = 1e-5
GN_EPSILON = 1e-6
GN_GROUPS = 32

_NPZ_PATTERN = re.compile(
    r"(conv_root/kernel|gn_root/(scale|bias)"
    r"|block\d+/unit\d+/(conv[123]|conv_proj)/kernel"
    r"|block\d+/unit\d+/(gn[123]|gn_proj)/(scale|bias))"
)


def standardize_kernel(kernel: jax.Array, epsilon: float = WS_EPSILON) -> jax.Array:
    """Standardises each output filter of an HWIO kernel over (H, W, in), in float32."""
    w = kernel.astype(jnp.float32)
    w = w - jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    return w / (jnp.std(w, axis=(0, 1, 2), keepdims=True) + epsilon)


class StdConv(layers.Conv):
    """A bias-free convolution whose kernel is weight-standardised at every call."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        rngs: nnx.Rngs,
        strides: int = 1,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            rngs=rngs,
            strides=strides,
            padding="SAME",
            use_bias=False,
            axes=CONV_AXES,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.convolve(x, standardize_kernel(self.kernel[...]))


class GroupNorm(nnx.Module):
    """GroupNorm over (H, W, channels-in-group) of NHWC inputs; statistics in float32."""

    def __init__(
        self,
        channels: int,
        *,
        rngs: nnx.Rngs,
        num_groups: int = GN_GROUPS,
        epsilon: float = GN_EPSILON,
        scale_init: layers.Initializer = layers.ones,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        if channels % num_groups:
            raise ValueError(f"{channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = layers.make_param(rngs, scale_init, (channels,), ("conv_out",), param_dtype)
        self.bias = layers.make_param(rngs, layers.zeros, (channels,), ("conv_out",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        *lead, channels = x.shape
        x32 = x.astype(jnp.float32).reshape(*lead, self.num_groups, channels // self.num_groups)
        axes = tuple(range(1, x32.ndim - 2)) + (x32.ndim - 1,)
        y = layers.standardize(x32, axes, self.epsilon).reshape(x.shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class BottleneckUnit(nnx.Module):
    """conv1x1 -> GN -> relu -> conv3x3(stride) -> GN -> relu -> conv1x1 -> GN, + residual."""

    def __init__(
        self,
        in_channels: int,
        features: int,
        *,
        strides: int,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        out_channels = 4 * features
        if in_channels != out_channels or strides != 1:
            self.conv_proj = StdConv(in_channels, out_channels, 1, strides=strides, **common)
            self.gn_proj = GroupNorm(out_channels, **common)
        else:
            self.conv_proj = self.gn_proj = None
        self.conv1 = StdConv(in_channels, features, 1, **common)
        self.gn1 = GroupNorm(features, **common)
        self.conv2 = StdConv(features, features, 3, strides=strides, **common)
        self.gn2 = GroupNorm(features, **common)
        self.conv3 = StdConv(features, out_channels, 1, **common)
        # Zero scale: every unit starts as (almost) the identity on its residual path.
        self.gn3 = GroupNorm(out_channels, scale_init=layers.zeros, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x if self.conv_proj is None else self.gn_proj(self.conv_proj(x))
        y = jax.nn.relu(self.gn1(self.conv1(x)))
        y = jax.nn.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return jax.nn.relu(residual + y)


class ResNetStage(nnx.Module):
    """`num_units` bottleneck units named `unit1`, `unit2`, ...; the first one strides."""

    def __init__(
        self,
        num_units: int,
        in_channels: int,
        features: int,
        *,
        first_stride: int,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        self.num_units = num_units
        for u in range(1, num_units + 1):
            unit = BottleneckUnit(
                in_channels if u == 1 else 4 * features,
                features,
                strides=first_stride if u == 1 else 1,
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
            )
            setattr(self, f"unit{u}", unit)

    def __call__(self, x: jax.Array) -> jax.Array:
        for u in range(1, self.num_units + 1):
            x = getattr(self, f"unit{u}")(x)
        return x


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """3x3 max-pool at stride 2 with SAME padding (padded cells never win)."""
    init = jnp.array(-jnp.inf, x.dtype)
    return jax.lax.reduce_window(x, init, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")


class ResNetStem(nnx.Module):
    """Root conv + GN + relu + max-pool, then stages `block1..blockS` of bottleneck units.

    `layers` gives the units per stage, e.g. (3, 4, 9) for the R50 hybrids (stride 16) or
    (2, 2, 2, 2) for R26 (stride 32); `width` scales the 64 root channels (the release's
    `width_factor`). Maps NHWC images
    to a (B, H / stride, W / stride, out_channels) feature map.
    """

    def __init__(
        self,
        layers: Sequence[int],
        width: float = 1,
        *,
        rngs: nnx.Rngs,
        in_channels: int = 3,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        self.layers = tuple(int(n) for n in layers)
        if any(n < 1 for n in self.layers):
            raise ValueError(f"every ResNet stage needs at least one unit, got {self.layers}")
        base = int(64 * width)
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv_root = StdConv(in_channels, base, 7, strides=2, **common)
        self.gn_root = GroupNorm(base, **common)
        channels = base
        for s, num_units in enumerate(self.layers):
            features = base * 2**s
            stage = ResNetStage(
                num_units, channels, features, first_stride=1 if s == 0 else 2, **common
            )
            setattr(self, f"block{s + 1}", stage)
            channels = 4 * features
        self.out_channels = channels
        self.stride = 4 * 2 ** max(len(self.layers) - 1, 0)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.gn_root(self.conv_root(x)))
        x = max_pool_3x3_s2(x)
        for s in range(1, len(self.layers) + 1):
            x = getattr(self, f"block{s}")(x)
        return x

    @staticmethod
    def npz_name(parts: Sequence[str]) -> str:
        """The release's key for a stem parameter path (parts after the leading 'stem')."""
        key = "/".join(str(p) for p in parts)
        if not _NPZ_PATTERN.fullmatch(key):
            raise KeyError(f"no public name for stem parameter {key}")
        return key
