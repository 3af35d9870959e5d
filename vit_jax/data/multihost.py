"""Turns process-local numpy batches into global ``jax.Array``s and prefetches them.

Each process holds its share of the global batch; ``to_global_batch`` assembles the global
arrays sharded over the mesh's batch axes (the first entry of the sharding's spec), all other
dimensions replicated. ``prefetch_to_device`` does that in a background thread, ``size``
batches ahead, so host-to-device copies overlap with the running step.
"""

import queue
import threading
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding


def to_global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """``jax.make_array_from_process_local_data`` for every entry of a process-local batch;
    `sharding` splits the first (batch) dimension only (``vit_jax.sharding.batch_sharding``)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch_to_device(
    iterator: Iterable[dict[str, np.ndarray]], sharding: NamedSharding, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Yields global batches, transferring up to ``size`` batches ahead in a thread.

    Errors from the input iterator are re-raised in the consumer; closing the generator
    stops the thread.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker():
        try:
            for batch in iterator:
                if not put(to_global_batch(batch, sharding)):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer.
            put(_Failure(e))

    thread = threading.Thread(target=worker, name="prefetch_to_device", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        # Let the worker leave TensorFlow before the interpreter can shut down under it (a
        # daemon thread killed inside C++ code aborts the process at exit).
        thread.join(timeout=30)
