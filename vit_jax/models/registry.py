"""Model registry: `create_model('ViT-B/16', num_classes=10)` and `list_models()`.

Names are written as in the papers: `ViT-{Ti,S,B,L,H,g,G}/{8,14,16,32}`, hybrids such as
`R50+ViT-B/16`, and `Mixer-B/16`. Overrides are checked against the builder's arguments.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from flax import nnx

_REGISTRY: dict[str, tuple[Callable[..., nnx.Module], dict[str, Any]]] = {}

VIT_SIZES = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    "G": dict(width=1664, depth=48, mlp_dim=8192, num_heads=16),
}
PATCH_SIZES = (8, 14, 16, 32)
# "mu" (micro): this project's CPU-demo size, not a published one.
SMALL_SIZES = {"mu": dict(width=96, depth=6, mlp_dim=384, num_heads=3)}
# Small patches for small images (CIFAR-sized, the embedded 8x8 digits upsampled).
SMALL_IMAGE_VARIANTS = ("ViT-mu/2", "ViT-mu/4", "ViT-Ti/2", "ViT-Ti/4", "ViT-S/2", "ViT-S/4")
HYBRIDS = {
    "R50+ViT-B/16": dict(size="B", patch_size=16, stem_layers=(3, 4, 9)),
    "R26+ViT-S/32": dict(size="S", patch_size=32, stem_layers=(2, 2, 2, 2)),
    "R26+ViT-B/32": dict(size="B", patch_size=32, stem_layers=(2, 2, 2, 2)),
    "R50+ViT-B/32": dict(size="B", patch_size=32, stem_layers=(3, 4, 6, 3)),
    "R50+ViT-L/16": dict(size="L", patch_size=16, stem_layers=(3, 4, 9)),
    "R50+ViT-L/32": dict(size="L", patch_size=32, stem_layers=(3, 4, 6, 3)),
}
MIXER_SIZES = {
    "B": dict(width=768, depth=12, tokens_mlp_dim=384, channels_mlp_dim=3072),
    "L": dict(width=1024, depth=24, tokens_mlp_dim=512, channels_mlp_dim=4096),
}
MIXERS = {"Mixer-B/16": ("B", 16), "Mixer-B/32": ("B", 32), "Mixer-L/16": ("L", 16)}


def register_model(name: str, builder: Callable[..., nnx.Module], **defaults: Any) -> None:
    """Registers `builder(**defaults, **overrides, rngs=...)` under `name`."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = (builder, defaults)


def full_name(name: str) -> str:
    """A zoo name as the user may write it: a ViT size alone (`B/16`) is `ViT-B/16`; other
    names (`R50+ViT-B/16`, `Mixer-B/16`) are whole already."""
    return name if "-" in name else f"ViT-{name}"


def list_models(pattern: str = "") -> list[str]:
    """All registered model names containing `pattern`, sorted."""
    return sorted(name for name in _REGISTRY if pattern in name)


def valid_overrides(name: str) -> list[str]:
    """The keyword arguments `create_model(name, ...)` accepts."""
    builder, _ = _lookup(name)
    target = builder.__init__ if inspect.isclass(builder) else builder
    params = inspect.signature(target).parameters
    return sorted(p for p in params if p not in ("self", "rngs"))


# Arguments that are not settings of a named model: the class count comes from the data,
# the stem and channels define the architecture the name stands for, and a FlexiViT's
# underlying patch size is the model's `patch_size` setting (`StepBuilder.model_overrides`).
_NOT_SETTINGS = (
    "num_classes",
    "in_channels",
    "stem_layers",
    "stem_width",
    "activation_sharding",
    "param_patch_size",
)


def model_defaults(name: str) -> dict[str, Any]:
    """Every setting `create_model(name, ...)` takes, with the value the name stands for."""
    builder, registered = _lookup(name)
    target = builder.__init__ if inspect.isclass(builder) else builder
    params = inspect.signature(target).parameters
    return {
        key: registered.get(key, param.default)
        for key, param in params.items()
        if key not in ("self", "rngs", *_NOT_SETTINGS)
    }


def create_model(name: str, *, rngs: nnx.Rngs | None = None, seed: int = 0, **overrides: Any):
    """Builds a registered model; parameters initialised from `rngs` (or `seed`).

    FlexiViT: with a non-empty `patch_sizes`, `patch_size=N` is the size the model runs at,
    while its parameters keep the shapes of the name's patch size (or of `param_patch_size`):
    `create_model("ViT-B/16", patch_sizes=(8, 16, 32), patch_size=8)` has a 16x16 kernel
    and a 14x14 position grid and runs on 28x28 patches of 8 px."""
    builder, defaults = _lookup(name)
    valid = valid_overrides(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        hints = {k: difflib.get_close_matches(k, valid, n=2) for k in unknown}
        hint_text = "; ".join(f"{k!r}: did you mean {v}?" for k, v in hints.items() if v)
        raise TypeError(
            f"unknown override(s) {unknown} for model {name!r}. "
            f"{hint_text + '. ' if hint_text else ''}Valid overrides: {valid}"
        )
    kwargs = {**defaults, **overrides}
    flexi = kwargs.get("patch_sizes") and kwargs.get("param_patch_size") is None
    if flexi and "patch_size" in defaults:  # a FlexiViT keeps the shapes of the name's size
        kwargs["param_patch_size"] = defaults["patch_size"]
    return builder(**kwargs, rngs=rngs if rngs is not None else nnx.Rngs(seed))


def is_plain_vit(name: str) -> bool:
    """Whether a registered model is a ViT without a ResNet stem (FlexiViT needs one)."""
    builder, defaults = _lookup(name)
    return builder.__name__ == "VisionTransformer" and not defaults.get("stem_layers")


def _lookup(name: str):
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5)
        raise ValueError(
            f"unknown model {name!r}"
            + (f"; did you mean {close}?" if close else "")
            + f" Known models: {list_models()}"
        )
    return _REGISTRY[name]


def _register_builtin() -> None:
    from vit_jax.models.vit import VisionTransformer

    for size, dims in VIT_SIZES.items():
        for patch in PATCH_SIZES:
            register_model(f"ViT-{size}/{patch}", VisionTransformer, patch_size=patch, **dims)
    for name in SMALL_IMAGE_VARIANTS:
        size, patch = name[4:].split("/")
        dims = SMALL_SIZES.get(size) or VIT_SIZES[size]
        register_model(name, VisionTransformer, patch_size=int(patch), **dims)
    for name, spec in HYBRIDS.items():
        register_model(
            name,
            VisionTransformer,
            patch_size=spec["patch_size"],
            stem_layers=spec["stem_layers"],
            **VIT_SIZES[spec["size"]],
        )
    from vit_jax.models.mixer import MlpMixer

    for name, (size, patch) in MIXERS.items():
        register_model(name, MlpMixer, patch_size=patch, **MIXER_SIZES[size])


_register_builtin()
