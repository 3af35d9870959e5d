"""Hybrid ResNet stem and MLP-Mixer: exact parameter counts, NumPy references, layout."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vit_jax.models import create_model, list_models
from vit_jax.models.mixer import MixerBlock, MlpMixer
from vit_jax.models.resnet import (
    BottleneckUnit,
    GroupNorm,
    ResNetStem,
    StdConv,
    max_pool_3x3_s2,
)

TINY_HYBRID = dict(
    img_size=64,
    num_classes=5,
    width=32,
    depth=1,
    mlp_dim=64,
    num_heads=2,
    stem_layers=(1, 1),
    stem_width=0.5,
)
TINY_MIXER = dict(
    img_size=32, num_classes=5, width=16, depth=2, tokens_mlp_dim=8, channels_mlp_dim=32
)


def abstract(name: str, **overrides) -> nnx.Module:
    """The model's abstract (shape-only) form; cached, callers must not mutate it."""
    return _abstract(name, tuple(sorted(overrides.items())))


@functools.cache
def _abstract(name: str, overrides: tuple) -> nnx.Module:
    return nnx.eval_shape(lambda: create_model(name, **dict(overrides)))


def randomized(module: nnx.Module, seed: int = 0, scale: float = 0.5) -> nnx.Module:
    """Fills every parameter of a (possibly abstract) module with NumPy random values.

    Faster than a real init (no per-shape RNG kernels) and exercises non-trivial weights.
    """
    graphdef, state = nnx.split(module)
    rng = np.random.default_rng(seed)

    def fill(leaf):
        return jnp.asarray((scale * rng.standard_normal(leaf.shape)).astype(np.float32))

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def count_params(module: nnx.Module) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def flat_params(module: nnx.Module) -> dict[str, nnx.Param]:
    state = nnx.state(module, nnx.Param)
    return {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


# --- NumPy references ---------------------------------------------------------------------


def np_conv_same(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """NHWC x HWIO convolution with XLA's SAME padding."""
    kh, kw = w.shape[:2]
    _, h, wd, _ = x.shape
    oh, ow = -(-h // stride), -(-wd // stride)
    pad_h = max((oh - 1) * stride + kh - h, 0)
    pad_w = max((ow - 1) * stride + kw - wd, 0)
    xp = np.pad(
        x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    )
    out = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i : i + stride * oh : stride, j : j + stride * ow : stride]
            out += np.einsum("bhwc,co->bhwo", patch, w[i, j])
    return out


def np_standardize(w: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    w = w - w.mean(axis=(0, 1, 2))
    return w / (w.std(axis=(0, 1, 2)) + eps)


def np_group_norm(x, scale, bias, groups, eps=1e-6):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps) * scale + bias


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def apply(module: nnx.Module, x: np.ndarray) -> np.ndarray:
    """`module(x)` as one compiled program (op by op, every op would be a compile)."""
    return np.asarray(nnx.jit(lambda m, x: m(x))(module, jnp.asarray(x)))


def np_value(param) -> np.ndarray:
    return np.asarray(param[...], np.float64)


# --- exact parameter counts -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("R50+ViT-B/16", 98_659_112),
        ("R26+ViT-S/32", 36_431_912),
        ("Mixer-B/16", 59_880_472),
        ("Mixer-L/16", 208_196_168),
    ],
)
def test_exact_param_counts(name, expected):
    assert count_params(abstract(name)) == expected


def test_mixers_registered_with_checked_overrides():
    assert {"Mixer-B/16", "Mixer-B/32", "Mixer-L/16"} <= set(list_models("Mixer"))
    with pytest.raises(TypeError, match="num_heads"):
        create_model("Mixer-B/16", num_heads=4)


def test_hybrid_stem_geometry():
    model = abstract("R50+ViT-B/16")
    assert (model.stem.stride, model.stem.out_channels) == (16, 1024)
    assert model.patch_embed.kernel.shape == (1, 1, 1024, 768)
    r26 = abstract("R26+ViT-S/32")
    assert (r26.stem.stride, r26.stem.out_channels) == (32, 2048)
    gray = abstract("R26+ViT-S/32", in_channels=1, **TINY_HYBRID)
    assert gray.stem.conv_root.kernel.shape == (7, 7, 1, 32)


# --- ResNet pieces against NumPy --------------------------------------------------------------


def test_weight_standardised_conv_matches_numpy():
    conv = randomized(nnx.eval_shape(lambda: StdConv(4, 8, 3, strides=2, rngs=nnx.Rngs(0))))
    x = np.random.default_rng(1).standard_normal((2, 7, 7, 4)).astype(np.float32)
    expected = np_conv_same(x.astype(np.float64), np_standardize(np_value(conv.kernel)), 2)
    np.testing.assert_allclose(apply(conv, x), expected, rtol=1e-4, atol=1e-4)
    assert conv.bias is None


