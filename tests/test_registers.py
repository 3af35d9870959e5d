"""Register tokens ("Vision Transformers Need Registers"): parameter counts, the untouched
default, an independent NumPy forward pass, the `.npz` layout, scan/remat, sharding, the
attention pictures and a tiny training run through the command line."""

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config, tiny_flags
from PIL import Image
from test_vit import np_vit, random_public_weights

from vit_jax import cli, sharding
from vit_jax.checkpoint import CheckpointMismatchError, load_npz, read_npz, save_npz
from vit_jax.commands import visualize
from vit_jax.experiment import Experiment
from vit_jax.inference import _npz_num_registers
from vit_jax.models import create_model

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, img_size=32, num_classes=5)
PUBLIC = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch=8, grid=4, classes=5)
forward = nnx.jit(lambda model, x: model(x))


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    state = nnx.state(model, nnx.Param)
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def count(model: nnx.Module) -> int:
    return sum(math.prod(v.shape) for v in flat_params(model).values())


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)


# --- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_type", ["tok", "gap", "map"])
@pytest.mark.parametrize("scan", [False, True])
def test_registers_add_exactly_num_registers_times_width_parameters(pool_type, scan):
    def abstract(**overrides):
        return nnx.eval_shape(
            lambda: create_model("ViT-Ti/16", pool_type=pool_type, scan=scan, **overrides, **TINY)
        )

    plain, with_registers = abstract(), abstract(num_registers=3)
    assert count(with_registers) - count(plain) == 3 * 32
    before, after = flat_params(plain), flat_params(with_registers)
    assert set(after) - set(before) == {"registers"}
    assert after["registers"].shape == (1, 3, 32)
    assert {p: v.shape for p, v in before.items()} == {p: after[p].shape for p in before}


@pytest.mark.parametrize("pool_type,scan", [("tok", False), ("gap", True)])
def test_other_parameters_start_as_without_registers(pool_type, scan):
    plain = create_model("ViT-Ti/16", pool_type=pool_type, scan=scan, **TINY)
    with_registers = create_model(
        "ViT-Ti/16", pool_type=pool_type, scan=scan, num_registers=3, **TINY
    )
    before, after = flat_params(plain), flat_params(with_registers)
    # Created last: every other parameter draws the same random numbers as without them.
    for path, value in before.items():
        np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(value), err_msg=path)
    # Distinct tokens (identical ones would stay identical through training).
    registers = np.asarray(after["registers"])[0]
    assert np.unique(registers, axis=0).shape[0] == 3 and 0.005 < registers.std() < 0.05


def test_vit_b16_with_four_registers_counts_3072_more():
    def abstract(**overrides):
        return nnx.eval_shape(lambda: create_model("ViT-B/16", scan=True, **overrides))

    assert count(abstract()) == 86_567_656  # the public release
    assert count(abstract(num_registers=4)) == 86_567_656 + 4 * 768


def test_zero_registers_leave_the_parameter_tree_and_outputs_as_they_were(images):
    default = create_model("ViT-Ti/16", **TINY)
    zero = create_model("ViT-Ti/16", num_registers=0, **TINY)
    assert zero.registers is None and zero.num_prefix_tokens == 1
    a, b = flat_params(default), flat_params(zero)
    assert list(a) == list(b) and not any("regist" in path for path in a)
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]))
    # The same public keys as the original release's layout, written out independently.
    public = random_public_weights(np.random.default_rng(0), **PUBLIC)
    assert set(zero.npz_names().values()) == set(public)
    x = jnp.asarray(images)
    np.testing.assert_array_equal(np.asarray(forward(default, x)), np.asarray(forward(zero, x)))


def test_negative_count_is_refused_by_the_model():
    with pytest.raises(ValueError, match="num_registers must be 0"):
        create_model("ViT-Ti/16", num_registers=-1, **TINY)


# --- forward pass ----------------------------------------------------------------------------


def public_weights_with_registers(seed: int, *, tok: bool, num_registers: int):
    rng = np.random.default_rng(seed)
    w = random_public_weights(rng, tok=tok, **PUBLIC)
    w["registers"] = rng.standard_normal((1, num_registers, 32)).astype(np.float32)
    return w


