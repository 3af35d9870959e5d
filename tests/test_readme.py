"""Every shell command in README.md runs: training commands with --dry_run here, the others
by the test named for them, so a documented command can never again fail to parse."""

import os
import re
import shlex

import pytest

from tests.helpers import ROOT, shell_commands
from vit_jax import cli

TRAIN_PROGRAMS = (
    ("python3", "-m", "vit_jax", "train"),
    ("python", "-m", "vit_jax", "train"),
)
CONSOLE = "vit-jax"
# Commands that are not training runs, and the test that runs each (file::function).
COVERED_ELSEWHERE = {
    "python3 -m venv": "tests/test_readme.py::test_ci_runs_the_readme_test_command",
    ". .venv/bin/activate": "tests/test_readme.py::test_ci_runs_the_readme_test_command",
    "python3 -m pip install": "tests/test_readme.py::test_ci_runs_the_readme_test_command",
    "python3 -m pytest": "tests/test_readme.py::test_ci_runs_the_readme_test_command",
    "python3 -m vit_jax predict": ("tests/test_predict.py::test_readme_predict_commands_run"),
    "python3 -m vit_jax visualize": ("tests/test_visualize.py::test_readme_visualize_commands_run"),
    "python3 -m vit_jax export": "tests/test_export.py::test_readme_export_commands_run",
    "python3 -m vit_jax transfer": ("tests/test_readme.py::test_readme_transfer_commands_dry_run"),
    "launch/": "tests/test_readme.py::test_readme_launch_commands_dry_run",
    "python3 -m vit_jax step_benchmark": (
        "tests/test_benchmark.py::test_readme_benchmark_commands_parse_and_the_smallest_compiles"
    ),
}


def _words(command: str) -> list[str]:
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # leading VAR=value assignments
        words.pop(0)
    return words


def _train_args(command: str) -> list[str] | None:
    words = _words(command)
    if tuple(words[:2]) == (CONSOLE, "train"):
        return words[2:]
    for program in TRAIN_PROGRAMS:
        if tuple(words[: len(program)]) == program:
            return words[len(program) :]
    return None


def _covering_test(command: str) -> str | None:
    words = " ".join(_words(command))
    return next((t for p, t in COVERED_ELSEWHERE.items() if words.startswith(p)), None)


README_COMMANDS = shell_commands(open(os.path.join(ROOT, "README.md")).read())
TRAIN_COMMANDS = [c for c in README_COMMANDS if _train_args(c) is not None]


def test_the_readme_has_commands_and_every_one_is_run_by_a_test():
    assert len(TRAIN_COMMANDS) >= 5
    uncovered = [c for c in README_COMMANDS if _train_args(c) is None and _covering_test(c) is None]
    assert not uncovered, (
        f"README commands no test runs (add them to COVERED_ELSEWHERE): {uncovered}"
    )
    for test in set(COVERED_ELSEWHERE.values()):
        path, function = test.split("::")
        assert f"def {function}(" in open(os.path.join(ROOT, path)).read(), test


@pytest.mark.parametrize("command", TRAIN_COMMANDS)
def test_readme_training_command_passes_a_dry_run(
    command, tmp_path, monkeypatch, capsys, readme_bucket
):
    """From outside the repository, as a user who installed the package runs it (a
    `gs://bucket/...` workdir is checked for real, against the local storage server)."""
    monkeypatch.chdir(tmp_path)
    args = [a.replace("/data/my_images", str(_images(tmp_path))) for a in _train_args(command)]
    status = cli.run("train", [*args, "--dry_run"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "dry run: nothing was compiled" in out
    assert "config.model" not in err


def _images(tmp_path):
    from tests.data_fixtures.images import write_folder

    root = tmp_path / "my_images"
    write_folder(str(root), {"": {"cat": 3, "dog": 3}})
    return root


def _starting(prefix: str) -> list[str]:
    return [c for c in README_COMMANDS if " ".join(_words(c)).startswith(prefix)]


@pytest.mark.parametrize("command", _starting("python3 -m vit_jax transfer"))
def test_readme_transfer_commands_dry_run(command, tmp_path, monkeypatch, capsys):

    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "checkpoint.npz"
    checkpoint.write_bytes(b"")  # the dry run checks that it exists, not what it holds
    args = [
        re.sub(r"=/data/\S+\.npz$", f"={checkpoint}", a) for a in _words(command)[4:]
    ]  # after "python3 -m vit_jax transfer"
    assert "--dry_run" in args
    assert cli.run("transfer", args) == 0, capsys.readouterr().err
    assert "cifar10: lrs" in capsys.readouterr().out


@pytest.mark.parametrize("command", _starting("launch/"))
def test_readme_launch_commands_dry_run(command, tmp_path, readme_bucket):
    """The script prints the training command it would run; that command's flags pass
    the trainer's own dry run."""
    import subprocess

    words = _words(command)
    split = words.index("--")
    flags = words[split + 1 :]
    result = subprocess.run(
        [os.path.join(ROOT, words[0]), *words[1:split], "--dry-run", "--", *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "vit_jax train" in result.stdout and flags[0] in result.stdout
    assert cli.run("train", [*flags, "--dry_run"]) == 0


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs the README's test command verbatim: it makes (or reuses) the virtual
    environment, installs into it and runs the tests there; the demo command starts the same
    way, so a clean CI run proves the quick start's set-up on a fresh clone."""
    ci = open(os.path.join(ROOT, ".ci", "run")).read().strip().splitlines()[-1]
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert f"```bash\n{ci}\n```" in readme
    environment = "python3 -m venv --system-site-packages .venv && . .venv/bin/activate && "
    assert ci.startswith(environment + "python3 -m pip install") and "python3 -m pytest" in ci
    demo = readme.split("```bash\n")[1].split("\n```")[0]
    assert demo.startswith(environment + "python3 -m pip install -e . && ")
    demo_run = "python3 -m vit_jax train --config=configs/vit.py --workdir=workdir/digits"
    assert demo.endswith(demo_run)


def test_command_extraction_handles_continuations_and_chains():
    text = "```bash\n# comment\nA=1 python3 -m vit_jax train --x=1 \\\n"
    text += "  --y=2 && echo hi\n```\n"
    assert shell_commands(text) == ["A=1 python3 -m vit_jax train --x=1 --y=2", "echo hi"]
    assert _train_args(shell_commands(text)[0]) == ["--x=1", "--y=2"]
