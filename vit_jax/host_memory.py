"""Keep freed host memory in the process on CPU runs, so a step does not page-fault it back.

XLA:CPU allocates every step's temporaries afresh (about 2 GiB for a ViT-Ti/16 train step at
batch 32). glibc serves a block that large with its own `mmap` and unmaps it on free, so the
next step faults every page in again and the kernel zeroes it: 550,000 page faults and about
1 s of kernel time per ViT-Ti/16 step on 2 cores, a fifth of the step. With one malloc arena,
no `mmap` for large blocks and no trimming, a freed block stays in the heap and the next step
reuses it: no faults. The cost: the process keeps its peak, and when other allocations come
between steps the heap can fragment (README "Performance": up to 1.7x the peak measured with
glibc's defaults in the benchmark, the same or lower in a plain train loop). The commands
that run steps on the CPU call `keep_freed_host_memory()` first, before JAX or TensorFlow
start their threads (a thread keeps the arena it first allocated from). Runs on a GPU or
TPU keep glibc's defaults: their temporaries live on the device, and many input threads are
better served by many arenas. `VIT_JAX_HOST_MALLOC=default` keeps glibc's defaults
everywhere.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# The same settings for a child process, through the environment (read at its start).
GLIBC_TUNABLES = (
    f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={2**63}"
)

_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")


def runs_on_cpu_only() -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS names only `cpu`, or no GPU/TPU plugin
    is installed. Decided without starting JAX (that would start its threads)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return all(name.strip() == "cpu" for name in platforms.split(",") if name.strip())
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_MODULES)


def keep_freed_host_memory() -> bool:
    """Tune glibc's malloc to keep freed blocks for reuse (see the module docstring).

    Returns whether it did: not on GPU/TPU runs, other C libraries (macOS, musl), or with
    VIT_JAX_HOST_MALLOC=default. Call it before anything starts threads.
    """
    if os.environ.get("VIT_JAX_HOST_MALLOC", "") == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if not runs_on_cpu_only():
        return False
    libc = ctypes.CDLL("libc.so.6")
    # Order matters: one arena first, so that no thread's heap can fall back to mmap.
    return all(
        libc.mallopt(parameter, value) == 1
        for parameter, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    )
