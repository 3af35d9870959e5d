"""Failure behaviour: stop signals, kill -9, full disks, bad numerics, strangers' checkpoints
and bad input each end with a clear message and lose nothing."""

import errno
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from data_fixtures.images import write_folder
from helpers import RESUME_RUN, STOPPED_RUN, free_port, tiny_config, tiny_flags, with_changes
from orbax.checkpoint._src.path import atomicity
from test_cli import ROOT, cli_env, failure
from test_train import read_jsonl, restore_state

from vit_jax import data, loop
from vit_jax.checkpoint import Checkpointer
from vit_jax.checkpoint import manager as checkpoint_manager
from vit_jax.data.sources import folder
from vit_jax.errors import UserError
from vit_jax.experiment import Experiment
from vit_jax.steps import ConfigValueError

TESTS = os.path.dirname(os.path.abspath(__file__))


def saved_state(workdir, step):
    """A checkpoint's arrays as saved (no target tree needed)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


def assert_same_arrays(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def steps_on_disk(workdir):
    return Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1).all_steps()


# --- 1. SIGTERM / SIGINT -------------------------------------------------------------------


def stopped_command(workdir):
    """`python -m vit_jax train` of STOPPED_RUN: 100 steps, a log line each."""
    return [sys.executable, "-m", "vit_jax", "train", f"--workdir={workdir}"] + tiny_flags(
        **STOPPED_RUN
    )


# SIGTERM to a single process, its exit status 143 and the bit-identical rerun: the bucket
# run's test (tests/test_bucket_run.py), whose storage path includes this one's.


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
    """JAX's preemption service: both processes (one device each) save the same step and exit
    143."""
    port, workdir = free_port(), str(tmp_path / "run")
    procs = []
    for index in range(2):
        multi = [
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={index}",
            "--local_device_count=1",
        ]
        with open(tmp_path / f"stderr{index}", "w") as err:
            procs.append(
                subprocess.Popen(
                    stopped_command(workdir) + multi,
                    cwd=ROOT,
                    env=cli_env(1),
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                )
            )
    for line in procs[0].stdout:  # only process 0 prints progress
        if line.startswith("step 3/"):
            procs[1].send_signal(signal.SIGTERM)  # the other one is preempted
            break
    procs[0].stdout.read()
    statuses = [p.wait(timeout=300) for p in procs]
    stderrs = [(tmp_path / f"stderr{i}").read_text() for i in range(2)]
    assert statuses == [143, 143], failure(stderrs[0] + stderrs[1])
    (step,) = steps_on_disk(workdir)
    for stderr in stderrs:
        assert f"stopped by SIGTERM: saved the checkpoint of step {step} in" in stderr


def test_sigint_saves_the_current_step_and_exits_130(tmp_path, monkeypatch):
    real = data.train_batches

    def interrupting(*args, **kwargs):  # Ctrl-C while the 3rd batch is being read
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(data, "train_batches", interrupting)
    # The tiny run's own program (6 steps; compiled once per session): no checkpoint or
    # evaluation before the end, so the stop's checkpoint is the only one.
    config = tiny_config(**{"eval_every_steps": 6, "checkpoint.every_steps": 6})
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(loop.Preempted) as stop:
        loop.run(config, str(tmp_path))
    assert stop.value.code == 130 and isinstance(stop.value, SystemExit)
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is put back
    step = stop.value.step
    assert 1 <= step < 6 and steps_on_disk(str(tmp_path)) == [step]
    assert f"stopped by SIGINT: saved the checkpoint of step {step}" in str(stop.value)
    state, record = restore_state(config, str(tmp_path), step)
    assert record["step"] == int(state["step"]) == step


# --- 2. kill -9, also in the middle of an asynchronous save -------------------------------

KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from orbax.checkpoint._src.path import atomicity

original = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self):  # the data of step 6 is written, the commit is not
    if self.get_final().name == "6":
        os.kill(os.getpid(), signal.SIGKILL)
    return await original(self)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
from helpers import RESUME_RUN, tiny_config
from vit_jax import loop
loop.run(tiny_config(**RESUME_RUN), sys.argv[1])
"""


@pytest.mark.slow
def test_kill_9_during_an_async_save_resumes_from_the_last_complete_one(tmp_path, straight_run):
    workdir = str(tmp_path)
    env = {**os.environ, "PYTHONPATH": ROOT}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE.format(tests=TESTS), workdir],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, failure(killed.stderr)
    leftovers = [n for n in os.listdir(tmp_path / "checkpoints") if "orbax-checkpoint-tmp" in n]
    assert leftovers and leftovers[0].startswith("6.")  # a half-written step 6

    loop.run(tiny_config(**RESUME_RUN), workdir)  # resumes from 3, not from the half-written 6
    names = os.listdir(tmp_path / "checkpoints")
    assert not [n for n in names if "tmp" in n] and {"3", "6"} <= set(names)
    assert_same_arrays(saved_state(workdir, 6), saved_state(straight_run, 6))
    # Steps 4-6 ran twice but are logged once (the first session's rows after 3 dropped).
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
    assert [r["step"] for r in rows if "test/top1" in r] == [3, 6]


