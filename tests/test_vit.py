"""ViT model tests: exact parameter counts, an independent NumPy forward pass fed through the
public `.npz` layout, scan vs unrolled, features, dropout behaviour, registry errors, bf16."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vit_jax.checkpoint import load_npz
from vit_jax.models import create_model, list_models
from vit_jax.models.registry import PATCH_SIZES, VIT_SIZES

# The public release at 224 px, 1000 classes.
PARAM_COUNTS = {
    "ViT-Ti/16": 5_717_416,
    "ViT-S/16": 22_050_664,
    "ViT-S/32": 22_878_952,
    "ViT-B/8": 86_576_872,
    "ViT-B/16": 86_567_656,
    "ViT-B/32": 88_224_232,
    "ViT-L/16": 304_326_632,
    "ViT-L/32": 306_535_400,
    "ViT-H/14": 632_045_800,
}
GAP_PARAM_COUNTS = {"ViT-S/16": 22_049_896, "ViT-B/16": 86_566_120}

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, img_size=32, num_classes=5)
forward = nnx.jit(lambda model, x: model(x))


def count_params(name: str, **overrides) -> int:
    model = nnx.eval_shape(lambda: create_model(name, **overrides))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def formula_count(width, depth, mlp_dim, patch, *, img=224, classes=1000, cls=True) -> int:
    """Parameter count of the original ViT, written out from the architecture."""
    tokens = (img // patch) ** 2 + cls
    embed = patch * patch * 3 * width + width
    block = 2 * 2 * width + 4 * (width * width + width) + 2 * width * mlp_dim + mlp_dim + width
    return (
        embed + cls * width + tokens * width + depth * block + 2 * width + width * classes + classes
    )


def test_parameter_counts_match_the_release_exactly():
    # Scanned models hold the same arrays stacked, and trace in a fraction of the time.
    for name, expected in PARAM_COUNTS.items():
        assert count_params(name, scan=True) == expected, name
    for name, expected in GAP_PARAM_COUNTS.items():
        got = count_params(name, scan=True, pool_type="gap")
        assert got == expected, f"{name} gap"
    # Unrolled and scanned agree.
    assert count_params("ViT-Ti/16") == PARAM_COUNTS["ViT-Ti/16"]
    assert count_params("ViT-S/16", pool_type="gap") == GAP_PARAM_COUNTS["ViT-S/16"]
    # ViT-G/14 ("Scaling Vision Transformers": 1843M without the head).
    g = VIT_SIZES["G"]
    expected_g = formula_count(g["width"], g["depth"], g["mlp_dim"], 14)
    assert expected_g == 1_844_440_680
    assert count_params("ViT-G/14", scan=True) == expected_g
    b = VIT_SIZES["B"]
    assert formula_count(b["width"], b["depth"], b["mlp_dim"], 16) == PARAM_COUNTS["ViT-B/16"]


# --- an independent NumPy forward pass -----------------------------------------------------


def random_public_weights(rng, *, width, depth, mlp_dim, num_heads, patch, grid, classes,
                          tok=True, representation=None):  # fmt: skip
    """Random arrays under the ORIGINAL public `.npz` keys."""
    head_dim = width // num_heads

    def normal(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {
        "embedding/kernel": normal(patch, patch, 3, width, std=0.1),
        "embedding/bias": normal(width),
        "Transformer/posembed_input/pos_embedding": normal(1, grid * grid + tok, width),
        "Transformer/encoder_norm/scale": 1 + normal(width),
        "Transformer/encoder_norm/bias": normal(width),
        "head/kernel": normal(representation or width, classes),
        "head/bias": normal(classes),
    }
    if tok:
        w["cls"] = normal(1, 1, width)
    if representation:
        w["pre_logits/kernel"] = normal(width, representation)
        w["pre_logits/bias"] = normal(representation)
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}/"
        attn = p + "MultiHeadDotProductAttention_1/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            w[p + ln + "/scale"] = 1 + normal(width)
            w[p + ln + "/bias"] = normal(width)
        for name in ("query", "key", "value"):
            w[attn + name + "/kernel"] = normal(width, num_heads, head_dim)
            w[attn + name + "/bias"] = normal(num_heads, head_dim)
        w[attn + "out/kernel"] = normal(num_heads, head_dim, width)
        w[attn + "out/bias"] = normal(width)
        w[p + "MlpBlock_3/Dense_0/kernel"] = normal(width, mlp_dim)
        w[p + "MlpBlock_3/Dense_0/bias"] = normal(mlp_dim)
        w[p + "MlpBlock_3/Dense_1/kernel"] = normal(mlp_dim, width)
        w[p + "MlpBlock_3/Dense_1/bias"] = normal(width)
    return w


def np_layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_vit(w, images, *, patch, depth, tok=True, representation=False):
    """The ViT forward pass in float64 NumPy, straight from the public weights. Register
    tokens (`registers`, where the weights have them) join after the position embedding,
    after the class token, and are left out of the pooling."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    b, h, wd, c = images.shape
    x = images.astype(np.float64).reshape(b, h // patch, patch, wd // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, patch * patch * c)
    kernel = w["embedding/kernel"]
    x = x @ kernel.reshape(-1, kernel.shape[-1]) + w["embedding/bias"]
    if tok:
        x = np.concatenate([np.broadcast_to(w["cls"], (b, 1, x.shape[-1])), x], axis=1)
    x = x + w["Transformer/posembed_input/pos_embedding"]
    num_registers = w["registers"].shape[1] if "registers" in w else 0
    if num_registers:
        registers = np.broadcast_to(w["registers"], (b, *w["registers"].shape[1:]))
        x = np.concatenate([x[:, : int(tok)], registers, x[:, int(tok) :]], axis=1)
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}/"
        a = p + "MultiHeadDotProductAttention_1/"
        y = np_layer_norm(x, w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"])
        q, k, v = (
            np.einsum("bnd,dhk->bnhk", y, w[a + n + "/kernel"]) + w[a + n + "/bias"]
            for n in ("query", "key", "value")
        )
        logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("bhqs,bshk->bqhk", att, v)
        x = x + np.einsum("bqhk,hkd->bqd", o, w[a + "out/kernel"]) + w[a + "out/bias"]
        y = np_layer_norm(x, w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"])
        m = p + "MlpBlock_3/"
        y = np_gelu_tanh(y @ w[m + "Dense_0/kernel"] + w[m + "Dense_0/bias"])
        x = x + y @ w[m + "Dense_1/kernel"] + w[m + "Dense_1/bias"]
    x = np_layer_norm(x, w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"])
    pooled = x[:, 0] if tok else x[:, num_registers:].mean(axis=1)
    if representation:
        pooled = np.tanh(pooled @ w["pre_logits/kernel"] + w["pre_logits/bias"])
    return pooled @ w["head/kernel"] + w["head/bias"]


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize(
    "pool_type,representation,scan",
    [("tok", None, False), ("gap", None, False), ("tok", 16, True)],
)
def test_forward_matches_independent_numpy(tmp_path, images, pool_type, representation, scan):
    tok = pool_type == "tok"
    cfg = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch=8, grid=4, classes=5)
    w = random_public_weights(
        np.random.default_rng(1), tok=tok, representation=representation, **cfg
    )
    path = tmp_path / "ref.npz"
    np.savez(path, **w)
    model = nnx.eval_shape(
        lambda: create_model(
            "ViT-Ti/16", pool_type=pool_type, representation_size=representation, scan=scan, **TINY
        )
    )
    report = load_npz(model, path)
    assert report.layout == "original" and report.head == "loaded"
    assert report.pre_logits == ("loaded" if representation else "absent")
    expected = np_vit(w, images, patch=8, depth=2, tok=tok, representation=bool(representation))
    got = np.asarray(forward(model, jnp.asarray(images)))
    assert np.abs(expected).max() > 0.1  # not trivially small
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """An unrolled and a scanned tiny ViT holding the same (random) weights."""
    cfg = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch=8, grid=4, classes=5)
    path = tmp_path_factory.mktemp("pair") / "w.npz"
    np.savez(path, **random_public_weights(np.random.default_rng(2), **cfg))
    unrolled = nnx.eval_shape(lambda: create_model("ViT-Ti/16", **TINY))
    scanned = nnx.eval_shape(lambda: create_model("ViT-Ti/16", scan=True, **TINY))
    load_npz(unrolled, path)
    load_npz(scanned, path)
    return unrolled, scanned, path


def test_scan_and_unrolled_agree(tiny_pair, images):
    unrolled, scanned, _ = tiny_pair
    x = jnp.asarray(images)
    np.testing.assert_allclose(forward(unrolled, x), forward(scanned, x), atol=1e-6)
    features = nnx.jit(
        lambda model, x: model.forward_features(x, return_intermediates=True, return_attention=True)
    )
    fu, fs = features(unrolled, x), features(scanned, x)
    b, n, d, depth, heads = 2, 17, 32, 2, 2
    for f in (fu, fs):
        assert f["tokens"].shape == (b, n, d)
        assert f["pooled"].shape == (b, d)
        assert f["pre_logits"].shape == (b, d)
        assert f["intermediates"].shape == (depth, b, n, d)
        assert f["attention"].shape == (depth, b, heads, n, n)
        np.testing.assert_allclose(np.asarray(f["attention"]).sum(-1), 1.0, atol=1e-5)
        assert np.asarray(f["attention"]).min() >= 0
    np.testing.assert_allclose(
        np.asarray(fu["intermediates"]), np.asarray(fs["intermediates"]), atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(fu["attention"]), np.asarray(fs["attention"]), atol=1e-6)
    # The last intermediate is the encoder output before the final norm.
    np.testing.assert_allclose(
        np.asarray(unrolled.encoder_norm(fu["intermediates"][-1])),
        np.asarray(fu["tokens"]),
        atol=1e-5,
    )
    plain = unrolled.forward_features(x)
    assert "intermediates" not in plain and "attention" not in plain


@pytest.mark.parametrize("scan", [False, True])
def test_dropout_and_drop_path_only_in_training(tiny_pair, images, scan):
    model = nnx.eval_shape(
        lambda: create_model("ViT-Ti/16", dropout=0.2, drop_path=0.3, scan=scan, **TINY)
    )
    load_npz(model, tiny_pair[2])
    run = nnx.jit(lambda model, x, rngs, train: model(x, train=train, rngs=rngs), static_argnums=3)
    x = jnp.asarray(images)
    eval_a = np.asarray(forward(model, x))
    eval_b = np.asarray(run(model, x, nnx.Rngs(dropout=5), False))
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = np.asarray(run(model, x, nnx.Rngs(dropout=1), True))
    train_a2 = np.asarray(run(model, x, nnx.Rngs(dropout=1), True))
    train_b = np.asarray(run(model, x, nnx.Rngs(dropout=2), True))
    np.testing.assert_array_equal(train_a, train_a2)
    assert np.abs(train_a - train_b).max() > 1e-4
    assert np.abs(train_a - eval_a).max() > 1e-4


def _train_jaxpr(name: str = "ViT-Ti/16", **overrides) -> str:
    sizes = TINY if name.startswith("ViT") else dict(img_size=32, width=32, depth=2)
    model = nnx.eval_shape(lambda: create_model(name, **dict(sizes, **overrides)))
    graphdef, state = nnx.split(model)

    def train_forward(state, x):
        return nnx.merge(graphdef, state)(x, train=True, rngs=nnx.Rngs(dropout=0))

    return str(
        jax.make_jaxpr(train_forward)(state, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    )


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "none"), (False, "full")])
def test_zero_stochastic_depth_draws_no_random_bits(scan, remat):
    # Rate 0 (the default) is a no-op: no Bernoulli masks are drawn in the train step.
    assert "random_bits" not in _train_jaxpr(scan=scan, remat=remat)
    assert "random_bits" in _train_jaxpr(scan=scan, remat=remat, drop_path=0.1)


