"""CPU runs keep freed host memory: a step's large temporaries are reused, not page-faulted
in again on every step (vit_jax/host_memory.py)."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from vit_jax import host_memory

# A jitted function with one large temporary (sin(x), 64 MiB: 16,384 pages of 4 KiB) and
# little arithmetic; the minor page faults of each of its calls after the first three
# (compilation, and the heap's first growth), with a pause between calls as a train loop has.
# A kept heap still grows now and then (a temporary freed on XLA's thread after the next
# call began), so the typical call is the median.
FAULTS_OF_A_STEP = """
import json, resource, time
from vit_jax import host_memory
kept = host_memory.keep_freed_host_memory()
import jax, jax.numpy as jnp
x = jnp.ones((2048, 8192), jnp.float32)
step = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x[:8]).T).sum() + jnp.tanh(x).sum())
faults = []
for _ in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    time.sleep(0.05)
print(json.dumps({"kept": kept, "faults": faults[3:]}))
"""


def start_faults_of_a_step(**env: str) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.Popen(
        [sys.executable, "-c", FAULTS_OF_A_STEP],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**environment, **env},
    )


def faults(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    return json.loads(out.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_repeated_step_reuses_its_memory_instead_of_faulting_it_in():
    runs = [  # at the same time
        start_faults_of_a_step(VIT_JAX_HOST_MALLOC="default"),
        start_faults_of_a_step(JAX_PLATFORMS="cpu"),
    ]
    default, kept = map(faults, runs)
    assert not default["kept"] and kept["kept"]
    # glibc's default: the temporary (64 MiB) is mapped afresh and faulted in on every
    # call; kept, the heap already holds it: the typical call faults nothing.
    assert min(default["faults"]) > 12_000, default
    assert statistics.median(kept["faults"]) < statistics.median(default["faults"]) / 10, kept


@pytest.mark.parametrize(
    "platforms, cpu_only",
    [("cpu", True), ("cuda", False), ("tpu", False), ("cpu,cuda", False), (" cpu ", True)],
)
def test_accelerator_runs_keep_glibc_defaults(monkeypatch, platforms, cpu_only):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.runs_on_cpu_only() is cpu_only
    if not cpu_only:
        assert host_memory.keep_freed_host_memory() is False


def test_opt_out_keeps_glibc_defaults(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("VIT_JAX_HOST_MALLOC", "default")
    assert host_memory.keep_freed_host_memory() is False
