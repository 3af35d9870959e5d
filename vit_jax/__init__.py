"""vit_jax: Vision Transformers in JAX/Flax NNX.

Data flows config -> data -> models -> sharded train step -> checkpoints and metrics.
"""

__version__ = "0.1.0"
