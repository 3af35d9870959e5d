"""`python -m vit_jax step_benchmark step` runs on a tiny model and prints JSON lines;
the trainer's progress reports the device's input wait."""

import json
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from tests.helpers import TINY_MODEL, readme_commands, subprocess_env
from vit_jax import host_memory
from vit_jax.metric_logging import Progress
from vit_jax.tools import step_benchmark

TINY = ["--model", "ViT-mu/4", "--img_size", "16", "--pool", "gap", "--batch", "8"]


def run_benchmark(*args: str) -> list[dict]:
    """The benchmark in a fresh process (torch and TensorFlow must not share one), on one
    CPU device with XLA's optimisation off as in this session (the records are the same; the
    compiles cost less)."""
    env = subprocess_env(1)
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax", "step_benchmark", "step", *TINY, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def check_step_record(record: dict, what: str) -> None:
    assert record["what"] == what
    assert record["model"] == "ViT-mu/4" and record["batch"] == 8 and record["img_size"] == 16
    assert record["images_per_sec"] > 0
    assert record["steps_timed"] == 1  # --steps 1 x --rounds 1
    assert record["compile_seconds"] > 0
    assert record["flops_per_step"] > 0
    assert record["matmul_peak_flops_per_sec"] > 1e9
    assert 0 < record["matmul_peak_min_over_max"] <= 1
    assert 0 < record["mfu_measured_peak"]
    assert record["mfu_nominal_peak"] is None  # no nominal peak for a CPU
    assert record["peak_host_mib"] > 100


@pytest.mark.slow
def test_step_benchmark_compared_with_timm():
    """Our block scanned (one block to compile: a quarter less time for this test) against
    timm's plain model."""
    records = run_benchmark(
        "--steps", "1", "--rounds", "1", "--compare", "timm", "--timm_threads", "1",
        "--timm_malloc", "same", "--scan",
    )  # fmt: skip
    train, evaluation, compare = records
    check_step_record(train, "train")
    check_step_record(evaluation, "eval")
    assert train["scan"] is True and compare["scan"] is True
    # A train step (forward, backward, update) costs about three forward passes.
    assert 2 < train["flops_per_step"] / evaluation["flops_per_step"] < 4
    assert compare["what"] == "compare" and compare["against"] == "timm"
    assert compare["timm"]["gelu"] == "erf"  # timm's default GELU
    # Our process keeps freed host memory; timm's child was given the same glibc settings.
    assert train["host_malloc"] == compare["host_malloc"] == "keep_freed"
    assert compare["timm"]["malloc"] == "same"
    assert compare["timm"]["glibc_tunables"] == host_memory.GLIBC_TUNABLES
    for what in ("train", "eval"):
        side = compare[what]
        assert side["timm_images_per_sec"] > 0 and side["ours_images_per_sec"] > 0
        assert len(side["ratio_per_round"]) == 1
        assert set(side["timm_images_per_sec_by_threads"]) == {"1"}
    assert compare["timm_peak_host_mib"] > 50


def test_step_config_follows_the_command_line():
    args = step_benchmark.parser().parse_args(
        ["step", *TINY, "--dtype", "bfloat16", "--mesh", "data=1,fsdp=1,model=1", "--scan"]
    )
    config = step_benchmark.step_config(args)
    assert config.model_name == "ViT-mu/4"
    assert (config.batch_size, config.model.img_size) == (8, 16)
    assert config.model.dtype == "bfloat16" and config.model.scan is True
    assert config.mesh.to_dict() == {"dcn_data": 1, "dcn_fsdp": 1, "data": 1, "fsdp": 1, "model": 1}


def test_progress_counts_input_wait_only_while_the_device_is_idle():
    ready = jnp.zeros(()).block_until_ready()  # a finished step's output
    progress = Progress(
        total_steps=10, start_step=0, batch_size=4, flops_per_step=None, peak_flops_total=None
    )

    def slow_batches():
        while True:
            time.sleep(0.05)
            yield {}

    class Busy:  # a step output that is never ready: the device is still computing
        def is_ready(self):
            return False

    batches = slow_batches()
    progress.next_batch(batches, {"loss": Busy()})
    assert progress.update(1)["input_wait_share"] == 0.0
    progress.next_batch(batches, {"loss": ready})  # the device waits for the batch
    share = progress.update(2)["input_wait_share"]
    assert 0.3 < share <= 1.0


