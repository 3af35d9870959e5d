"""CPU runs keep freed host memory: a step's large temporaries are reused, not page-faulted
in again on every step (vit_jax/host_memory.py)."""

import json
import os
import subprocess
import sys

import pytest

from vit_jax import host_memory

# A jitted function with large temporaries; the minor page faults of its fifth call (the
# heap settles over the first calls).
FAULTS_OF_A_STEP = """
import json, resource
from vit_jax import host_memory
kept = host_memory.keep_freed_host_memory()
import jax, jax.numpy as jnp
x = jnp.ones((2048, 8192), jnp.float32)
step = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x).T).sum() + jnp.tanh(x).sum())
for _ in range(4):
    step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step(x).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "faults": faults}))
"""


def faults_of_a_step(**env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_A_STEP],
        capture_output=True,
        text=True,
        env={**environment, **env},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_repeated_step_reuses_its_memory_instead_of_faulting_it_in():
    default = faults_of_a_step(VIT_JAX_HOST_MALLOC="default")
    kept = faults_of_a_step(JAX_PLATFORMS="cpu")
    assert not default["kept"] and kept["kept"]
    # glibc's default: the temporaries (hundreds of MiB, 4 KiB pages) are mapped afresh
    # and faulted in on every call; kept, the heap already holds them.
    assert default["faults"] > 20_000
    assert kept["faults"] < default["faults"] / 10


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


def test_tunables_for_a_child_process_name_the_same_three_settings():
    names = {part.split("=")[0] for part in host_memory.GLIBC_TUNABLES.split(":")}
    assert names == {
        "glibc.malloc.arena_max",
        "glibc.malloc.mmap_max",
        "glibc.malloc.trim_threshold",
    }
