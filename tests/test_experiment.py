"""Experiment, the one run builder: from a config, from a run's directory, from an `.npz`."""

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import tiny_config
from vit_jax import sharding
from vit_jax.checkpoint import CheckpointError, save_npz
from vit_jax.errors import UserError
from vit_jax.experiment import Experiment, check_run_directory, total_steps
from vit_jax.models import create_model


def test_the_mesh_resolves_minus_one_and_the_batch_is_checked_once():
    experiment = Experiment.from_config(tiny_config("mesh.data=-1", "mesh.fsdp=2"))
    assert dict(experiment.mesh.shape) == {"data": 4, "fsdp": 2, "model": 1}
    assert dict(experiment.mesh.shape) == sharding.mesh_shape({"data": -1, "fsdp": 2}, 8)
    with pytest.raises(UserError, match="config.batch_size=12 is not divisible by the 8"):
        Experiment.from_config(tiny_config("batch_size=12"))
    with pytest.raises(UserError, match="needs 3 devices but 8 are available"):
        Experiment.from_config(tiny_config("mesh.data=3"))


def test_total_steps_from_epochs_rounds_up_and_the_data_gives_the_class_count():
    config = tiny_config("total_steps=None", "num_epochs=2.5")
    assert total_steps(config, 1000) == math.ceil(2.5 * 1000 / 32)
    assert total_steps(config, None) is None
    experiment = Experiment.from_config(config)
    assert experiment.num_classes == 10
    assert experiment.total_steps == math.ceil(2.5 * 1437 / 32)  # digits: 1,437 train images


def test_a_scanned_model_is_counted_like_its_unrolled_twin():
    """XLA counts a scan's body once: the scanned model's counts (train and eval steps),
    extrapolated from unrolled twins at depth 1 and 2, are the unrolled model's (its train
    step counted whole, from the very lowering that is compiled)."""
    scanned = Experiment.from_config(tiny_config("model.scan=true", "model.depth=4"))
    unrolled = Experiment.from_config(tiny_config("model.scan=false", "model.depth=4"))
    lowered = unrolled.lower_train_step()
    assert unrolled.step_flops() == lowered.cost_analysis()["flops"]
    assert unrolled.lower_train_step() is lowered
    assert scanned.step_flops() == pytest.approx(unrolled.step_flops(), rel=1e-3)
    assert scanned.lower_train_step().cost_analysis()["flops"] < unrolled.step_flops() / 2
    # The eval step likewise; forward only on the same 32 images: a third of the train step.
    assert scanned.eval_flops(32) == pytest.approx(unrolled.eval_flops(32), rel=1e-3)
    assert 2 < unrolled.step_flops() / unrolled.eval_flops(32) < 4


def fake_run(root, config) -> str:
    """A run's directory as the trainer leaves it, without training: config and folder."""
    run = os.path.join(root, "run")
    os.makedirs(os.path.join(run, "checkpoints"))
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    return run


def test_a_run_is_its_directory_everywhere(tmp_path):
    run = fake_run(tmp_path, tiny_config())
    check_run_directory(run, "--workdir")  # accepted
    with pytest.raises(UserError, match=f"give the run's directory, {run}$"):
        check_run_directory(os.path.join(run, "checkpoints"), "config.init_from.path")
    with pytest.raises(UserError, match="no config.json, so not a training run's directory"):
        check_run_directory(str(tmp_path), "--workdir")
    with pytest.raises(UserError, match="no such directory"):
        check_run_directory(str(tmp_path / "nope"), "--workdir")
    config = tiny_config(f"init_from.path={run}/checkpoints")
    with pytest.raises(UserError, match="config.init_from.path .*give the run's directory"):
        Experiment.from_config(config).initial_params()
    with pytest.raises(UserError, match="no complete checkpoint yet"):
        Experiment.from_workdir(run)


def test_a_released_npz_gives_the_models_own_logits_and_a_mismatch_is_refused(tmp_path):
    # The model's shapes filled with random values, head included (nothing compiled for an
    # initialisation); both models run through one jitted forward pass.
    abstract = nnx.eval_shape(lambda: create_model("ViT-mu/4", num_classes=7, img_size=32))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(x.dtype), params)
    model = nnx.merge(graphdef, params, rest)
    path = str(tmp_path / "mu.npz")
    save_npz(model, path)
    loaded = Experiment.from_npz(path, "ViT-mu/4", num_classes=7, img_size=32).model()
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    forward = nnx.jit(lambda m, x: m(x, train=False))
    expected = np.asarray(forward(model, images))
    assert np.ptp(expected) > 0.01  # logits that differ by image and class
    np.testing.assert_allclose(np.asarray(forward(loaded, images)), expected, atol=1e-6)
    with pytest.raises(CheckpointError):  # the file is not a ViT-Ti/16
        Experiment.from_npz(path, "ViT-Ti/16", num_classes=7, img_size=32)