def test_half_written_checkpoint_is_never_picked_up_and_is_cleaned(tmp_path):
    directory = str(tmp_path / "checkpoints")
    checkpointer = Checkpointer(directory, every_steps=1, async_save=False)
    checkpointer.save(2, {"w": np.ones(3, np.float32)}, {"step": 2})
    checkpointer.close()
    # What orbax leaves when killed mid-save: a tmp-suffixed directory, no commit marker.
    partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text("{")
    assert not (partial / atomicity.COMMIT_SUCCESS_FILE).exists()

    reopened = Checkpointer(directory, every_steps=1)
    assert reopened.latest_step() == 2 and reopened.all_steps() == [2]
    reopened.wait()
    reopened.save(3, {"w": np.zeros(3, np.float32)}, {"step": 3})  # waits for the cleanup
    reopened.close()
    assert sorted(os.listdir(directory)) == ["2", "3"]


def test_reading_another_runs_checkpoints_leaves_its_save_in_progress_alone(tmp_path):
    """predict/export/init_from open a run that may still be saving: nothing is cleaned."""
    directory = str(tmp_path / "checkpoints")
    writer = Checkpointer(directory, every_steps=1, async_save=False)
    writer.save(2, {"w": np.ones(3, np.float32)}, {"step": 2})
    writer.close()
    in_progress = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000"
    (in_progress / "state").mkdir(parents=True)
    reader = Checkpointer(directory, every_steps=1, read_only=True)
    assert reader.latest_step() == 2
    reader.close()
    assert in_progress.exists()
    assert not os.path.exists(tmp_path / "elsewhere")
    Checkpointer(str(tmp_path / "elsewhere"), every_steps=1, read_only=True).close()
    assert not os.path.exists(tmp_path / "elsewhere")  # nothing created either


# --- 3. full disks -------------------------------------------------------------------------


def test_no_room_for_one_checkpoint_is_refused_before_training(tmp_path, monkeypatch):
    free = checkpoint_manager.shutil.disk_usage(str(tmp_path))._replace(free=4096)
    monkeypatch.setattr(checkpoint_manager.shutil, "disk_usage", lambda path: free)
    with pytest.raises(checkpoint_manager.NoRoomError) as error:
        loop.run(tiny_config(), str(tmp_path))
    message = str(error.value)
    assert "no room for a checkpoint in" in message and str(tmp_path) in message
    assert "MiB" in message and "\n" not in message and isinstance(error.value, UserError)
    assert not os.path.exists(tmp_path / "metrics.jsonl") or not any(
        "train/loss" in r for r in read_jsonl(tmp_path / "metrics.jsonl")
    )


@pytest.mark.slow
def test_failed_save_keeps_the_previous_checkpoint_and_names_step_and_path(tmp_path, monkeypatch):
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full(self):
        if self.get_final().name == "6":
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
    config = tiny_config()
    with pytest.raises(checkpoint_manager.CheckpointSaveError) as error:
        loop.run(config, str(tmp_path))
    message = str(error.value)
    assert f"step 6 to {tmp_path}/checkpoints/6" in message
    assert "No space left on device" in message and "step 3 is kept" in message
    assert steps_on_disk(str(tmp_path)) == [3]
    state, record = restore_state(config, str(tmp_path), 3)  # intact and readable
    assert record["step"] == int(state["step"]) == 3


# --- 4. numerics ---------------------------------------------------------------------------


def test_skip_drops_nonfinite_steps_counts_them_and_stops_after_too_many(tmp_path, monkeypatch):
    real = data.train_batches
    poisoned = {3, 5, 6}  # steps whose batch is NaN

    def with_nan(*args, start_step=0, **kwargs):
        for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step + 1):
            if step in poisoned:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield batch

    monkeypatch.setattr(data, "train_batches", with_nan)
    config = tiny_config(
        **{
            "on_nonfinite": "skip",
            "max_consecutive_skips": 2,
            "total_steps": 8,
            "log_every_steps": 1,
            "checkpoint.every_steps": 2,
        }
    )
    with pytest.raises(loop.TooManySkippedStepsError) as error:
        loop.run(config, str(tmp_path))
    assert "2 steps in a row up to step 6" in str(error.value)
    assert "config.max_consecutive_skips=2" in str(error.value)
    assert steps_on_disk(str(tmp_path)) == [2, 4]  # nothing saved after the bad streak
    records = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r}
    assert [records[s]["train/skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 0]
    assert records[3]["train/param_norm"] == records[2]["train/param_norm"]  # no update
    assert records[4]["train/param_norm"] != records[3]["train/param_norm"]
    state, _ = restore_state(config, str(tmp_path), 4)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"on_nonfinite": "ignore"}, "config.on_nonfinite='ignore' is not one of"),
        ({"on_nonfinite": "skip", "max_consecutive_skips": 0}, "config.max_consecutive_skips=0"),
    ],
)
def test_nonfinite_settings_are_validated(tmp_path, changes, expected):
    with pytest.raises(ConfigValueError, match=expected):
        loop.run(with_changes(tiny_config(), **changes), str(tmp_path))


