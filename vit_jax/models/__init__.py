"""The model zoo: ViT of every size, hybrids and Mixer, behind `create_model`."""

from vit_jax.models.layers import ActivationSharding
from vit_jax.models.registry import (
    create_model,
    full_name,
    list_models,
    model_defaults,
    register_model,
    valid_overrides,
)

__all__ = [
    "ActivationSharding",
    "create_model",
    "full_name",
    "list_models",
    "model_defaults",
    "register_model",
    "valid_overrides",
]