def test_zero_stochastic_depth_draws_no_random_bits_in_mixer_either():
    assert "random_bits" not in _train_jaxpr("Mixer-B/16")
    assert "random_bits" in _train_jaxpr("Mixer-B/16", drop_path=0.1)


def test_unknown_model_and_override_errors():
    with pytest.raises(ValueError, match="unknown model 'ViT-X/16'") as info:
        create_model("ViT-X/16")
    assert "ViT-B/16" in str(info.value)  # lists the known models
    with pytest.raises(TypeError, match="widht") as info:
        create_model("ViT-Ti/16", widht=32)
    message = str(info.value)
    assert "did you mean ['width']" in message and "num_classes" in message
    with pytest.raises(ValueError, match="unknown pool_type"):
        create_model("ViT-Ti/16", pool_type="max", **{k: v for k, v in TINY.items()})


def test_list_models_has_every_size_and_patch():
    names = set(list_models())
    for size in ("Ti", "S", "B", "L", "H", "g", "G"):
        for patch in PATCH_SIZES:
            assert f"ViT-{size}/{patch}" in names
    assert set(PATCH_SIZES) == {8, 14, 16, 32}
    assert list_models("ViT-B/") == sorted(n for n in names if "ViT-B/" in n)


def test_bfloat16_compute_close_to_float32(tiny_pair, images):
    unrolled, _, path = tiny_pair
    model = nnx.eval_shape(lambda: create_model("ViT-Ti/16", dtype="bfloat16", **TINY))
    load_npz(model, path)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    x = jnp.asarray(images)
    logits = forward(model, x)
    assert logits.dtype == jnp.bfloat16
    reference = np.asarray(forward(unrolled, x))
    got = np.asarray(logits.astype(jnp.float32))
    assert np.all(np.isfinite(got))
    scale = np.abs(reference).max()
    assert np.abs(got - reference).max() < 0.05 * scale + 0.05
    assert np.abs(got - reference).max() > 0  # really computed in bf16
