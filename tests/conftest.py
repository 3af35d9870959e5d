"""Test setup: eight simulated CPU devices, quick unoptimised compiles and a compilation
cache, set before JAX is imported anywhere; the `slow` marker; tiny runs trained once and
shared."""

import os

# Quick compiles: the tests' programs are tiny, so compiling them is most of their time.
# LLVM optimisation off halves it; XLA's older loop emitters for fusions and one codegen
# thread (no split of the module) take another third of the CPU off each compile. The
# programs' results are the same programs' results; the benchmarks measure with their own
# flags. Commands the tests start keep these flags (helpers.subprocess_env).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    + " --xla_cpu_parallel_codegen_split_count=1 --xla_force_host_platform_device_count=8"
).strip()
from vit_jax.cli import tensorflow_environment  # noqa: E402

tensorflow_environment()  # what the commands do: quiet, and no Keras (5 s of every start)
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# One compilation cache for the whole run, this process and every command it starts (the
# pytest-xdist workers and the subprocesses inherit the environment): the tiny runs compile
# the same programs again and again, and a compile costs seconds where a run costs less. The
# cache is keyed by the program, the flags and the devices, so what runs is unchanged.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="vit_jax_tests_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    # A size limit turns on JAX's file lock around each read and write: processes that
    # compile the same program at the same time never read a half-written entry.
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)

from vit_jax.host_memory import keep_freed_host_memory  # noqa: E402

keep_freed_host_memory()  # what the commands do: freed step memory is reused, not refaulted

pytest_plugins = ["storage_server"]  # the `storage_server` and `bucket` fixtures

import pytest  # noqa: E402
from helpers import RESUME_RUN, STOPPED_RUN, TRAINED_RUN, tiny_config  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: over ~20 s on a 2-core machine (real processes, long runs); "
        '`pytest -m "not slow"` is the quick loop',
    )


def pytest_collection_finish(session):
    """Everything the tests import is imported by now (JAX, TensorFlow, Flax, orbax: about
    230,000 objects that live as long as the process): frozen, Python's full collections no
    longer walk them again and again, and with a full collection at most every 100th of
    the middle generation's (not every 10th) a worker spends 2.4 s in the collector instead
    of 5.5 s on 51 training tests."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 100)


# Runs trained once per test session and shared by every xdist worker: the first worker
# that needs one trains it under a file lock in the session's common temporary folder, the
# others wait for it. They are read-only: a test that writes into one works on a copy
# (`shutil.copytree`).


def trained_once(tmp_path_factory, name: str, changes: dict) -> str:
    """The run `tiny_config(**changes)` trained into `<session temp>/<name>`, once."""
    import fcntl
    import shutil

    from vit_jax import loop

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' folders share this one
    workdir, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a build that failed before
            loop.run(tiny_config(**changes), str(workdir))
            done.touch()
    return str(workdir)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> str:
    """A tiny class-token ViT trained on digits for TRAINED_RUN's 100 steps (evaluated twice,
    with a weight EMA), for predict, visualize, export and the bucket commands."""
    return trained_once(tmp_path_factory, "trained_run", TRAINED_RUN)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory) -> str:
    """The uninterrupted RESUME_RUN (6 steps, checkpoints at 3 and 6) that interrupted runs
    must equal bit for bit."""
    return trained_once(tmp_path_factory, "straight_run", RESUME_RUN)


@pytest.fixture(scope="session")
def straight_long_run(tmp_path_factory) -> str:
    """The uninterrupted STOPPED_RUN (100 steps, one checkpoint at the end) on 8 devices:
    what a command stopped by SIGTERM and run again must equal."""
    return trained_once(tmp_path_factory, "straight_long_run", STOPPED_RUN)


@pytest.fixture(scope="session")
def digit_png(tmp_path_factory) -> str:
    """The first 7 of the digits test split as an 8x8 grayscale PNG file."""
    import numpy as np
    from PIL import Image

    from vit_jax.data.sources import digits

    path = str(tmp_path_factory.mktemp("img") / "seven.png")
    images, labels = digits.load_split("test")
    Image.fromarray(images[int(np.flatnonzero(labels == 7)[0]), :, :, 0]).save(path)
    return path
