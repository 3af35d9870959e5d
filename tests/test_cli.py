"""The CLI as users run it: the main command, dry runs, config errors, a folder dataset."""

import json
import os

import pytest

from tests.helpers import RESUME_RUN, subprocess_env, tiny_flags
from vit_jax import cli
from vit_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny run for 4 steps: a checkpoint every 2, the test evaluation at the end.
TINY = tiny_flags(total_steps=4, checkpoint__every_steps=2, eval_every_steps=4)


def cli_env(devices: int) -> dict:
    return subprocess_env(devices)


def failure(stderr: str) -> str:
    """The informative part of a failed run's stderr (a crash dump starts with 'Fatal')."""
    start = stderr.find("Fatal Python error")
    return stderr[start : start + 4000] if start >= 0 else stderr[-3000:]


@pytest.mark.slow
def test_main_command_trains_evaluates_and_writes_everything(
    tmp_path, monkeypatch, capsys, straight_run
):
    """`python -m vit_jax train` of the shared resume run (RESUME_RUN: dropout, mixup, a
    weight EMA; `straight_run` trains it in-process, so its programs are compiled once per
    session), in this process: tests/test_reliability.py and tests/test_launch.py start the
    command as a process of its own."""
    monkeypatch.chdir(ROOT)
    flags = [f"--workdir={tmp_path}", *tiny_flags(**RESUME_RUN)]
    profile = ["--config.profile.start_step=2", "--config.profile.num_steps=1"]
    assert cli.run("train", [*flags, *profile]) == 0
    out = capsys.readouterr().out
    assert "final evaluation: test/top1" in out
    assert "step 6/6" in out and "img/s" in out
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert os.listdir(tmp_path / "tensorboard")
    traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces)  # the requested profiler trace
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps.count(6) == 3  # train, test and test_ema records at the last step

    # Complete: the same command again resumes and only evaluates.
    assert cli.run("train", flags) == 0
    again = capsys.readouterr().out
    assert "final evaluation" in again and "step 2/6 |" not in again


def test_dry_run_prints_the_resolved_run_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """In-process (8 simulated devices), from a directory outside the repository."""
    workdir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    status = cli.run(
        "train",
        [
            "--config=vit:B/16,cifar10,finetune",
            "--config.init_from.path=/data/ViT-B_16.npz",
            f"--workdir={workdir}",
            "--config.model.dtype=bfloat16",
            "--config.optim.grad_accum_steps=4",
            "--config.mesh.data=-1",
            "--config.mesh.fsdp=2",
            "--dry_run",
        ],
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "  model.dtype = bfloat16" in out and "  model.img_size = 384" in out
    assert "run on 8 device(s), mesh data=4 fsdp=2 model=1" in out
    assert "batch 512: 64 per device" in out
    assert "micro-batch 128: 16 per device, 4 accumulation step(s)" in out
    assert "steps 10000" in out
    assert not workdir.exists()  # nothing written


def test_dry_run_of_a_pod_command_on_this_machine(tmp_path, monkeypatch, capsys, readme_bucket):
    """The bucket is checked for real (on the local storage server); the pod is not here."""
    monkeypatch.chdir(tmp_path)
    status = cli.run(
        "train",
        [
            "--config=vit:H/14,imagenet21k,pretrain",
            "--workdir=gs://bucket/h14",
            "--distributed",
            "--config.mesh.fsdp=16",
            "--config.mesh.data=-1",
            "--config.data.data_dir=/data/imagenet21k",
            "--dry_run",
        ],
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "shown for 16 devices" in out  # the mesh needs a pod, not this machine
    assert "run on 16 device(s), mesh data=1 fsdp=16 model=1" in out
    assert "config.data.data_dir='/data/imagenet21k' does not exist" in out
    assert "steps: 90 epochs" in out
    assert "jax.distributed is not started in a dry run" in out
    assert list(tmp_path.iterdir()) == []  # no local `gs:` folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.model.img_size=30"], "config.model.img_size=30 is not a positive multiple"),
        (["--config.init_from.path=/nowhere/B_16.npz"], "config.init_from.path='/nowhere/"),
        (["--config.batch_size=36"], "config.batch_size=36 is not divisible by the 8 data-"),
        (["--config.mesh.data=3"], "config.mesh {'data': 3, 'fsdp': 1, 'model': 1} needs 3"),
        (["--config.schedule.warmup_steps=5000"], "config.schedule.warmup_steps=5000 is long"),
        (["--config.data.num_classes=5"], "config.data.num_classes=5 but digits has 10"),
        (["--config.optim.name=lamb"], "config.optim.name='lamb' is not one of: adamw, sgd"),
        (["--config=vit:B/16,cifar10"], "must be '<model>,<dataset>,<recipe>'"),
        (["--config.total_steps=ten"], "config.total_steps='ten' is not a valid int"),
    ],
)
def test_user_errors_are_one_line_with_status_2(tmp_path, monkeypatch, capsys, args, message):
    """In-process (8 simulated devices), from a directory outside the repository."""
    monkeypatch.chdir(tmp_path)
    assert cli.run("train", [f"--workdir={tmp_path / 'w'}", *args]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors


def test_unwritable_workdir_is_refused_before_anything_compiles(tmp_path, monkeypatch, capsys):
    """In-process, from a directory outside the repository."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    assert cli.run("train", [f"--workdir={blocker / 'run'}"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert f"--workdir={blocker / 'run'} is not writable" in errors[0]
    with pytest.raises(UserError, match="is not writable"):  # --verbose: the traceback
        cli.run("train", [f"--workdir={blocker / 'run'}", "--verbose"])


def test_demo_trains_on_a_folder_named_on_the_command_line(tmp_path, monkeypatch):
    """`--config.dataset=folder:<root>` on the demo config trains on that folder (in this
    process, from a directory outside the repository)."""
    from tests.data_fixtures.images import write_folder

    root = tmp_path / "my_images"
    write_folder(str(root / "x"), {"": {"ant": 12, "bee": 12, "cow": 12}}, size=(20, 18))
    args = [f"--workdir={tmp_path / 'run'}", f"--config.dataset=folder:{root / 'x'}"]
    # Two steps of a one-block model: what is checked is the data and the image size.
    args += tiny_flags(
        total_steps=2, eval_batch_size=16, **{"model.img_size": None, "model.depth": 1}
    )
    monkeypatch.chdir(tmp_path)
    assert cli.run("train", args) == 0
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    val = [r for r in records if "val/count" in r]
    assert val and val[-1]["val/count"] == 4  # 10% of the 36 images, held out
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["dataset"] == f"folder:{root / 'x'}" and saved["model"]["img_size"] == 32
    assert "digits" not in json.dumps(saved["data"])


def test_a_pickled_npz_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    import numpy as np

    hostile = tmp_path / "hostile.npz"
    np.savez(hostile, code=np.array([{"run": "me"}], dtype=object))
    monkeypatch.chdir(tmp_path)
    args = [f"--workdir={tmp_path / 'w'}", f"--config.init_from.path={hostile}", *TINY]
    assert cli.run("train", args) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "pickled objects" in errors[0] and str(hostile) in errors[0]
