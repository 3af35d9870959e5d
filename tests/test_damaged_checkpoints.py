"""A checkpoint step whose files cannot be read ends in one line: the damaged step, the
newest intact step before it, and how to continue from that one
(`--config.checkpoint.resume_step=N` for training, `--step N` for predict and export).
Nothing is deleted; a config that builds another state still gets its own message."""

import glob
import json
import os
import shutil

import pytest
from helpers import RESUME_RUN, ROOT, tiny_flags

from vit_jax import cli
from vit_jax.checkpoint import manager

# The shared straight_run (tests/conftest.py): checkpoints at steps 3 and 6; the damage is
# always done to step 6.
RUN = RESUME_RUN
IMAGE = os.path.join(ROOT, "docs", "images", "digits", "digit_7.png")


@pytest.fixture(scope="module")
def run_dir(straight_run) -> str:
    """The tiny run of this module, trained once per session (read-only: each test damages
    a copy)."""
    return straight_run


def _data_files(state: str) -> list[str]:
    # Every OCDBT data file of the step (the process's own and the merged ones): which of
    # them hold the arrays depends on the device count.
    return sorted(glob.glob(os.path.join(state, "**", "d", "*"), recursive=True))


def _truncate_data(state: str) -> None:
    for path in _data_files(state):
        os.truncate(path, os.path.getsize(path) // 2)


def _remove_data(state: str) -> None:
    for path in _data_files(state):
        os.remove(path)


def _empty(name: str):
    def damage(state: str) -> None:
        open(os.path.join(state, name), "w").close()

    return damage


def _remove(name: str):
    def damage(state: str) -> None:
        os.remove(os.path.join(state, name))

    return damage


DAMAGE = {
    "truncated data files": _truncate_data,
    "missing data files": _remove_data,
    "empty _METADATA": _empty("_METADATA"),
    "missing _METADATA": _remove("_METADATA"),
    "empty manifest": _empty("manifest.ocdbt"),
    "missing manifest": _remove("manifest.ocdbt"),
}


def damaged_copy(run_dir: str, tmp_path, kind: str) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    DAMAGE[kind](os.path.join(workdir, "checkpoints", "6", "state"))
    return workdir


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def assert_names_steps(line: str, workdir: str, how: str) -> None:
    assert line.startswith("error: the checkpoint of step 6 in "), line
    assert os.path.join(workdir, "checkpoints", "6") in line
    assert "cannot be read" in line and "does not match" not in line
    assert f"step 3 is intact: continue from it with {how}" in line
    assert "nothing was deleted" in line


@pytest.mark.parametrize("kind", DAMAGE)
def test_train_names_the_damaged_step_and_the_resume_field(run_dir, tmp_path, capsys, kind):
    workdir = damaged_copy(run_dir, tmp_path, kind)
    capsys.readouterr()
    status = cli.run("train", [*tiny_flags(**RUN), f"--workdir={workdir}"])
    line = one_line(capsys.readouterr().err)
    assert status == 2
    assert_names_steps(line, workdir, "--config.checkpoint.resume_step=3")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_predict_names_the_damaged_step_and_the_step_flag(run_dir, tmp_path, capsys, kind):
    workdir = damaged_copy(run_dir, tmp_path, kind)
    capsys.readouterr()
    status = cli.run("predict", [f"--workdir={workdir}", IMAGE, "--quiet"])
    line = one_line(capsys.readouterr().err)
    assert status == 2
    assert_names_steps(line, workdir, "--step 3")


def test_export_names_the_damaged_step_and_the_step_flag(run_dir, tmp_path, capsys):
    workdir = damaged_copy(run_dir, tmp_path, "truncated data files")
    capsys.readouterr()
    status = cli.run("export", [f"--workdir={workdir}", "--format=jax"])
    line = one_line(capsys.readouterr().err)
    assert status == 2
    assert_names_steps(line, workdir, "--step 3")
    assert not os.path.exists(os.path.join(workdir, "export"))


def test_no_intact_step_says_so(run_dir, tmp_path, capsys):
    workdir = damaged_copy(run_dir, tmp_path, "empty manifest")
    _empty("manifest.ocdbt")(os.path.join(workdir, "checkpoints", "3", "state"))
    capsys.readouterr()
    status = cli.run("predict", [f"--workdir={workdir}", IMAGE, "--quiet"])
    line = one_line(capsys.readouterr().err)
    assert status == 2
    assert "step 6" in line and "no earlier step is intact" in line


def test_the_resume_field_and_the_step_flag_continue_from_the_intact_step(
    run_dir, tmp_path, capsys
):
    workdir = damaged_copy(run_dir, tmp_path, "truncated data files")
    status = cli.run("predict", [f"--workdir={workdir}", IMAGE, "--quiet", "--step", "3"])
    assert status == 0
    assert capsys.readouterr().out.startswith(IMAGE)

    flags = [*tiny_flags(**RUN), f"--workdir={workdir}"]
    assert cli.run("train", [*flags, "--config.checkpoint.resume_step=3"]) == 0
    checkpoints = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["3", "6"]  # step 6 trained again from 3
    aside = os.path.join(workdir, "checkpoints_set_aside")
    assert os.listdir(aside) == ["6"]  # the damaged step is kept, not deleted
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_steps = [row["step"] for row in rows if "train/loss" in row]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 6  # logged once

    capsys.readouterr()
    assert cli.run("train", flags) == 0  # the new step 6 restores: nothing left to train
    assert cli.run("predict", [f"--workdir={workdir}", IMAGE, "--quiet"]) == 0


def test_resume_step_must_be_a_checkpoint_of_the_run(run_dir, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    capsys.readouterr()
    flags = [*tiny_flags(**RUN), f"--workdir={workdir}", "--config.checkpoint.resume_step=4"]
    status = cli.run("train", flags)
    line = one_line(capsys.readouterr().err)
    assert status == 2
    assert "config.checkpoint.resume_step=4" in line and "steps [3, 6]" in line
    assert not os.path.exists(os.path.join(workdir, "checkpoints_set_aside"))


def test_another_state_is_a_mismatch_not_damage(run_dir, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    capsys.readouterr()
    # Trained on for 2 more steps, so the last checkpoint is restored (a finished run's is not).
    changes = {**RUN, "total_steps": 8, "model.mlp_dim": 48}
    flags = [*tiny_flags(**changes), f"--workdir={workdir}"]
    status = cli.run("train", flags)
    line = one_line(capsys.readouterr().err)
    assert status == 2
    assert "does not match the train state this config builds" in line
    assert "cannot be read" not in line


def test_a_read_error_names_the_array_and_the_cause():
    text = (
        'ValueError: OUT_OF_RANGE: Error reading "params.head.kernel/0.0" in OCDBT database '
        'at local file "/w/checkpoints/4/state/": Requested byte range [5, 9) is not valid'
    )
    reason = manager._read_reason(text, "/w/checkpoints/4")
    assert (
        reason
        == "a data file under state/ (holding params.head.kernel) is cut short (OUT_OF_RANGE)"
    )