COMPILE_EACH = """
import json, sys
from vit_jax.tools import step_benchmark
for args in json.loads(sys.argv[1]):
    for record in step_benchmark.step(step_benchmark.parser().parse_args([*args, "--rounds", "0"])):
        print(json.dumps(record), flush=True)
"""


@pytest.mark.slow
def test_readme_benchmark_commands_parse_and_the_smallest_compiles():
    """Every `python3 -m vit_jax step_benchmark` command in README.md parses and names a zoo
    model; the smallest one's train and eval steps compile (compile only, later flags win).
    Compiling every command (ViT-L/16 twice) would cost minutes and show nothing more. In the
    same process: the tiny model scanned with full remat compiles too."""
    from vit_jax import models
    from vit_jax.tools import step_benchmark

    commands = readme_commands("step_benchmark")
    assert len(commands) >= 6
    for args in commands:
        parsed = step_benchmark.parser().parse_args(args)
        assert parsed.model in models.list_models(), args
    smallest = next(args for args in commands if "ViT-mu/4" in args)
    env = subprocess_env(1)  # one CPU device, XLA's optimisation off as in this session
    scanned = ["step", *TINY, "--scan", "--remat", "full"]
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_EACH, json.dumps([smallest, scanned])],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    train, evaluation, scanned_train, scanned_eval = records  # no comparison when compiling
    assert (train["what"], evaluation["what"]) == ("train", "eval")
    assert train["model"] == "ViT-mu/4" and train["scan"] == ("--scan" in smallest)
    assert train["compile_seconds"] > 0 and train["flops_per_step"] > 0
    assert scanned_train["scan"] is True and scanned_train["remat"] == "full"
    assert scanned_train["compile_seconds"] > 0 and scanned_train["images_per_sec"] is None
    # FLOPs count every layer, not the scanned loop's body once.
    assert 2 < scanned_train["flops_per_step"] / scanned_eval["flops_per_step"] < 5


def test_step_benchmark_times_a_distilled_flexivit_at_a_chosen_patch_size(trained_run):
    """`--config.<field>` overrides reach the timed step: the tiny model as a FlexiViT
    (patch sizes 2 and 4) with a teacher run, timed at --patch_size 2; compiled at 4 it counts
    fewer FLOPs."""
    from vit_jax.errors import UserError

    small = ["--model", "ViT-mu/4", "--img_size", "8", "--pool", "gap", "--batch", "8"]
    overrides = [
        *(o for o in TINY_MODEL if not o.startswith("model.img_size")),
        "model.patch_sizes=2,4",
        f"distill.teacher={trained_run}",
        "distill.weight=1",
    ]

    def records(*flags: str) -> list[dict]:
        args = step_benchmark.parser().parse_args(["step", *small, *flags])
        return step_benchmark.step(args, overrides)

    at_2 = records("--patch_size", "2", "--steps", "1", "--rounds", "1")
    at_4 = records("--patch_size", "4", "--rounds", "0")  # compile only
    assert [r["patch_size"] for r in at_2 + at_4] == [2, 2, 4, 4]
    assert at_2[0]["teacher"].startswith(f"{trained_run} (ViT-mu/4 at 8 px, a run: step 100")
    assert at_2[0]["images_per_sec"] > 0 and at_2[1]["images_per_sec"] > 0
    assert at_2[0]["flops_per_step"] > 2 * at_4[0]["flops_per_step"]  # 16 tokens against 4
    # Both counts are the whole batch's on these 8 devices (a train step: about three
    # forward passes, plus the small teacher's).
    assert 2 < at_2[0]["flops_per_step"] / at_2[1]["flops_per_step"] < 5
    for flags, field in ((["--compare", "timm"], "--compare timm"), (["--patch_size", "3"], "3")):
        with pytest.raises(UserError, match=field):
            records(*flags)
