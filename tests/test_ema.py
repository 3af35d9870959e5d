"""Weight EMA (`config.ema_decay`): a float32 moving average of the parameters kept inside
the jitted step, sharded like them, in the checkpoint, evaluated next to them."""

import json
import os

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import TRAINED_RUN
from test_steps import batches, make_trainer, tiny_config

from vit_jax import cli, inference
from vit_jax import steps as steps_module
from vit_jax.errors import UserError
from vit_jax.experiment import Experiment

DECAY = 0.9


def numpy_ema(trajectory: list[dict], decay: float) -> dict:
    """The EMA recurrence written out in NumPy (float64): it starts at the initial
    parameters, and the update that makes step t uses min(decay, (1 + t) / (10 + t))."""
    average = jax.tree.map(lambda p: np.asarray(p, np.float64), trajectory[0])
    for t, params in enumerate(trajectory[1:], start=1):
        d = min(decay, (1 + t) / (10 + t))
        average = jax.tree.map(lambda a, p, d=d: d * a + (1 - d) * np.asarray(p), average, params)
    return average


def test_the_ema_is_the_numpy_recurrence_over_the_parameters_and_sharded_like_them():
    """4 steps on an FSDP x tensor-parallel mesh: the average is the NumPy recurrence and
    sharded like the parameters; then a step with a NaN input is skipped (on_nonfinite=skip,
    which only wraps the same update in a `where`) and leaves the average as it was."""
    config = tiny_config(ema_decay=DECAY, on_nonfinite="skip")
    builder = make_trainer(config, {"fsdp": 4, "model": 2})
    state = builder.init_state()
    step = builder.make_train_step()
    trajectory = [jax.device_get(state["params"])]
    for batch in batches(4):
        state, stats = step(state, batch)
        assert int(stats["skipped"]) == 0
        trajectory.append(jax.device_get(state["params"]))
    expected = numpy_ema(trajectory, DECAY)
    for got, want in zip(
        jax.tree.leaves(state["ema_params"]), jax.tree.leaves(expected), strict=True
    ):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    for ema, params in zip(
        jax.tree.leaves(state["ema_params"]), jax.tree.leaves(state["params"]), strict=True
    ):
        assert ema.sharding == params.sharding
    # After 4 steps it lies between the start and the parameters, not on either.
    first = jax.tree.leaves(trajectory[0])[0]
    last = jax.tree.leaves(trajectory[-1])[0]
    ema = np.asarray(jax.tree.leaves(state["ema_params"])[0])
    assert not np.allclose(ema, last) and not np.allclose(ema, first)

    # A skipped step leaves the average as it was.
    before = jax.device_get(state["ema_params"])
    bad = next(batches(1, seed=1))
    bad["image"] = bad["image"].at[0, 0, 0, 0].set(jnp.nan)
    state, stats = step(state, bad)
    assert int(stats["skipped"]) == 1
    for got, want in zip(
        jax.tree.leaves(state["ema_params"]), jax.tree.leaves(before), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_without_ema_the_state_and_the_step_are_unchanged():
    builder = make_trainer(tiny_config(), {"data": 2})
    assert set(builder.state_shardings[0]) == {"params", "opt_state", "step"}
    assert set(builder.init_state()) == {"params", "opt_state", "step"}


def test_the_decay_warms_up_then_holds():
    assert float(steps_module.ema_decay_at(0.9999, 1)) == pytest.approx(2 / 11)
    assert float(steps_module.ema_decay_at(0.9999, 10_000)) == pytest.approx(10001 / 10010)
    assert float(steps_module.ema_decay_at(0.5, 100)) == 0.5


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_a_decay_outside_zero_to_one_is_refused(value):
    from vit_jax import validate

    with pytest.raises(UserError, match=r"config.ema_decay=.* must be in \[0.0, 1.0\)"):
        validate.check_config(tiny_config(ema_decay=value))


# --- a run with an EMA: evaluated, checkpointed, and taken by the commands -------------------


def saved(run_dir: str, step: int) -> dict:
    path = os.path.join(run_dir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


def test_a_run_with_an_ema_evaluates_both_next_to_each_other(trained_run):
    rows = [json.loads(line) for line in open(os.path.join(trained_run, "metrics.jsonl"))]
    for step in (50, 100):
        evaluated = {k for r in rows if r["step"] == step for k in r}
        assert {"test/top1", "test_ema/top1", "test_ema/loss"} <= evaluated
    last = {k: v for r in rows if r["step"] == 100 for k, v in r.items()}
    assert last["test_ema/top1"] != last["test/top1"] or last["test_ema/loss"] != last["test/loss"]
    assert last["test_ema/top1"] > 0.3  # a working model, not the random start (0.1)
    state = saved(trained_run, 100)
    assert set(state) == {"params", "opt_state", "step", "ema_params"}


def test_predict_export_and_init_from_take_the_ema_unless_told_otherwise(
    trained_run, tmp_path, capsys
):
    state = saved(trained_run, 100)
    ema = inference.load_run(trained_run)
    raw = inference.load_run(trained_run, params="raw")
    assert (ema.parameters, raw.parameters) == ("ema", "raw")
    for model, tree in ((ema.model, state["ema_params"]), (raw.model, state["params"])):
        kernel = np.asarray(nnx.to_pure_dict(nnx.state(model, nnx.Param))["head"]["kernel"])
        np.testing.assert_array_equal(kernel, tree["head"]["kernel"])

    out = tmp_path / "model.npz"
    assert cli.run("export", ["--workdir", trained_run, "--format", "npz", "--out", str(out)]) == 0
    assert "used the weight EMA of step 100" in capsys.readouterr().err
    with np.load(out, allow_pickle=False) as exported:
        np.testing.assert_array_equal(
            exported["head/kernel"], state["ema_params"]["head"]["kernel"]
        )

    for choice, tree in (("auto", "ema_params"), ("raw", "params")):
        changes = {**TRAINED_RUN, "init_from.path": trained_run, "init_from.params": choice}
        config = helpers.tiny_config(**changes)
        params = Experiment.from_config(config).initial_params()
        np.testing.assert_array_equal(
            np.asarray(params["head"]["kernel"]), state[tree]["head"]["kernel"]
        )


def test_asking_for_the_ema_of_a_run_without_one_is_one_line(straight_long_run, tmp_path, capsys):
    out = tmp_path / "unused.npz"
    args = ["--workdir", straight_long_run, "--params", "ema", "--format", "npz", "--out", str(out)]
    assert cli.run("export", args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--params=ema" in err and "kept no weight EMA" in err
    assert not out.exists()