@pytest.mark.parametrize(
    "pool_type,scan,remat", [("tok", False, "none"), ("gap", False, "none"), ("tok", True, "full")]
)
def test_forward_matches_independent_numpy(tmp_path, images, pool_type, scan, remat):
    tok = pool_type == "tok"
    w = public_weights_with_registers(1, tok=tok, num_registers=3)
    path = tmp_path / "ref.npz"
    np.savez(path, **w)
    model = nnx.eval_shape(
        lambda: create_model(
            "ViT-Ti/16", pool_type=pool_type, num_registers=3, scan=scan, remat=remat, **TINY
        )
    )
    load_npz(model, path)
    expected = np_vit(w, images, patch=8, depth=2, tok=tok)
    got = np.asarray(forward(model, jnp.asarray(images)))
    assert got.shape == (2, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The registers matter: other values give other logits (not a reordering, which the
    # position-free attention ignores, nor a constant shift, which the LayerNorm removes).
    w["registers"] = np.random.default_rng(9).standard_normal(w["registers"].shape)
    changed = np_vit(w, images, patch=8, depth=2, tok=tok)
    assert np.abs(changed - expected).max() > 1e-3


@nnx.jit
def logits_features_and_map(model, x):
    """The logits, `forward_features` with attention, and (map pooling) the MAP head run
    on the patch tokens alone: one compiled program (eager, each op compiles on its own)."""
    features = model.forward_features(x, return_attention=True)
    patches = features["tokens"][:, model.num_prefix_tokens :]
    head = model.map_head(patches) if model.map_head is not None else None
    return model(x), features, head


@pytest.mark.parametrize("pool_type", ["tok", "gap", "map"])
def test_shapes_and_pooling_leave_the_registers_out(images, pool_type):
    model = create_model("ViT-Ti/16", pool_type=pool_type, num_registers=2, **TINY)
    logits, features, map_pooled = logits_features_and_map(model, jnp.asarray(images))
    features = jax.tree.map(np.asarray, features)
    tokens = 16 + (pool_type == "tok") + 2
    assert logits.shape == (2, 5)
    assert features["tokens"].shape == (2, tokens, 32)
    assert features["attention"].shape == (2, 2, 2, tokens, tokens)
    assert model.num_prefix_tokens == tokens - 16
    patches = features["tokens"][:, model.num_prefix_tokens :]
    if pool_type == "tok":
        np.testing.assert_array_equal(features["pooled"], features["tokens"][:, 0])
    elif pool_type == "gap":
        np.testing.assert_allclose(features["pooled"], patches.mean(axis=1), atol=1e-6)
        assert np.abs(features["pooled"] - features["tokens"].mean(axis=1)).max() > 1e-4
    else:
        np.testing.assert_allclose(features["pooled"], np.asarray(map_pooled), atol=1e-6)


def test_scan_and_remat_give_the_unrolled_gradients(tmp_path, images):
    w = public_weights_with_registers(3, tok=True, num_registers=2)
    path = tmp_path / "w.npz"
    np.savez(path, **w)
    models = []
    for scan, remat in ((False, "none"), (True, "full")):
        model = create_model("ViT-Ti/16", num_registers=2, scan=scan, remat=remat, **TINY)
        load_npz(model, path)
        models.append(model)

    def register_grad(model):
        grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(jnp.asarray(images)) ** 2)))(model)
        return np.asarray(nnx.to_pure_dict(grads)["registers"])

    reference = register_grad(models[0])
    assert np.abs(reference).max() > 1e-4
    for model in models[1:]:
        np.testing.assert_allclose(register_grad(model), reference, rtol=1e-4, atol=1e-6)


def test_registers_are_sharded_like_the_class_token():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "model": 1})
    model = nnx.eval_shape(lambda: create_model("ViT-Ti/16", num_registers=4, **TINY))
    state = nnx.state(model, nnx.Param)
    specs = {}
    for rules in ("dp", "fsdp", "fsdp_tp"):
        shardings = sharding.param_shardings(state, mesh, sharding.get_rules(rules))
        assert shardings["registers"].spec == shardings["cls_token"].spec
        specs[rules] = tuple(shardings["registers"].spec)
    assert specs["dp"] in ((), (None, None, None))  # replicated
    assert specs["fsdp"] == specs["fsdp_tp"] == (None, None, "fsdp")  # along embed, like cls


