"""Test setup: eight simulated CPU devices and a compilation cache, set before JAX is
imported anywhere; the `slow` marker; tiny runs trained once and shared."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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


# Runs trained once per test process (once per xdist worker) and shared. They are read-only:
# a test that writes into one works on a copy (`shutil.copytree`).


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> str:
    """A tiny class-token ViT trained on digits for TRAINED_RUN's 100 steps (evaluated twice),
    for predict, visualize, export and the bucket commands."""
    from vit_jax import loop

    workdir = str(tmp_path_factory.mktemp("trained_run"))
    loop.run(tiny_config(**TRAINED_RUN), workdir)
    return workdir


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory) -> str:
    """The uninterrupted RESUME_RUN (6 steps, checkpoints at 3 and 6) that interrupted runs
    must equal bit for bit."""
    from vit_jax import loop

    workdir = str(tmp_path_factory.mktemp("straight_run"))
    loop.run(tiny_config(**RESUME_RUN), workdir)
    return workdir


@pytest.fixture(scope="session")
def straight_long_run(tmp_path_factory) -> str:
    """The uninterrupted STOPPED_RUN (200 steps, one checkpoint at the end), in this process
    on its 8 devices: what a command stopped by SIGTERM and run again must equal."""
    from vit_jax import loop

    workdir = str(tmp_path_factory.mktemp("straight_long_run"))
    loop.run(tiny_config(**STOPPED_RUN), workdir)
    return workdir


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