# --- 5. checkpoints from strangers ---------------------------------------------------------


def write_checkpoint(config, directory, num_classes=10, step=1):
    experiment = Experiment.from_config(config, num_classes=num_classes, steps=6)
    checkpointer = Checkpointer(directory, every_steps=1, async_save=False)
    checkpointer.save(step, experiment.init_state(), {"step": step})
    checkpointer.close()


@pytest.mark.slow
def test_another_models_checkpoint_lists_every_mismatched_key(tmp_path):
    run = tmp_path / "seven"  # a run's directory: its config and checkpoints
    source = str(run / "checkpoints")
    write_checkpoint(tiny_config(), source, num_classes=7)
    (run / "config.json").write_text(tiny_config().to_json())

    with pytest.raises(checkpoint_manager.StateMismatchError) as resumed:  # in its workdir
        loop.run(tiny_config(), str(tmp_path / "seven"))  # digits: 10 classes
    message = str(resumed.value)
    assert "6 with other shapes: params/head/bias expected (10,) found (7,), " in message
    assert "params/head/kernel expected (32, 10) found (32, 7)" in message
    assert "opt_state/1/nu/head/kernel expected (32, 10) found (32, 7)" in message
    assert "\n" not in message and isinstance(resumed.value, UserError)

    wider = tiny_config(**{"model.width": 48, "init_from.path": str(run)})
    with pytest.raises(checkpoint_manager.StateMismatchError) as init:  # via init_from
        loop.run(wider, str(tmp_path / "new"))
    message = str(init.value)
    assert "params/patch_embed/kernel expected" not in message  # only the first 20 listed
    assert "params/blocks/0/mlp/fc1/kernel expected (48, 64) found (32, 64)" in message
    assert "and 17 more" in message and "opt_state/" not in message
    assert message.endswith(
        "Point config.init_from.path at a run of the same model and class count."
    )


# --- 6. data -------------------------------------------------------------------------------


@pytest.fixture
def image_root(tmp_path):
    folder.scan_split.cache_clear()
    folder.class_names.cache_clear()
    write_folder(str(tmp_path), {"train": {"cat": 3, "dog": 3, "eel": 2}, "test": {"cat": 2}})
    return str(tmp_path)


def folder_config(root, num_classes="{num_classes}"):
    pp = f"decode|resize(8)|value_range(0, 1)|onehot({num_classes})"
    return data.get_data_config(
        f"folder:{root}", image_size=8, train={"pp": pp}, evals={"test": {"pp": pp}}
    )


def test_label_out_of_range_names_the_dataset(image_root):
    cfg = folder_config(image_root, num_classes=2)  # class 'eel' has label 2
    with pytest.raises(data.DataError, match="label out of range") as error:
        for _ in data.train_batches(
            cfg, global_batch_size=8, seed=0, process_index=0, process_count=1
        ):
            pass
    message = str(error.value)
    assert image_root in message and "'train'" in message and "\n" not in message
    assert "must be in [0, 2); fix num_classes" in message and message.endswith(": [2]")


def test_class_folder_without_images_is_refused(image_root):
    os.makedirs(os.path.join(image_root, "train", "fox"))
    with pytest.raises(data.DataError, match="class folder .*fox.* has no") as error:
        data.num_examples(folder_config(image_root))
    assert "remove the folder" in str(error.value) and isinstance(error.value, UserError)


def test_empty_split_is_refused(image_root, caplog):
    for name in os.listdir(os.path.join(image_root, "test", "cat")):
        with open(os.path.join(image_root, "test", "cat", name), "wb") as f:
            f.write(b"")  # every image of the split is broken, so none is left
    with pytest.raises(data.DataError, match="no readable"):
        list(data.eval_batches(folder_config(image_root), "test", global_batch_size=2))
    assert "bad image file(s) in " + os.path.join(image_root, "test") in caplog.text


@pytest.mark.slow
def test_bad_images_are_counted_in_the_train_metrics(image_root, tmp_path):
    for name in ("img_0.png", "img_1.png"):
        with open(os.path.join(image_root, "train", "dog", name), "wb") as f:
            f.write(b"not an image")
    config = tiny_config(**{"total_steps": 2, "eval_every_steps": 100})
    with config.unlocked():
        config.data = folder_config(image_root)
    loop.run(config, str(tmp_path / "run"))
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert records and all(r["train/bad_images"] == 2 for r in records)