def test_weight_decay_skips_registers_as_it_skips_the_class_token():
    exclude = tiny_config().optim.weight_decay_exclude
    assert re.fullmatch(exclude, "registers") and re.fullmatch(exclude, "cls_token")
    assert not re.fullmatch(exclude, "blocks/0/attn/query/kernel")


# --- the .npz layout -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["original", "big_vision"])
def test_npz_round_trip_keeps_the_registers(tmp_path, images, layout):
    source = create_model("ViT-Ti/16", num_registers=3, seed=1, **TINY)
    path = tmp_path / "m.npz"
    save_npz(source, path, layout=layout)
    arrays = read_npz(path)
    np.testing.assert_array_equal(arrays["registers"], np.asarray(source.registers[...]))
    posemb = (
        "pos_embedding" if layout == "big_vision" else "Transformer/posembed_input/pos_embedding"
    )
    assert arrays[posemb].shape[1] == 16 + (layout == "original")  # no register slots
    for scan in (False, True):
        target = create_model("ViT-Ti/16", num_registers=3, seed=2, scan=scan, **TINY)
        assert not np.array_equal(target.registers[...], source.registers[...])
        load_npz(target, path)
        x = jnp.asarray(images)
        np.testing.assert_allclose(forward(target, x), forward(source, x), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(target.registers[...], source.registers[...])
    assert _npz_num_registers(str(path)) == 3


def test_npz_without_registers_does_not_fit_a_model_with_them(tmp_path):
    plain_file, registers_file = tmp_path / "plain.npz", tmp_path / "registers.npz"
    save_npz(create_model("ViT-Ti/16", **TINY), plain_file)
    save_npz(create_model("ViT-Ti/16", num_registers=2, **TINY), registers_file)
    assert _npz_num_registers(str(plain_file)) == 0
    cases = [
        (plain_file, 4, "missing registers (model (1, 4, 32))", "num_registers=0"),
        (registers_file, 0, "unexpected registers (file (1, 2, 32))", "num_registers=2"),
        (registers_file, 4, "registers (file (1, 2, 32) vs model (1, 4, 32))", "num_registers=2"),
    ]
    for path, model_registers, problem, fix in cases:
        model = create_model("ViT-Ti/16", num_registers=model_registers, **TINY)
        before = flat_params(model)
        with pytest.raises(CheckpointMismatchError) as info:
            load_npz(model, path)
        message = str(info.value)
        assert "1 array(s) differ" in message and problem in message, message
        assert f"config.model.{fix}" in message and len(message.splitlines()) == 1
        for key, value in flat_params(model).items():  # the model is left untouched
            np.testing.assert_array_equal(np.asarray(value), np.asarray(before[key]))


def test_predict_from_an_npz_builds_its_registers(tmp_path, digit_png, capsys):
    # The demo's ViT-mu/4 (6 blocks of width 96): the smallest model `--model` names.
    model = create_model("ViT-mu/4", img_size=16, num_classes=10, num_registers=2)
    path = str(tmp_path / "mu4.npz")
    save_npz(model, path)
    experiment = Experiment.from_npz(path, "ViT-mu/4", num_classes=10, img_size=16, num_registers=2)
    assert experiment.params["registers"].shape == (1, 2, 96)
    args = ["--checkpoint", path, "--model", "ViT-mu/4", "--img_size", "16", "--json"]
    assert cli.run("predict", [*args, digit_png]) == 0, capsys.readouterr().err
    assert '"file"' in capsys.readouterr().out


# --- the attention pictures ------------------------------------------------------------------


def test_rollout_follows_paths_through_a_register_and_leaves_it_out():
    # Tokens [class, register, patch 0, patch 1]. Layer 1: the register reads patch 1 only,
    # everyone else reads itself. Layer 2: the class token reads the register only.
    layer1 = np.eye(4)
    layer1[1] = [0, 0, 0, 1]
    layer2 = np.eye(4)
    layer2[0] = [0, 1, 0, 0]
    attention = np.stack([layer1[None], layer2[None]])  # (layers, heads, N, N)
    joint = np.linalg.multi_dot(
        [(layer + np.eye(4)) / 2 for layer in (layer2, layer1)]
    )  # the independent product, last layer first
    rollout = visualize.rollout_map(attention, (1, 2), num_prefix=1, num_registers=1)
    np.testing.assert_allclose(rollout, joint[0, 2:].reshape(1, 2))
    # Patch 1 got the share that flowed through the register: 1/4 from it, none to patch 0.
    np.testing.assert_allclose(rollout, [[0.0, 0.25]])
    # Without a class token (gap) the patch rows are averaged, not the register's.
    gap = attention[:, :, 1:, 1:] / attention[:, :, 1:, 1:].sum(-1, keepdims=True)
    joint = np.linalg.multi_dot([(a[0] + np.eye(3)) / 2 for a in gap[::-1]])
    gap_rollout = visualize.rollout_map(gap, (1, 2), num_prefix=0, num_registers=1)
    np.testing.assert_allclose(gap_rollout, joint[1:, 1:].mean(axis=0).reshape(1, 2))
    np.testing.assert_allclose(gap_rollout, [[0.5, 0.5]])  # over all rows: [1/3, 1/2]


def test_attention_distance_leaves_registers_out():
    # Uniform attention over class + 2 registers + 2x2 patches is the patches' own value.
    uniform = np.full((1, 1, 1, 7, 7), 1 / 7)
    patches_only = np.full((1, 1, 1, 4, 4), 0.25)
    np.testing.assert_allclose(
        visualize.mean_attention_distance(uniform, (2, 2), 4, num_prefix=1, num_registers=2),
        visualize.mean_attention_distance(patches_only, (2, 2), 4, num_prefix=0),
    )


# --- the command line ------------------------------------------------------------------------


def test_a_tiny_run_with_registers_trains_and_draws_its_rollout(tmp_path, digit_png, capsys):
    # Three steps (the zero-initialised head first has to move before anything else gets a
    # gradient), one evaluation and one checkpoint, at the end.
    short = {k: 3 for k in ("total_steps", "log_every_steps", "eval_every_steps")}
    flags = tiny_flags("model.num_registers=2", **short, schedule__warmup_steps=1)
    workdir = str(tmp_path / "run")
    assert cli.run("train", [*flags, f"--workdir={workdir}"]) == 0
    assert "final evaluation" in capsys.readouterr().out
    trained = Experiment.from_workdir(workdir)
    registers = np.asarray(trained.params["registers"])
    assert registers.shape == (1, 2, 32) and np.isfinite(registers).all()
    initial = np.asarray(trained.steps.build_model(trained.config.seed).registers[...])
    assert np.abs(registers - initial).max() > 1e-5  # trained, not left at the start
    out = str(tmp_path / "pictures")
    argv = ["attention", digit_png, "--workdir", workdir, "--out", out, "--show"]
    assert cli.run("visualize", argv) == 0, capsys.readouterr().err
    (picture,) = capsys.readouterr().out.split()
    assert picture == os.path.join(out, "attention_seven.png")
    with Image.open(picture) as image:
        assert image.format == "PNG" and np.asarray(image.convert("RGB")).std() > 0
    argv = ["distance", digit_png, "--workdir", workdir, "--out", str(tmp_path / "d.png")]
    assert cli.run("visualize", argv) == 0


def test_dry_run_shows_the_registers(tmp_path, capsys):
    flags = [*tiny_flags("model.num_registers=3"), f"--workdir={tmp_path}", "--dry_run"]
    assert cli.run("train", flags) == 0
    out = capsys.readouterr().out
    assert "model.num_registers = 3" in out
    assert "model: 3 register token(s) + 4 patch tokens = 7 tokens per image" in out
    assert cli.run("train", [*tiny_flags(), f"--workdir={tmp_path}", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "model.num_registers = 0" in out and "register token" not in out


def test_a_negative_count_is_refused_in_one_line(tmp_path, capsys):
    flags = [*tiny_flags("model.num_registers=-1"), f"--workdir={tmp_path / 'run'}"]
    assert cli.run("train", flags) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: config.model.num_registers=-1 must be in [0, inf)"
    assert not os.path.exists(tmp_path / "run")
