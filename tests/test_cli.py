"""The CLI as users run it: the main command, config errors, and a real two-process run."""

import json
import os
import socket
import subprocess
import sys

import pytest

from vit_jax import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.model.width=32",
    "--config.model.depth=2",
    "--config.model.mlp_dim=64",
    "--config.model.num_heads=2",
    "--config.model.img_size=8",
    "--config.batch_size=32",
    "--config.eval_batch_size=64",
    "--config.total_steps=4",
    "--config.schedule.warmup_steps=1",
    "--config.log_every_steps=2",
    "--config.eval_every_steps=4",
    "--config.checkpoint.every_steps=2",
]


def cli_env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = ROOT
    return env


def failure(stderr: str) -> str:
    """The informative part of a failed run's stderr (a crash dump starts with 'Fatal')."""
    start = stderr.find("Fatal Python error")
    return stderr[start : start + 4000] if start >= 0 else stderr[-3000:]


def run_cli(args, devices=2, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "vit_jax.main", "--config=configs/vit.py", *args],
        cwd=ROOT,
        env=cli_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_main_command_trains_evaluates_and_writes_everything(tmp_path):
    profile = ["--config.profile.start_step=2", "--config.profile.num_steps=1"]
    result = run_cli([f"--workdir={tmp_path}", *TINY, *profile])
    assert result.returncode == 0, failure(result.stderr)
    assert "final evaluation: test/top1" in result.stdout
    assert "step 4/4" in result.stdout and "img/s" in result.stdout
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    assert os.listdir(tmp_path / "tensorboard")
    traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces)  # the requested profiler trace
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps.count(4) == 2  # train and test records at the last step

    again = run_cli([f"--workdir={tmp_path}", *TINY])  # complete: resumes, only evaluates
    assert again.returncode == 0, failure(again.stderr)
    assert "final evaluation" in again.stdout and "step 2/4 |" not in again.stdout


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.totl_steps=3", "unknown config field 'totl_steps'. Did you mean total_steps"),
        ("--config.optim.wieght_decay=0.1", "Did you mean optim.weight_decay"),
    ],
)
def test_unknown_config_field_names_the_closest_ones(tmp_path, override, expected):
    result = run_cli([f"--workdir={tmp_path}", override])
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_together(tmp_path):
    """Two real processes (2 CPU devices each) on localhost: one global mesh of 4 devices."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vit_jax.main",
                "--config=configs/vit.py",
                f"--workdir={tmp_path}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={index}",
                "--local_device_count=2",
                *TINY,
            ],
            cwd=ROOT,
            env=cli_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    outputs = [p.communicate(timeout=400) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, failure(err)
    assert "final evaluation" in outputs[0][0]
    assert "step 4/4" not in outputs[1][0]  # only process 0 reports
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    test = [r for r in records if "test/count" in r]
    expected = data.num_examples(data.get_data_config("digits"), "test")
    assert len(test) == 1 and test[0]["test/count"] == expected  # each example exactly once
    assert "4" in os.listdir(tmp_path / "checkpoints")
