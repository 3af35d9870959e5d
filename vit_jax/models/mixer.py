"""MLP-Mixer ("MLP-Mixer: An all-MLP Architecture for Vision", Tolstikhin et al.), in Flax NNX.

Patch stem (a strided conv), blocks of token-mixing and channel-mixing MLPs with pre-LayerNorm
and residuals, a final LayerNorm, global average pooling and a head. Same call API as the
`VisionTransformer`; parameter shapes follow the public Mixer `.npz` layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import layers, vit
from vit_jax.models.layers import ActivationSharding, Dense, LayerNorm, constrain

TOKENS = vit.TOKENS


class MixerMlp(nnx.Module):
    """Dense -> GELU -> dropout -> Dense -> dropout over the last axis."""

    def __init__(
        self,
        features: int,
        hidden: int,
        *,
        axes: tuple[str, str],
        dropout: float,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        self.dropout = dropout
        common = dict(
            rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_init=layers.lecun_normal()
        )
        self.fc1 = Dense((features,), (hidden,), axes=axes, **common)
        self.fc2 = Dense((hidden,), (features,), axes=axes[::-1], **common)

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        h = layers.gelu(self.fc1(x))
        h = layers.dropout(h, self.dropout, train=train, rngs=rngs)
        return layers.dropout(self.fc2(h), self.dropout, train=train, rngs=rngs)


class MixerBlock(nnx.Module):
    """x + TokenMLP(LN(x)) over the patch axis, then x + ChannelMLP(LN(x)) over channels."""

    def __init__(
        self,
        num_tokens: int,
        width: int,
        tokens_mlp_dim: int,
        channels_mlp_dim: int,
        *,
        rngs: nnx.Rngs,
        dropout: float = 0.0,
        activation_sharding: ActivationSharding | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        self.activation_sharding = activation_sharding
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(width, **common)
        self.token_mixing = MixerMlp(
            num_tokens, tokens_mlp_dim, axes=("tokens", "mlp"), dropout=dropout, **common
        )
        self.norm2 = LayerNorm(width, **common)
        self.channel_mixing = MixerMlp(
            width, channels_mlp_dim, axes=("embed", "mlp"), dropout=dropout, **common
        )

    def __call__(
        self,
        x: jax.Array,
        drop_path_rate: jax.Array | float = 0.0,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        x = constrain(x, TOKENS, self.activation_sharding)
        y = jnp.swapaxes(self.norm1(x), 1, 2)  # (B, D, N): mix along the patches
        y = jnp.swapaxes(self.token_mixing(y, train=train, rngs=rngs), 1, 2)
        x = x + layers.drop_path(y, drop_path_rate, train=train, rngs=rngs)
        y = self.channel_mixing(self.norm2(x), train=train, rngs=rngs)
        x = x + layers.drop_path(y, drop_path_rate, train=train, rngs=rngs)
        return constrain(x, TOKENS, self.activation_sharding)


class MlpMixer(nnx.Module):
    """MLP-Mixer classifier. `model(images)` gives logits (features when num_classes=0)."""

    def __init__(
        self,
        *,
        patch_size: int,
        width: int,
        depth: int,
        tokens_mlp_dim: int,
        channels_mlp_dim: int,
        num_classes: int = 1000,
        img_size: int | tuple[int, int] = 224,
        in_channels: int = 3,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        dtype: Any = None,
        param_dtype: Any = "float32",
        head_zero_init: bool = True,
        head_bias_init: float = 0.0,
        activation_sharding: ActivationSharding | None = None,
        rngs: nnx.Rngs,
    ):
        dtype, param_dtype = vit.as_dtype(dtype), vit.as_dtype(param_dtype)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        for size in self.img_size:
            if size % patch_size:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch {patch_size}")
        self.patch_size = patch_size
        self.width, self.depth, self.num_classes = width, depth, num_classes
        self.dropout, self.drop_path_rate = dropout, drop_path
        self.dtype = dtype
        self.activation_sharding = activation_sharding
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        num_tokens = self.grid[0] * self.grid[1]
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.stem = layers.Conv(
            in_channels,
            width,
            patch_size,
            strides=patch_size,
            axes=("conv_height", "conv_width", "conv_in", "embed"),
            **common,
        )
        self.blocks = nnx.List(
            [
                MixerBlock(
                    num_tokens,
                    width,
                    tokens_mlp_dim,
                    channels_mlp_dim,
                    dropout=dropout,
                    activation_sharding=activation_sharding,
                    **common,
                )
                for _ in range(depth)
            ]
        )
        self.pre_head_layer_norm = LayerNorm(width, **common)
        self.head_bias_init = head_bias_init  # a replaced head (fine-tuning) starts from it
        self.head = layers.classifier_head(
            width,
            num_classes,
            in_axis="embed",
            zero_init=head_zero_init,
            bias=head_bias_init,
            **common,
        )

    def embed(self, images: jax.Array) -> jax.Array:
        """Images (B, H, W, C) -> patch tokens (B, N, D)."""
        x = images if self.dtype is None else images.astype(self.dtype)
        x = self.stem(x)
        batch, grid_h, grid_w, width = x.shape
        if (grid_h, grid_w) != self.grid:
            raise ValueError(
                f"images of {images.shape[1:3]} give a {grid_h}x{grid_w} patch grid; the Mixer "
                f"was built for img_size={self.img_size} ({self.grid[0]}x{self.grid[1]}) and "
                "its token-mixing weights fix the number of patches"
            )
        return constrain(x.reshape(batch, grid_h * grid_w, width), TOKENS, self.activation_sharding)

    def forward_features(
        self,
        images: jax.Array,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
        return_intermediates: bool = False,
        return_attention: bool = False,
    ) -> dict[str, jax.Array]:
        """`tokens` (after the final norm), `pooled` (their mean), `pre_logits` (= pooled), and
        on request `intermediates` (depth, B, N, D)."""
        if return_attention:
            raise ValueError("MLP-Mixer has no attention weights; use return_attention=False")
        x = self.embed(images)
        x = layers.dropout(x, self.dropout, train=train, rngs=rngs)
        # Python floats, rising linearly over depth: a rate of 0 draws no random bits.
        top, steps = float(self.drop_path_rate), max(self.depth - 1, 1)
        rates = [top * i / steps for i in range(self.depth)] if self.depth > 1 else [top]
        use_rngs = rngs if train else None
        outputs = []
        for block, rate in zip(self.blocks, rates, strict=True):
            x = block(x, rate, train=train, rngs=use_rngs)
            outputs.append(x)
        tokens = self.pre_head_layer_norm(x)
        pooled = jnp.mean(tokens, axis=1)
        out = {"tokens": tokens, "pooled": pooled, "pre_logits": pooled}
        if return_intermediates:
            out["intermediates"] = jnp.stack(outputs)
        return out

    def __call__(
        self, images: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        features = self.forward_features(images, train=train, rngs=rngs)["pre_logits"]
        return features if self.head is None else self.head(features)

    def npz_names(self, layout: str = "original") -> dict[str, str]:
        """Maps each parameter path ('/'-joined) to its key in the public Mixer `.npz`."""
        if layout != "original":
            raise ValueError(f"unknown Mixer npz layout {layout!r}; valid: ['original']")
        block_parts = {
            "norm1": "LayerNorm_0",
            "token_mixing/fc1": "token_mixing/Dense_0",
            "token_mixing/fc2": "token_mixing/Dense_1",
            "norm2": "LayerNorm_1",
            "channel_mixing/fc1": "channel_mixing/Dense_0",
            "channel_mixing/fc2": "channel_mixing/Dense_1",
        }
        top_parts = {"stem": "stem", "pre_head_layer_norm": "pre_head_layer_norm", "head": "head"}
        names = {}
        for path in vit.param_paths(self):
            parts = path.split("/")
            if parts[0] == "blocks":
                names[path] = f"MixerBlock_{parts[1]}/" + vit._rename(parts[2:], block_parts)
            else:
                names[path] = vit._rename(parts, top_parts)
        return names
