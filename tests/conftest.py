"""Test setup: eight simulated CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from vit_jax.host_memory import keep_freed_host_memory  # noqa: E402

keep_freed_host_memory()  # what the commands do: freed step memory is reused, not refaulted

pytest_plugins = ["storage_server"]  # the `storage_server` and `bucket` fixtures
