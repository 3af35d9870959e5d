"""Global batches from process-local data, and the device prefetcher."""

import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vit_jax import data


@pytest.fixture
def sharding():
    devices = np.array(jax.devices()).reshape(4, 2)
    mesh = Mesh(devices, ("data", "model"))
    return NamedSharding(mesh, PartitionSpec("data"))  # the batch dimension only


def local_batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, 4, 4, 3)).astype(np.float32),
        "labels": np.eye(5, dtype=np.float32)[rng.integers(0, 5, n)],
        "mask": np.ones((n,), np.float32),
    }


def test_eight_simulated_devices():
    assert jax.device_count() == 8


def test_to_global_batch_shards_batch_dim(sharding):
    batch = local_batch()
    out = data.to_global_batch(batch, sharding)
    for key, value in out.items():
        assert isinstance(value, jax.Array)
        np.testing.assert_array_equal(np.asarray(value), batch[key])
        assert value.sharding.spec[0] == "data"
        assert len(value.addressable_shards) == 8
        assert value.addressable_shards[0].data.shape[0] == 2  # 8 rows over 4 data shards.
    assert out["mask"].ndim == 1


def test_prefetch_to_device_preserves_order_and_ends(sharding):
    batches = [local_batch(seed=i) for i in range(5)]
    out = list(data.prefetch_to_device(iter(batches), sharding, size=2))
    assert len(out) == 5
    for got, want in zip(out, batches, strict=True):
        np.testing.assert_array_equal(np.asarray(got["image"]), want["image"])


def test_prefetch_to_device_reraises_errors(sharding):
    def broken():
        yield local_batch()
        raise RuntimeError("reader failed")

    it = data.prefetch_to_device(broken(), sharding)
    next(it)
    with pytest.raises(RuntimeError, match="reader failed"):
        next(it)


def test_prefetch_runs_ahead_of_consumer(sharding):
    produced = []

    def source():
        for i in range(10):
            produced.append(i)
            yield local_batch(seed=i)

    it = data.prefetch_to_device(source(), sharding, size=2)
    next(it)
    for _ in range(500):
        if len(produced) >= 3:
            break
        time.sleep(0.01)
    assert 3 <= len(produced) <= 5  # One consumed, up to two queued, one in flight.
    it.close()


def test_digits_batches_to_global_arrays(sharding):
    cfg = data.get_data_config("digits")
    batches = data.train_batches(
        cfg, global_batch_size=16, seed=0, process_index=0, process_count=1
    )
    batch = next(data.prefetch_to_device(batches, sharding))
    assert batch["image"].shape == (16, 16, 16, 3) and batch["labels"].shape == (16, 10)