@pytest.mark.parametrize("groups", [32, 4])
def test_group_norm_matches_numpy(groups):
    gn = randomized(nnx.eval_shape(lambda: GroupNorm(64, num_groups=groups, rngs=nnx.Rngs(0))))
    x = 3.0 + np.random.default_rng(2).standard_normal((2, 5, 3, 64)).astype(np.float32)
    expected = np_group_norm(x.astype(np.float64), np_value(gn.scale), np_value(gn.bias), groups)
    np.testing.assert_allclose(apply(gn, x), expected, rtol=1e-5, atol=1e-5)


def test_bottleneck_unit_matches_numpy():
    unit = randomized(nnx.eval_shape(lambda: BottleneckUnit(32, 32, strides=2, rngs=nnx.Rngs(0))))
    x = np.random.default_rng(3).standard_normal((1, 6, 6, 32)).astype(np.float32)

    def conv_gn(name, h, stride=1):
        conv, gn = getattr(unit, f"conv{name}"), getattr(unit, f"gn{name}")
        y = np_conv_same(h, np_standardize(np_value(conv.kernel)), stride)
        return np_group_norm(y, np_value(gn.scale), np_value(gn.bias), 32)

    x64 = x.astype(np.float64)
    residual = conv_gn("_proj", x64, 2)
    y = np.maximum(conv_gn("1", x64), 0)
    y = np.maximum(conv_gn("2", y, 2), 0)
    expected = np.maximum(residual + conv_gn("3", y), 0)
    out = apply(unit, x)
    assert out.shape == (1, 3, 3, 128)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_max_pool_same_padding():
    x = np.random.default_rng(4).standard_normal((1, 5, 5, 2)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    expected = np.stack(
        [
            np.stack([xp[:, i : i + 3, j : j + 3].max(axis=(1, 2)) for j in (0, 2, 4)], 1)
            for i in (0, 2, 4)
        ],
        1,
    )
    np.testing.assert_array_equal(np.asarray(jax.jit(max_pool_3x3_s2)(x)), expected)


# --- forward shapes ---------------------------------------------------------------------------


def test_tiny_hybrid_forward():
    model = randomized(abstract("R26+ViT-S/32", **TINY_HYBRID), scale=0.1)
    images = jnp.asarray(np.random.default_rng(5).standard_normal((2, 64, 64, 3)), jnp.float32)

    @nnx.jit
    def run(model, images):
        return model(images), model.forward_features(images, return_intermediates=True)

    logits, features = run(model, images)
    assert model.stem.stride == 8 and model.patch_embed.kernel.shape == (4, 4, 256, 32)
    assert logits.shape == (2, 5)
    assert features["tokens"].shape == (2, 5, 32)
    assert features["intermediates"].shape == (1, 2, 5, 32)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_tiny_mixer_forward():
    model = randomized(abstract("Mixer-B/16", **TINY_MIXER), scale=0.3)
    images = jnp.asarray(np.random.default_rng(6).standard_normal((3, 32, 32, 3)), jnp.float32)

    @nnx.jit
    def run(model, images):
        return model(images), model.forward_features(images, return_intermediates=True)

    logits, features = run(model, images)
    assert logits.shape == (3, 5)
    assert features["tokens"].shape == (3, 4, 16)
    assert features["pooled"].shape == features["pre_logits"].shape == (3, 16)
    assert features["intermediates"].shape == (2, 3, 4, 16)
    np.testing.assert_allclose(
        np.asarray(features["pooled"]), np.asarray(features["tokens"]).mean(1), atol=1e-6
    )
    with pytest.raises(ValueError, match="no attention"):
        model.forward_features(images, return_attention=True)
    with pytest.raises(ValueError, match="patch grid"):
        model(images[:, :16, :16])


def test_tiny_mixer_headless_and_train():
    images = jnp.asarray(np.random.default_rng(7).standard_normal((3, 32, 32, 3)), jnp.float32)
    headless = randomized(abstract("Mixer-B/16", **{**TINY_MIXER, "num_classes": 0}))
    assert headless.head is None
    # Its output's shape, traced without compiling: (batch, width), no head.
    assert nnx.eval_shape(lambda m, x: m(x), headless, images).shape == (3, 16)

    overrides = {**TINY_MIXER, "depth": 1, "dropout": 0.5, "drop_path": 0.5}
    model = randomized(abstract("Mixer-B/16", **overrides), scale=0.3)

    @nnx.jit
    def run(model, images, rngs):
        return model(images, train=True, rngs=rngs), model(images)

    out_train, out_eval = run(model, images, nnx.Rngs(dropout=1))
    assert out_train.shape == out_eval.shape == (3, 5)
    assert not np.allclose(np.asarray(out_train), np.asarray(out_eval))


def test_mixer_block_matches_numpy():
    block = randomized(
        nnx.eval_shape(lambda: MixerBlock(6, 8, 5, 12, rngs=nnx.Rngs(0))), seed=7, scale=0.4
    )
    x = np.random.default_rng(8).standard_normal((2, 6, 8)).astype(np.float32)
    p = {k: np_value(v) for k, v in flat_params(block).items()}

    def mlp(h, prefix):
        h = np_gelu(h @ p[f"{prefix}/fc1/kernel"] + p[f"{prefix}/fc1/bias"])
        return h @ p[f"{prefix}/fc2/kernel"] + p[f"{prefix}/fc2/bias"]

    ref = x.astype(np.float64)
    y = np_layer_norm(ref, p["norm1/scale"], p["norm1/bias"])
    ref = ref + mlp(y.transpose(0, 2, 1), "token_mixing").transpose(0, 2, 1)
    ref = ref + mlp(np_layer_norm(ref, p["norm2/scale"], p["norm2/bias"]), "channel_mixing")
    np.testing.assert_allclose(apply(block, x), ref, rtol=1e-5, atol=1e-5)


# --- metadata and checkpoint layout -----------------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides",
    [("R26+ViT-S/32", TINY_HYBRID), ("Mixer-B/16", TINY_MIXER), ("R50+ViT-B/16", {})],
)
def test_every_param_has_logical_axes(name, overrides):
    params = flat_params(abstract(name, **overrides))
    for path, param in params.items():
        axes = param.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == len(param.shape), path
    stem_axes = {
        tuple(p.get_metadata()["logical_axes"])
        for k, p in params.items()
        if k.startswith("stem/") and k.endswith("kernel")
    }
    assert stem_axes <= {
        ("conv_height", "conv_width", "conv_in", "conv_out"),
        ("conv_height", "conv_width", "conv_in", "embed"),
    }


