"""The sharded train step: same losses on any mesh, accumulation, resharding restores."""

import functools
import logging
import os

import helpers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.vit import demo_config
from vit_jax import sharding
from vit_jax.checkpoint import Checkpointer
from vit_jax.errors import UserError
from vit_jax.experiment import Experiment

BATCH = 32
STEPS = 4


def tiny_config(**changes):
    """The shared tiny run (tests/helpers.py) with one warmup step and a faster rate."""
    return helpers.tiny_config("schedule.warmup_steps=1", "schedule.base_lr=3e-3", **changes)


def batches(count=STEPS, batch=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield {
            "image": jnp.asarray(rng.normal(size=(batch, 8, 8, 3)), jnp.float32),
            "labels": jax.nn.one_hot(rng.integers(0, 10, batch), 10),
        }


def make_trainer(config, mesh_shape, devices=None):
    """The run's StepBuilder on the given mesh, built the one way: through Experiment."""
    devices = devices or jax.devices()[: int(np.prod(list(mesh_shape.values())))]
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh.update({"data": 1, "fsdp": 1, "model": 1, **mesh_shape})
    return Experiment.from_config(config, devices=devices, num_classes=10, steps=100).steps


def small_config(**changes):
    """The tiny run at depth 1: every check here is per block, and every block costs about
    a second of each compile."""
    base = {"schedule.warmup_steps": 1, "schedule.base_lr": 3e-3, "model.depth": 1}
    return helpers.tiny_config(**{**base, **changes})


# The run of the mesh comparison. Its single-device step is also the AdamW case of
# test_skipped_steps_... (one program, compiled once per session).
MESH_RUN = {"on_nonfinite": "skip"}
# Plain SGD (no momentum, decay or clipping) with a rate still warming up: its update is
# exactly -lr * grad, linear in the gradient. The SGD case of test_skipped_steps_... and the
# large batch of test_gradient_accumulation_... (one program).
SGD_RUN = {
    "on_nonfinite": "skip",
    "schedule.warmup_steps": 10,
    "schedule.decay": "constant",
    "schedule.base_lr": 1.0,
    "optim.name": "sgd",
    "optim.momentum": 0.0,
    "optim.weight_decay": 0.0,
    "optim.clip_global_norm": None,
    "optim.decay_unscaled": False,
}


@functools.cache
def initial_params():
    """The random initial parameters, made once (on one device, as host arrays): every run
    here starts from them (test_checkpoint_from_8_devices_restores_on_4 checks that a
    sharded initialisation makes the same)."""
    return jax.device_get(make_trainer(small_config(), {"data": 1}).init_state()["params"])


def loss_trajectory(config, mesh_shape):
    trainer = make_trainer(config, mesh_shape)
    state = trainer.init_state(initial_params())
    step = trainer.make_train_step()
    losses = []
    for batch in batches():
        state, stats = step(state, batch)
        losses.append(float(stats["loss"]))
    return np.array(losses), state


def test_meshes_match_single_device():
    config = small_config(**MESH_RUN)
    reference_losses, reference_state = loss_trajectory(config, {"data": 1})
    assert reference_losses[-1] < reference_losses[0]  # it trains
    for mesh_shape in ({"data": 8}, {"data": 4, "model": 2}, {"fsdp": 8}):
        losses, state = loss_trajectory(config, mesh_shape)
        np.testing.assert_allclose(
            losses, reference_losses, rtol=2e-5, atol=2e-5, err_msg=str(mesh_shape)
        )
        for got, want in zip(
            jax.tree.leaves(state["params"]),
            jax.tree.leaves(reference_state["params"]),
            strict=True,
        ):
            np.testing.assert_allclose(
                np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5, err_msg=str(mesh_shape)
            )


def test_fsdp_and_tensor_parallel_really_shard_parameters():
    trainer = make_trainer(tiny_config(sharding_rules="fsdp_tp"), {"fsdp": 4, "model": 2})
    _, shardings = trainer.state_shardings
    fc1 = shardings["params"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    query = shardings["params"]["blocks"][0]["attn"]["query"]["kernel"]
    assert fc1.spec == jax.sharding.PartitionSpec("fsdp", "model")
    assert query.spec == jax.sharding.PartitionSpec("fsdp", "model", None)
    mu = shardings["opt_state"]
    assert any(
        getattr(s, "spec", None) == jax.sharding.PartitionSpec("fsdp", "model")
        for s in jax.tree.leaves(mu, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    )


def test_gradient_accumulation_equals_large_batch():
    # SGD: the update is linear in the gradient (Adam would amplify round-off on ~0 gradients).
    plain, plain_state = loss_trajectory(small_config(**SGD_RUN), {"data": 2})
    accumulated, accum_state = loss_trajectory(
        small_config(**SGD_RUN, **{"optim.grad_accum_steps": 4}), {"data": 2}
    )
    np.testing.assert_allclose(accumulated, plain, rtol=1e-5, atol=1e-6)
    moved = [  # the rate warms up from 0: the steps did move the parameters
        np.abs(np.asarray(p) - q).max()
        for p, q in zip(
            jax.tree.leaves(plain_state["params"]), jax.tree.leaves(initial_params()), strict=True
        )
    ]
    assert max(moved) > 1e-3, moved
    for got, want in zip(
        jax.tree.leaves(accum_state["params"]), jax.tree.leaves(plain_state["params"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_accumulation_rejects_indivisible_batch_when_the_run_is_built():
    with pytest.raises(UserError, match="config.optim.grad_accum_steps=5"):
        make_trainer(tiny_config(**{"optim.grad_accum_steps": 5}), {"data": 1})


def test_checkpoint_from_8_devices_restores_on_4(tmp_path):
    config = small_config(**MESH_RUN)  # the step is test_meshes_match_single_device's
    big = make_trainer(config, {"fsdp": 8})
    state = big.init_state()  # initialised sharded 8 ways: the single-device initialisation
    initial = jax.tree.leaves(initial_params())
    for got, want in zip(jax.tree.leaves(state["params"]), initial, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    state, _ = big.make_train_step()(state, next(batches()))
    checkpointer = Checkpointer(str(tmp_path), every_steps=1, async_save=True)
    checkpointer.save(1, state, {"step": 1})
    checkpointer.close()

    small = make_trainer(config, {"fsdp": 4})
    abstract, _ = small.state_shardings
    restored, record = Checkpointer(str(tmp_path), every_steps=1).restore(abstract)
    assert record["step"] == 1
    kernel = restored["params"]["blocks"][0]["mlp"]["fc2"]["kernel"]
    assert len(kernel.sharding.device_set) == 4
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bfloat16_compute_keeps_float32_state():
    config = small_config(**{"model.dtype": "bfloat16", "optim.mu_dtype": "bfloat16"})
    trainer = make_trainer(config, {"data": 2})
    abstract, _ = trainer.state_shardings  # the state it initialises (from these shapes)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract["params"]))
    losses, state = loss_trajectory(config, {"data": 2})
    assert np.all(np.isfinite(losses))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    moments = [x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 1]
    assert jnp.bfloat16 in moments


def test_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh({"data": 16})
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.make_mesh({"tensor": 2, "data": -1})
    with pytest.raises(ValueError, match="unknown sharding rules"):
        sharding.get_rules("zero3")


def test_checkpointer_keeps_last_k_and_every_mth_and_ignores_partial_saves(tmp_path):
    state = {"w": jnp.arange(4.0), "step": jnp.array(0)}
    checkpointer = Checkpointer(str(tmp_path), every_steps=1, keep=2, keep_every=3)
    for step in range(1, 8):
        checkpointer.save(step, state)  # the record is {"step": step}
        checkpointer.wait()
    checkpointer.close()
    # An interrupted save leaves only a temporary directory: never listed, never read.
    os.makedirs(tmp_path / "9.orbax-checkpoint-tmp" / "state")
    reopened = Checkpointer(str(tmp_path), every_steps=1)
    assert reopened.all_steps() == [3, 6, 7]
    assert reopened.latest_step() == 7
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape,
            x.dtype,
            sharding=sharding.replicated(sharding.make_mesh({"data": 1}, jax.devices()[:1])),
        ),
        state,
    )
    restored, record = reopened.restore(abstract)
    assert record == {"step": 7}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))


def test_on_cpu_a_replicated_array_is_saved_whole_without_compiling_a_slice(tmp_path, caplog):
    """Orbax's default splits a replicated array's write into a slice per device, each a
    compiled program; on CPU devices the Checkpointer writes it whole, compiling nothing."""
    mesh = sharding.make_mesh({"data": 8})
    weights = jnp.arange(120.0).reshape(24, 5)  # 8 slices of 3 rows; no other test's shape
    state = {"w": jax.device_put(weights, sharding.replicated(mesh))}
    checkpointer = Checkpointer(str(tmp_path), every_steps=1)
    jax.config.update("jax_log_compiles", True)  # for orbax's threads too (not a context)
    try:
        with caplog.at_level(logging.WARNING):
            checkpointer.save(1, state)
            checkpointer.wait()
    finally:
        jax.config.update("jax_log_compiles", False)
    checkpointer.close()
    assert [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()] == []
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored, _ = Checkpointer(str(tmp_path), every_steps=1).restore(abstract)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(weights))


def test_train_step_compiles_from_abstract_shapes_with_the_published_cost():
    """ViT-Ti/16 at 224 px: ahead-of-time compile on a 4x2 mesh, nothing allocated; XLA's FLOP
    count is about 3 forward passes (1.25 G multiply-adds each) per image."""
    config = demo_config()
    with config.unlocked():
        config.model_name = "ViT-Ti/16"
        config.model = type(config.model)({k: None for k in config.model})
        config.model.update(img_size=224, scan=True, pool_type="tok")
        config.data.image_size = 224
        config.batch_size = 8
    config.mesh.update(data=1, fsdp=4, model=2)
    experiment = Experiment.from_config(config, devices=jax.devices()[:8], num_classes=1000)
    compiled, flops = experiment.compile_train_step(), experiment.step_flops()
    expected = 3 * 2 * 1.25e9 * config.batch_size
    assert 0.9 * expected < flops < 1.25 * expected
    assert compiled.memory_analysis().argument_size_in_bytes > 0


def opt_state_counts(opt_state) -> list[int]:
    """Every optax step counter (`count` field) in an optimizer state."""
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return [int(leaf) for path, leaf in leaves if getattr(path[-1], "name", None) == "count"]


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_skipped_steps_advance_the_optimizer_counters_with_the_step(name):
    # Plain SGD applies exactly -lr * grad, so the applied learning rate is |update| / |grad|;
    # it must be the logged schedule(step), still warming up.
    if name == "sgd":
        config, mesh_shape = small_config(**SGD_RUN), {"data": 2}
    else:
        config, mesh_shape = small_config(**MESH_RUN), {"data": 1}
    trainer = make_trainer(config, mesh_shape)
    state = trainer.init_state(initial_params())
    step = trainer.make_train_step()
    for index, batch in enumerate(batches(count=5)):
        if index in (1, 2):  # two non-finite steps, skipped
            batch = dict(batch, image=jnp.full_like(batch["image"], jnp.nan))
        before = jax.device_get(state["params"])
        state, stats = step(state, batch)
        assert int(stats["skipped"]) == (index in (1, 2))
        counts = opt_state_counts(state["opt_state"])
        assert counts and all(c == int(state["step"]) == index + 1 for c in counts), counts
        if index in (1, 2):  # the skipped step kept the parameters
            kept = zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before), strict=True)
            for got, want in kept:
                np.testing.assert_array_equal(np.asarray(got), want)
        if name == "sgd" and index >= 3:
            after = jax.device_get(state["params"])
            delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), after, before)
            applied = float(jnp.sqrt(sum(jnp.sum(d**2) for d in jax.tree.leaves(delta))))
            applied /= float(stats["grad_norm"])
            expected = float(trainer.schedule()(index))
            assert 0 < expected < float(config.schedule.base_lr)  # warming up
            assert float(stats["learning_rate"]) == pytest.approx(expected)
            assert applied == pytest.approx(expected, rel=1e-3)
