"""The Vision Transformer ("An Image is Worth 16x16 Words"), in Flax NNX.

Patch embedding (a strided conv, optionally after a ResNet stem for hybrids), class token,
position embedding, optional register tokens ("Vision Transformers Need Registers"),
optionally any patch size from one set of weights (FlexiViT, `patch_sizes`: models/flexi.py),
pre-LayerNorm encoder blocks (optionally one stacked block scanned over depth), final
LayerNorm, pooling (`tok`, `gap` or `map`), optional `pre_logits` layer and head. Parameter
shapes follow the public `.npz` layout so that weights convert by renaming.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax.models import flexi, layers
from vit_jax.models.layers import ActivationSharding, Dense, LayerNorm, constrain

POOL_TYPES = ("tok", "gap", "map")
POSEMB_TYPES = ("learn", "sincos2d")
ATTENTION_IMPLS = (None, "xla", "cudnn", "einsum")
TOKENS = ("batch", "tokens", "embed")


def as_dtype(value: Any) -> Any:
    """Turns 'bfloat16' / jnp.bfloat16 / None into a dtype (None stays None)."""
    return None if value is None else jnp.dtype(value)


def posemb_sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0):
    """Fixed 2-D sine-cosine position embedding of shape (1, grid_h * grid_w, width)."""
    if width % 4:
        raise ValueError(f"sincos2d position embedding needs a width divisible by 4, got {width}")
    y, x = np.mgrid[:grid_h, :grid_w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(table[None], jnp.float32)


class MlpBlock(nnx.Module):
    """Dense -> GELU -> dropout -> Dense -> dropout."""

    def __init__(self, width, mlp_dim, *, dropout, rngs, dtype=None, param_dtype=jnp.float32):
        self.dropout = dropout
        bias_init = nnx.initializers.normal(stddev=1e-6)
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, bias_init=bias_init)
        self.fc1 = Dense((width,), (mlp_dim,), axes=("embed", "mlp"), **common)
        self.fc2 = Dense((mlp_dim,), (width,), axes=("mlp", "embed"), **common)

    def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None):
        h = layers.gelu(self.fc1(x))
        h = layers.dropout(h, self.dropout, train=train, rngs=rngs)
        return layers.dropout(self.fc2(h), self.dropout, train=train, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head dot-product attention with the public (D, heads, head_dim) kernels.

    `implementation` None picks the fastest measured path: the einsum-softmax on CPU,
    `jax.nn.dot_product_attention` (fused cuDNN/TPU kernels) elsewhere; 'xla', 'cudnn' or
    'einsum' force one. Requested weights or attention dropout take the einsum path.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        attention_dropout: float = 0.0,
        implementation: str | None = None,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        if implementation not in ATTENTION_IMPLS:
            raise ValueError(
                f"unknown attention_impl {implementation!r}; valid: {list(ATTENTION_IMPLS)}"
            )
        head_dim = width // num_heads
        self.attention_dropout = attention_dropout
        self.implementation = implementation
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        in_axes = ("embed", "heads", "head_dim")
        self.query = Dense((width,), (num_heads, head_dim), axes=in_axes, **common)
        self.key = Dense((width,), (num_heads, head_dim), axes=in_axes, **common)
        self.value = Dense((width,), (num_heads, head_dim), axes=in_axes, **common)
        self.out = Dense(
            (num_heads, head_dim), (width,), axes=("heads", "head_dim", "embed"), **common
        )

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
        return_weights: bool = False,
    ) -> tuple[jax.Array, jax.Array | None]:
        use_dropout = train and self.attention_dropout > 0.0 and rngs is not None
        implementation = self.implementation
        if implementation is None and jax.default_backend() == "cpu":
            # Measured with `vit_jax step_benchmark attention`: on CPU the plain einsum
            # path trains ViT-B/16 ~9% faster than jax.nn.dot_product_attention's XLA path.
            implementation = "einsum"
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        q, k, v = self.query(inputs_q), self.key(inputs_kv), self.value(inputs_kv)
        weights = None
        if return_weights or use_dropout or implementation == "einsum":
            # Heads-major layout: the batched matmuls run ~1.4x faster on CPU than "btnh".
            q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
            # The 1/sqrt(head_dim) scale on q (B*N*D values), not on the (B, H, N, N) logits.
            q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
            logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
            weights = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
            mixed = layers.dropout(weights, self.attention_dropout, train=train, rngs=rngs)
            out = jnp.swapaxes(jnp.einsum("bnts,bnsh->bnth", mixed, v), 1, 2)
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
        return self.out(out), weights


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)), with stochastic depth."""

    def __init__(
        self,
        width: int,
        mlp_dim: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        attention_impl: str | None = None,
        activation_sharding: ActivationSharding | None = None,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        self.dropout = dropout
        self.activation_sharding = activation_sharding
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(width, **common)
        self.attn = Attention(
            width,
            num_heads,
            attention_dropout=attention_dropout,
            implementation=attention_impl,
            **common,
        )
        self.norm2 = LayerNorm(width, **common)
        self.mlp = MlpBlock(width, mlp_dim, dropout=dropout, **common)

    def __call__(self, x, drop_path_rate, *, train, rngs, return_weights=False):
        x = constrain(x, TOKENS, self.activation_sharding)
        y, weights = self.attn(self.norm1(x), train=train, rngs=rngs, return_weights=return_weights)
        y = layers.dropout(y, self.dropout, train=train, rngs=rngs)
        x = x + layers.drop_path(y, drop_path_rate, train=train, rngs=rngs)
        y = self.mlp(self.norm2(x), train=train, rngs=rngs)
        x = x + layers.drop_path(y, drop_path_rate, train=train, rngs=rngs)
        return constrain(x, TOKENS, self.activation_sharding), weights


class MAPHead(nnx.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then an MLP."""

    def __init__(self, width, mlp_dim, num_heads, *, rngs, dtype=None, param_dtype=jnp.float32):
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.probe = layers.make_param(
            rngs,
            nnx.initializers.xavier_uniform(),
            (1, 1, width),
            (None, None, "embed"),
            param_dtype,
        )
        self.attn = Attention(width, num_heads, **common)
        self.norm = LayerNorm(width, **common)
        self.mlp = MlpBlock(width, mlp_dim, dropout=0.0, **common)

    def __call__(self, x):
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        pooled, _ = self.attn(probe, x)
        pooled = pooled + self.mlp(self.norm(pooled), train=False, rngs=None)
        return pooled[:, 0]


class VisionTransformer(nnx.Module):
    """ViT classifier. `model(images)` gives logits (features when num_classes=0).

    FlexiViT: a non-empty `patch_sizes` (the sizes it is trained at) makes a plain ViT
    (no ResNet stem) whose parameters have the shapes of `param_patch_size`, the underlying
    size (a (p0, p0, C, D) kernel, an img/p0 position grid), while it runs at `patch_size`:
    the kernel is PI-resized and the position grid resized in every forward pass
    (models/flexi.py). `patch_size` is always the size the model runs at (its token grid,
    `grid`); `posemb_grid` is the grid of its position embedding parameter. Models of one
    FlexiViT at different `patch_size` share one parameter tree. `param_patch_size` None is
    `patch_size` (`create_model` fills in the name's size for a FlexiViT).
    """

    def __init__(
        self,
        *,
        patch_size: int,
        width: int,
        depth: int,
        mlp_dim: int,
        num_heads: int,
        num_classes: int = 1000,
        img_size: int | tuple[int, int] = 224,
        in_channels: int = 3,
        pool_type: str = "tok",
        posemb: str = "learn",
        num_registers: int = 0,
        patch_sizes: tuple[int, ...] = (),
        representation_size: int | None = None,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path: float = 0.0,
        dtype: Any = None,
        param_dtype: Any = "float32",
        scan: bool = False,
        remat: str = "none",
        head_zero_init: bool = True,
        head_bias_init: float = 0.0,
        attention_impl: str | None = None,
        stem_layers: tuple[int, ...] | None = None,
        stem_width: int = 1,
        activation_sharding: ActivationSharding | None = None,
        param_patch_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        if pool_type not in POOL_TYPES:
            raise ValueError(f"unknown pool_type {pool_type!r}; valid: {list(POOL_TYPES)}")
        if posemb not in POSEMB_TYPES:
            raise ValueError(f"unknown posemb {posemb!r}; valid: {list(POSEMB_TYPES)}")
        if num_registers < 0:
            raise ValueError(f"num_registers must be 0 (none) or more, got {num_registers}")
        layers.remat_policy(remat)  # validates the name early
        dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = patch_size
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        self.param_patch_size = patch_size if param_patch_size is None else int(param_patch_size)
        if self.param_patch_size != patch_size and not self.patch_sizes:
            raise ValueError(
                f"param_patch_size {param_patch_size} differs from patch_size {patch_size}: "
                "only a FlexiViT (non-empty patch_sizes) runs at another size than its kernel's"
            )
        if self.patch_sizes and stem_layers:
            raise ValueError("FlexiViT (patch_sizes) needs a plain ViT, not a ResNet-stem hybrid")
        self.width, self.depth, self.num_classes = width, depth, num_classes
        self.pool_type, self.posemb_type = pool_type, posemb
        self.num_registers = num_registers
        self.dropout, self.drop_path_rate = dropout, drop_path
        self.head_bias_init = head_bias_init  # a replaced head (fine-tuning) starts from it
        self.scan, self.remat = scan, remat
        self.dtype = dtype
        self.activation_sharding = activation_sharding
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        stem, stride = None, 1
        if stem_layers:
            from vit_jax.models.resnet import ResNetStem

            stem = ResNetStem(tuple(stem_layers), stem_width, in_channels=in_channels, **common)
            in_channels, stride = stem.out_channels, stem.stride
        self.stem = stem  # assigned once: nnx marks an attribute first set to None as static
        if patch_size % stride:
            raise ValueError(f"patch_size {patch_size} is not a multiple of stem stride {stride}")
        kernel = self.param_patch_size // stride
        for patch in sorted({patch_size, self.param_patch_size, *self.patch_sizes}):
            if patch <= 0 or any(size % patch for size in self.img_size):
                raise ValueError(f"img_size {self.img_size} is not divisible by patch {patch}")
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.posemb_grid = (
            self.img_size[0] // self.param_patch_size,
            self.img_size[1] // self.param_patch_size,
        )
        self.patch_embed = layers.Conv(
            in_channels,
            width,
            kernel,
            strides=patch_size // stride,
            axes=("conv_height", "conv_width", "conv_in", "embed"),
            **common,
        )
        self.cls_token = (
            layers.make_param(rngs, layers.zeros, (1, 1, width), (None, None, "embed"), param_dtype)
            if pool_type == "tok"
            else None
        )
        num_tokens = self.posemb_grid[0] * self.posemb_grid[1] + (pool_type == "tok")
        self.posemb = (
            layers.make_param(
                rngs,
                nnx.initializers.normal(stddev=0.02),
                (1, num_tokens, width),
                (None, "tokens", "embed"),
                param_dtype,
            )
            if posemb == "learn"
            else None
        )

        block_args = dict(
            width=width,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            dropout=dropout,
            attention_dropout=attention_dropout,
            attention_impl=attention_impl,
            activation_sharding=activation_sharding,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        if scan:

            @nnx.split_rngs(splits=depth)
            @nnx.vmap(
                in_axes=(0,),
                out_axes=0,
                transform_metadata={nnx.PARTITION_NAME: None, "logical_axes": "layers"},
            )
            def make_blocks(rngs):
                return EncoderBlock(rngs=rngs, **block_args)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([EncoderBlock(rngs=rngs, **block_args) for _ in range(depth)])
        self.encoder_norm = LayerNorm(width, **common)
        self.map_head = MAPHead(width, mlp_dim, num_heads, **common) if pool_type == "map" else None
        self.pre_logits = (
            Dense((width,), (representation_size,), axes=("embed", "representation"), **common)
            if representation_size
            else None
        )
        self.head = layers.classifier_head(
            representation_size or width,
            num_classes,
            in_axis="representation" if representation_size else "embed",
            zero_init=head_zero_init,
            bias=head_bias_init,
            **common,
        )
        # Register tokens: created last, so every other parameter draws the same random
        # numbers as in the model without them, and none at all (no parameter, no draw)
        # when num_registers is 0. A small normal, not zeros like the class token: identical
        # registers (no position embedding tells them apart) would stay identical forever.
        self.registers = (
            layers.make_param(
                rngs,
                nnx.initializers.normal(stddev=0.02),
                (1, num_registers, width),
                (None, None, "embed"),
                param_dtype,
            )
            if num_registers
            else None
        )

    # --- forward -------------------------------------------------------------------------

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in the sequence: the class token, then the registers."""
        return int(self.cls_token is not None) + self.num_registers

    def patch_kernel(self) -> jax.Array:
        """The patch-embedding kernel at the size the model runs at: the parameter itself,
        PI-resized for a FlexiViT running at another size than its underlying one."""
        kernel = self.patch_embed.kernel[...]
        return flexi.pi_resize_kernel(kernel, self.patch_size) if self.patch_sizes else kernel

    def position_embedding(self) -> jax.Array | None:
        """The learned position embedding at the token grid the model runs at (its grid
        resized for a FlexiViT running at another size); None for sincos2d."""
        if self.posemb is None:
            return None
        posemb = self.posemb[...]
        if not self.patch_sizes:
            return posemb
        prefix = int(self.cls_token is not None)
        return flexi.resize_posemb_grid(posemb, self.posemb_grid, self.grid, prefix)

    def embed(self, images: jax.Array) -> jax.Array:
        """Images (B, H, W, C) -> tokens (B, N, D): [class, registers, patches].

        The position embedding covers the class token and the patches only; the registers
        are joined after it is added (they have no position)."""
        x = images if self.dtype is None else images.astype(self.dtype)
        if self.stem is not None:
            x = self.stem(x)
        x = self.patch_embed.convolve(x, self.patch_kernel())
        batch, grid_h, grid_w, width = x.shape
        if (grid_h, grid_w) != self.grid:
            raise ValueError(
                f"images of {images.shape[1:3]} give a {grid_h}x{grid_w} patch grid; the model "
                f"was built for img_size={self.img_size} ({self.grid[0]}x{self.grid[1]})"
            )
        x = x.reshape(batch, grid_h * grid_w, width)
        if self.posemb_type == "sincos2d":
            x = x + posemb_sincos_2d(grid_h, grid_w, width).astype(x.dtype)
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (batch, 1, width))
            x = jnp.concatenate([cls, x], axis=1)
        if self.posemb is not None:
            x = x + self.position_embedding().astype(x.dtype)
        if self.registers is not None:
            registers = self.registers[...].astype(x.dtype)
            registers = jnp.broadcast_to(registers, (batch, self.num_registers, width))
            cls_count = int(self.cls_token is not None)
            x = jnp.concatenate([x[:, :cls_count], registers, x[:, cls_count:]], axis=1)
        return constrain(x, TOKENS, self.activation_sharding)

    def _block_step(self, train: bool, return_weights: bool):
        """One block application as a function of (block, x, rate, rngs), remat applied."""

        no_drop_path = not self.drop_path_rate

        def step(block, x, rate, rngs):
            # A rate of 0 stays a Python float: drop_path then draws no mask (the per-block
            # rates below are traced arrays, also under remat and scan).
            rate = 0.0 if no_drop_path else rate
            return block(x, rate, train=train, rngs=rngs, return_weights=return_weights)

        policy_name = self.remat
        if policy_name == "none":
            return step
        return nnx.remat(step, policy=layers.remat_policy(policy_name), prevent_cse=not self.scan)

    def encode(self, x, *, train, rngs, return_intermediates=False, return_attention=False):
        """Runs all blocks; returns final tokens and stacked per-block outputs on request."""
        rates = (
            jnp.linspace(0.0, self.drop_path_rate, self.depth)
            if self.depth > 1
            else (jnp.full((self.depth,), self.drop_path_rate))
        )
        use_rngs = rngs if train else None
        step = self._block_step(train, return_attention)
        if self.scan:

            def body(x, block, rate, rngs):
                y, weights = step(block, x, rate, rngs)
                return y, (y if return_intermediates else None, weights)

            if use_rngs is None:
                scanned = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, None), out_axes=(nnx.Carry, 0))
            else:
                scanned = nnx.split_rngs(splits=self.depth)(
                    nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
                )
            x, (intermediates, attention) = scanned(x, self.blocks, rates, use_rngs)
        else:
            outputs, weights_list = [], []
            for i, block in enumerate(self.blocks):
                x, weights = step(block, x, rates[i], use_rngs)
                outputs.append(x)
                weights_list.append(weights)
            intermediates = jnp.stack(outputs) if return_intermediates else None
            attention = jnp.stack(weights_list) if return_attention else None
        return x, intermediates, attention

    def forward_features(
        self,
        images: jax.Array,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
        return_intermediates: bool = False,
        return_attention: bool = False,
    ) -> dict[str, jax.Array]:
        """All representations: `tokens` (after the final norm), `pooled`, `pre_logits`,
        and on request `intermediates` (depth, B, N, D) and `attention` (depth, B, H, N, N).

        Token sequences hold [class, registers, patches] (`num_prefix_tokens` before the
        patches); pooling never sees the registers: `tok` takes the class token, `gap` and
        `map` pool the patch tokens only."""
        x = self.embed(images)
        x = layers.dropout(x, self.dropout, train=train, rngs=rngs)
        x, intermediates, attention = self.encode(
            x,
            train=train,
            rngs=rngs,
            return_intermediates=return_intermediates,
            return_attention=return_attention,
        )
        tokens = self.encoder_norm(x)
        # gap and map have no class token: the registers lead, and are left out.
        patches = tokens[:, self.num_registers :] if self.num_registers else tokens
        if self.pool_type == "tok":
            pooled = tokens[:, 0]
        elif self.pool_type == "gap":
            pooled = jnp.mean(patches, axis=1)
        else:
            pooled = self.map_head(patches)
        pre_logits = pooled if self.pre_logits is None else jnp.tanh(self.pre_logits(pooled))
        out = {"tokens": tokens, "pooled": pooled, "pre_logits": pre_logits}
        if return_intermediates:
            out["intermediates"] = intermediates
        if return_attention:
            out["attention"] = attention
        return out

    def __call__(
        self, images: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        features = self.forward_features(images, train=train, rngs=rngs)["pre_logits"]
        if self.head is None:
            return features
        return self.head(features)

    # --- public checkpoint layout --------------------------------------------------------

    def npz_names(self, layout: str = "original") -> dict[str, str]:
        """Maps each parameter path ('/'-joined) to its key in the public `.npz` layouts.

        `layout` is 'original' (the ViT release) or 'big_vision'. For a scanned model the
        block keys contain `{i}`: the parameter stacks layer i's array along its first axis.
        """
        if layout not in ("original", "big_vision"):
            raise ValueError(f"unknown npz layout {layout!r}; valid: ['original', 'big_vision']")
        original = layout == "original"
        attention = "MultiHeadDotProductAttention_" + ("1" if original else "0")
        block_parts = {
            "norm1": "LayerNorm_0",
            "attn": attention,
            "norm2": "LayerNorm_2" if original else "LayerNorm_1",
            "mlp/fc1": "MlpBlock_3/Dense_0" if original else "MlpBlock_0/Dense_0",
            "mlp/fc2": "MlpBlock_3/Dense_1" if original else "MlpBlock_0/Dense_1",
        }
        top_parts = {
            "patch_embed": "embedding",
            "cls_token": "cls",
            "registers": "registers",
            "posemb": "Transformer/posembed_input/pos_embedding" if original else "pos_embedding",
            "encoder_norm": "Transformer/encoder_norm",
            "pre_logits": "pre_logits",
            "head": "head",
            "map_head/probe": "MAPHead_0/probe",
            "map_head/attn": "MAPHead_0/MultiHeadDotProductAttention_0",
            "map_head/norm": "MAPHead_0/LayerNorm_0",
            "map_head/mlp/fc1": "MAPHead_0/MlpBlock_0/Dense_0",
            "map_head/mlp/fc2": "MAPHead_0/MlpBlock_0/Dense_1",
        }
        names = {}
        for path in param_paths(self):
            parts = path.split("/")
            if parts[0] == "blocks":
                if self.scan:
                    index, rest = "{i}", parts[1:]
                else:
                    index, rest = parts[1], parts[2:]
                names[path] = f"Transformer/encoderblock_{index}/" + _rename(rest, block_parts)
            elif parts[0] == "stem":
                names[path] = self.stem.npz_name(parts[1:])
            else:
                names[path] = _rename(parts, top_parts)
        return names


def _rename(parts: list[str], table: dict[str, str]) -> str:
    """Replaces the longest leading run of `parts` found in `table`."""
    for cut in range(len(parts), 0, -1):
        prefix = "/".join(parts[:cut])
        if prefix in table:
            return "/".join([table[prefix], *parts[cut:]])
    raise KeyError(f"no public name for parameter {'/'.join(parts)}")


def param_paths(model: nnx.Module) -> list[str]:
    """'/'-joined paths of all `nnx.Param`s of a model, in a stable order."""
    state = nnx.state(model, nnx.Param)
    return ["/".join(str(k) for k in path) for path, _ in nnx.to_flat_state(state)]
