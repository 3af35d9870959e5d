"""Few-shot evaluation with two real processes on localhost equals one process's.

Both runs go through launch/local.sh with 4 devices in all (2 processes x 2, and 1 x 4) and
run at the same time. The learning rate is 0, so both evaluate the same initial parameters
and any difference comes from how the examples are gathered, ordered and sampled.
"""

import json
import os
import signal
import subprocess

import pytest

from tests.helpers import ROOT, TINY_MODEL

DIGITS_TEST_EXAMPLES = 355  # odd: the two processes get 178 and 177

FLAGS = [
    "--config=vit",
    *(f"--config.{flag}" for flag in TINY_MODEL),
    # Cheaper to start: one block, plain SGD state, a synchronous checkpoint.
    "--config.model.depth=1",
    "--config.optim.name=sgd",
    "--config.checkpoint.async_save=false",
    "--config.batch_size=32",
    "--config.eval_batch_size=128",
    "--config.total_steps=1",
    "--config.schedule.warmup_steps=0",
    "--config.schedule.base_lr=0",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=1",
    "--config.checkpoint.every_steps=1",
    "--config.fewshot.datasets=digits",
    "--config.fewshot.shots=1,5",
    # A bounded pass: 3 global batches (384 examples) are read and 300 of them kept.
    "--config.fewshot.max_train_examples=300",
]


def start(tmp_path, name, processes, devices):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT
    command = [
        os.path.join(ROOT, "launch", "local.sh"),
        f"--processes={processes}",
        f"--devices-per-process={devices}",
        f"--log-dir={tmp_path / f'{name}_logs'}",
        "--",
        f"--workdir={tmp_path / name}",
        *FLAGS,
    ]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: stopped with its children
    )


def records(tmp_path, name, run):
    out, err = run.communicate(timeout=400)
    assert run.returncode == 0, err[-3000:]
    assert "fewshot/digits_5shot" in out  # process 0's final evaluation line
    rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    merged = {}
    for row in rows:
        merged.update(row)
    return merged


def test_two_processes_give_the_fewshot_accuracies_of_one(tmp_path):
    two_run = start(tmp_path, "two", processes=2, devices=2)
    one_run = start(tmp_path, "one", processes=1, devices=4)
    try:
        two, one = records(tmp_path, "two", two_run), records(tmp_path, "one", one_run)
    finally:
        for run in (two_run, one_run):
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    keys = ("fewshot/digits_1shot", "fewshot/digits_5shot")
    assert [two[k] for k in keys] == [one[k] for k in keys]
    # Features line up with their labels: far above chance (0.1) even for random weights.
    assert two["fewshot/digits_5shot"] > 0.3
    # The uneven test split counts each example once.
    assert two["test/count"] == one["test/count"] == DIGITS_TEST_EXAMPLES
    assert two["test/top1"] == pytest.approx(one["test/top1"])
