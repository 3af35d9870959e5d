"""The training loop end to end on digits: resume is exact, bad runs stop clearly, init_from."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import RESUME_RUN, tiny_config, with_changes

from vit_jax import data, loop
from vit_jax.checkpoint import Checkpointer, save_npz
from vit_jax.errors import UserError
from vit_jax.experiment import Experiment
from vit_jax.models import create_model

TINY_MODEL = dict(img_size=8, width=32, depth=2, mlp_dim=64, num_heads=2)


def restore_state(config, workdir, step):
    abstract = Experiment.from_config(config, num_classes=10).abstract_state
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1)
    return checkpointer.restore(abstract, step)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path, straight_run):
    config = tiny_config(**RESUME_RUN)
    straight, interrupted = straight_run, str(tmp_path / "interrupted")
    loop.run(config, interrupted, stop_after_step=2)
    assert Checkpointer(os.path.join(interrupted, "checkpoints"), every_steps=1).all_steps() == [2]
    loop.run(config, interrupted)

    state_a, record_a = restore_state(config, straight, 6)
    state_b, record_b = restore_state(config, interrupted, 6)
    assert record_a == record_b == {"step": 6}
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    losses_a = {
        r["step"]: r["train/loss"]
        for r in read_jsonl(f"{straight}/metrics.jsonl")
        if "train/loss" in r
    }
    losses_b = {
        r["step"]: r["train/loss"]
        for r in read_jsonl(f"{interrupted}/metrics.jsonl")
        if "train/loss" in r
    }
    assert losses_a == losses_b and sorted(losses_a) == [2, 4, 6]


def test_run_writes_metrics_tensorboard_and_evaluates(straight_run):
    records = read_jsonl(os.path.join(straight_run, "metrics.jsonl"))
    (last_test,) = [r for r in records if "test/count" in r and r["step"] == 6]
    assert last_test["test/count"] == data.num_examples(tiny_config().data, "test")
    assert 0.0 <= last_test["test/top1"] <= 1.0
    train_records = [r for r in records if "train/loss" in r]
    assert {"train/images_per_sec", "train/eta_seconds", "train/learning_rate"} <= set(
        train_records[-1]
    )
    events = os.listdir(os.path.join(straight_run, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, straight_run):
    # The shared run as if stopped after its checkpoint at 3, resumed on images that come out
    # of the preprocessing infinite (the train step is the shared run's: compiled once).
    shutil.copytree(straight_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")
    config = tiny_config(**RESUME_RUN)
    with config.unlocked():
        config.data.train.pp = config.data.train.pp.replace(
            "value_range(-1, 1)", "value_range(-1, 1e39)"
        )
    assert "1e39" in config.data.train.pp
    with pytest.raises(loop.NonFiniteLossError, match="NaN or Inf") as error:
        loop.run(config, str(tmp_path / "run"))
    assert "last good checkpoint (3)" in str(error.value)
    checkpointer = Checkpointer(os.path.join(tmp_path, "run", "checkpoints"), every_steps=1)
    assert checkpointer.all_steps() == [3]


def npz_of_random_model(path: str, **model) -> nnx.Module:
    """A model (of abstract shapes filled with random values: nothing compiled) saved as a
    released `.npz`."""
    abstract = nnx.eval_shape(lambda: create_model("ViT-Ti/4", **model))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), params)
    source = nnx.merge(graphdef, params, rest)
    save_npz(source, path)
    return source


def test_init_from_npz_replaces_head_and_keeps_body(tmp_path):
    """The parameters a run starts from (`Experiment.initial_params`, which the loop trains
    from: test_init_from_another_runs_checkpoint_... runs that through the loop)."""
    path = str(tmp_path / "pretrained.npz")
    source = npz_of_random_model(path, num_classes=7, pool_type="gap", **TINY_MODEL)
    config = tiny_config(**{"init_from.path": path})
    params = Experiment.from_config(config, num_classes=10).initial_params()
    source_params = nnx.to_pure_dict(nnx.state(source, nnx.Param))
    np.testing.assert_array_equal(
        np.asarray(params["blocks"][1]["attn"]["query"]["kernel"]),
        np.asarray(source_params["blocks"][1]["attn"]["query"]["kernel"]),
    )
    head = np.asarray(params["head"]["kernel"])
    assert head.shape == (32, 10) and not head.any()


def test_init_from_another_runs_checkpoint_and_fewshot_during_training(tmp_path, straight_run):
    config = tiny_config(
        **{
            "total_steps": 2,
            "init_from.path": straight_run,
            "optim.name": "sgd",  # another optimizer: only the parameters are taken
            "schedule.base_lr": 0.0,
            "schedule.warmup_steps": 0,
            "fewshot.datasets": ("digits",),
            "fewshot.shots": (1, 5),
        }
    )
    results = loop.run(config, str(tmp_path / "second"))
    before, _ = restore_state(tiny_config(**RESUME_RUN), straight_run, 6)  # its latest
    after, _ = restore_state(config, str(tmp_path / "second"), 2)
    for a, b in zip(  # that run kept a weight EMA: it is what init_from takes by default
        jax.tree.leaves(before["ema_params"]), jax.tree.leaves(after["params"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert 0.1 <= results["fewshot/digits_5shot"] <= 1.0
    assert 0.0 <= results["fewshot/digits_1shot"] <= 1.0


def test_resume_with_a_different_optimizer_is_refused_clearly(tmp_path, straight_run):
    shutil.copytree(straight_run, tmp_path / "run")
    # Trained on for 2 more steps (a finished run is not restored at all).
    changed = tiny_config(**RESUME_RUN, **{"optim.clip_global_norm": 0.0, "total_steps": 8})
    with pytest.raises(ValueError, match="does not match the train state"):
        loop.run(changed, str(tmp_path / "run"))


def test_config_errors_are_clear(tmp_path):
    """Each mistake is a UserError (one line from the command) that names the field."""
    config = tiny_config(batch_size=33)
    with pytest.raises(UserError, match="batch_size=33 is not divisible"):
        loop.run(config, str(tmp_path))
    config = with_changes(tiny_config(), total_steps=None)
    with pytest.raises(UserError, match="config.total_steps"):
        loop.run(config, str(tmp_path))
    config = tiny_config(**{"init_from.path": str(tmp_path / "missing")})
    with pytest.raises(UserError, match="init_from.path"):
        loop.run(config, str(tmp_path / "w"))
    config = tiny_config(**{"mesh.data": 3})
    with pytest.raises(UserError, match="needs 3 devices"):
        loop.run(config, str(tmp_path))