def test_hybrid_npz_names():
    model = abstract("R50+ViT-B/16")
    params = flat_params(model)
    names = model.npz_names()
    assert set(names) == set(params) and len(set(names.values())) == len(names)
    stem_keys = {v for k, v in names.items() if k.startswith("stem/")}
    units = 3 + 4 + 9
    assert len(stem_keys) == 3 + units * 9 + 3 * 3  # root, units, stage projections
    shapes = {names[k]: p.shape for k, p in params.items()}
    assert shapes["conv_root/kernel"] == (7, 7, 3, 64)
    assert shapes["gn_root/scale"] == (64,)
    assert shapes["block1/unit1/conv_proj/kernel"] == (1, 1, 64, 256)
    assert shapes["block2/unit1/conv2/kernel"] == (3, 3, 128, 128)
    assert shapes["block3/unit9/gn3/bias"] == (1024,)
    assert shapes["embedding/kernel"] == (1, 1, 1024, 768)
    assert "block1/unit2/conv_proj/kernel" not in shapes
    with pytest.raises(KeyError):
        ResNetStem.npz_name(["block1", "unit1", "conv9", "kernel"])


def test_mixer_npz_names():
    model = abstract("Mixer-B/16")
    params = flat_params(model)
    names = model.npz_names()
    assert set(names) == set(params) and len(set(names.values())) == len(names)
    block = re.compile(
        r"MixerBlock_(\d|1[01])/(LayerNorm_[01]/(scale|bias)"
        r"|(token|channel)_mixing/Dense_[01]/(kernel|bias))"
    )
    top = {"stem/kernel", "stem/bias", "head/kernel", "head/bias"}
    top |= {"pre_head_layer_norm/scale", "pre_head_layer_norm/bias"}
    for key in names.values():
        assert key in top or block.fullmatch(key), key
    assert len(names) == 12 * 12 + 6
    shapes = {names[k]: p.shape for k, p in params.items()}
    assert shapes["stem/kernel"] == (16, 16, 3, 768)
    assert shapes["MixerBlock_0/token_mixing/Dense_0/kernel"] == (196, 384)
    assert shapes["MixerBlock_11/token_mixing/Dense_1/bias"] == (196,)
    assert shapes["MixerBlock_3/channel_mixing/Dense_1/kernel"] == (3072, 768)
    assert isinstance(model, MlpMixer)
