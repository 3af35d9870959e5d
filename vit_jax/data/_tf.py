"""Imports TensorFlow for the input pipeline, CPU only and quiet.

TensorFlow must never grab an accelerator that JAX owns, and its C++ logs would drown the
trainer's output, so every module of this package imports ``tf`` from here.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # Devices were already initialised elsewhere; they stay as they are.
    pass
tf.get_logger().setLevel("ERROR")

__all__ = ["tf"]
