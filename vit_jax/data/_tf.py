"""TensorFlow for the input pipeline, CPU only and quiet, set up when first used.

TensorFlow must never grab an accelerator that JAX owns, and its C++ logs would drown the
trainer's output, so every module of this package imports ``tf`` from here. ``tf`` stands
for the ``tensorflow`` module: the first attribute read from it (``tf.data``,
``tf.constant``) calls ``configure()``, which quiets the C++ logs, imports TensorFlow and
hides the GPUs from it, once, before TensorFlow initialises any device. Importing this
module (or vit_jax.data) neither imports TensorFlow nor changes ``os.environ``.
"""

from __future__ import annotations

import os
import threading
from types import ModuleType
from typing import Any

_lock = threading.Lock()
_tensorflow: ModuleType | None = None


def configured() -> bool:
    """Whether ``configure()`` has run (TensorFlow is imported and set up)."""
    return _tensorflow is not None


def configure() -> ModuleType:
    """Imports TensorFlow, CPU only and quiet (once; later calls return the same module).

    ``TF_CPP_MIN_LOG_LEVEL`` defaults to 2 (errors only) unless the user set it; it is read
    when TensorFlow logs first, so it is set before the import. Hiding the GPUs fails when
    TensorFlow was imported and used elsewhere before: its devices then stay as they are.
    """
    global _tensorflow
    if _tensorflow is not None:
        return _tensorflow
    with _lock:
        if _tensorflow is None:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            import tensorflow

            try:
                tensorflow.config.set_visible_devices([], "GPU")
            except RuntimeError:  # Devices were already initialised elsewhere.
                pass
            tensorflow.get_logger().setLevel("ERROR")
            _tensorflow = tensorflow
    return _tensorflow


def plain(fn: Any) -> Any:
    """``fn`` for ``Dataset.map``/``flat_map``/``interleave`` traced as written, without
    AutoGraph: the pipeline's functions are TensorFlow ops with no Python control flow on
    tensors, so AutoGraph's rewrite of their source (parsing it: a third of a second per
    pipeline built) would change nothing."""
    return configure().autograph.experimental.do_not_convert(fn)


class _TensorFlow:
    """``tf``: the ``tensorflow`` module, configured by the first attribute read."""

    def __getattr__(self, name: str) -> Any:
        value = getattr(configure(), name)
        setattr(self, name, value)  # later reads are plain attribute reads
        return value

    def __repr__(self) -> str:
        return repr(_tensorflow) if _tensorflow is not None else "<tensorflow, not yet imported>"


tf: Any = _TensorFlow()

__all__ = ["configure", "configured", "plain", "tf"]
