"""Ship a trained model: the public `.npz` layout, or a self-contained `jax.export` artifact.

    python -m vit_jax export --workdir RUN --format npz [--out model.npz]
    python -m vit_jax export --workdir RUN --format jax [--out model.jax] \
        [--platforms cpu,cuda]

`npz` writes the original ViT release layout through `save_npz` (timm's npz loader reads
it). `jax` serializes the inference function, images in NHWC float32 -> logits, as StableHLO
with the parameters inside and a symbolic batch dimension; running it needs only JAX:

    exported = jax.export.deserialize(open("model.jax", "rb").read())
    logits = exported.call(images)  # images: (any batch, H, W, 3) float32

The input contract (shape, dtype, value range, class names, the preprocessing that makes
such images from files) is written next to it as `model.json`. The run and `--out` may be
bucket URLs (gs://...).

A FlexiViT run (config.model.patch_sizes) is exported at `--patch_size` (one of its sizes;
default: its own) as the plain ViT of that patch size: the `.npz` holds the PI-resized
kernel and the resized position embedding, and the contract records `patch_size`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax import cli, inference, storage
from vit_jax.checkpoint import save_npz
from vit_jax.data import pp_parse
from vit_jax.errors import UserError

FORMATS = {"npz": ".npz", "jax": ".jax"}


def export_jax(
    loaded: inference.LoadedModel, path: str, platforms: Sequence[str] | None = None
) -> dict:
    """Writes the serialized inference function to `path` and its contract (returned) next
    to it as JSON."""
    graphdef, state = nnx.split(loaded.model)

    def logits(images: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(images, train=False).astype(jnp.float32)

    (batch,) = jax.export.symbolic_shape("b")
    size = loaded.image_size
    spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    exported = jax.export.export(jax.jit(logits), platforms=platforms)(spec)
    storage.write_bytes(path, exported.serialize())
    contract = input_contract(loaded, exported, storage.basename(path))
    storage.write_text(contract_path(path), json.dumps(contract, indent=2))
    return contract


def contract_path(path: str) -> str:
    """`model.json` beside `model.jax` (a local path or a URL)."""
    extension = os.path.splitext(storage.basename(path))[1]
    return path[: len(path) - len(extension)] + ".json"


def input_contract(loaded: inference.LoadedModel, exported: jax.export.Exported, name: str):
    """What a caller must feed the artifact and what comes out, as plain JSON values."""
    size = loaded.image_size
    return {
        "artifact": name,
        "format": "jax.export serialized StableHLO; jax.export.deserialize(bytes).call(images)",
        "platforms": list(exported.platforms),
        "input": {
            "shape": ["batch", size, size, 3],
            "dtype": "float32",
            "layout": "NHWC",
            "value_range": value_range(loaded.pp),
        },
        "output": {
            "shape": ["batch", loaded.num_classes],
            "dtype": "float32",
            "meaning": "logits; " + ("sigmoid" if loaded.multi_label else "softmax") + " for p",
        },
        "image_size": size,
        "num_classes": loaded.num_classes,
        "class_names": list(loaded.class_names) if loaded.class_names else None,
        "preprocessing": loaded.pp,
        "model_name": loaded.config.model_name if loaded.config else None,
        "source": loaded.source,
        "step": loaded.step,
        "parameters": loaded.parameters,  # "ema": the run's weight EMA
        "patch_size": getattr(loaded.model, "patch_size", None),  # the size it runs at
        "patch_sizes": list(loaded.patch_sizes) or None,  # a FlexiViT's trained sizes
        "jax_version": jax.__version__,
    }


def value_range(pp: str) -> list[float] | None:
    """The [min, max] the preprocessing's `value_range` op maps pixels to (None if none)."""
    ops = [op for op in pp_parse.parse_pp(pp) if op.name == "value_range"]
    if not ops:
        return None
    args = {
        "vmin": -1.0,
        "vmax": 1.0,
        **dict(zip(("vmin", "vmax"), ops[-1].args[:2], strict=False)),
        **ops[-1].kwargs,
    }
    return [float(args["vmin"]), float(args["vmax"])]


def default_out(args: argparse.Namespace) -> str:
    folder = storage.join(args.workdir, "export") if args.workdir else "export"
    return storage.join(folder, "model" + FORMATS[args.format])


def parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        "export",
        description="Write a trained model for use elsewhere.",
    )
    inference.add_model_arguments(parser)
    parser.add_argument("--format", choices=sorted(FORMATS), required=True)
    parser.add_argument("--out", help="output file (default: <workdir>/export/model.<format>)")
    parser.add_argument(
        "--platforms", help="jax: comma-separated targets, e.g. cpu,cuda,tpu (default: this one)"
    )
    return parser


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.out:  # a path of the user's own: checked before anything is read
        storage.check_output(args.out, "--out")
    loaded = inference.load_from_args(args)
    out = args.out or default_out(args)
    storage.check_output(out, "--out")
    if args.format == "npz":
        try:
            save_npz(loaded.model, out)
        except (KeyError, ValueError) as e:
            raise UserError(f"--format npz: this model has no public .npz layout ({e})") from e
        print(out)
        loaded.report_parameters()
        return 0
    platforms = args.platforms.split(",") if args.platforms else None
    try:
        export_jax(loaded, out, platforms)
    except ValueError as e:
        raise UserError(f"--platforms {args.platforms}: {str(e).splitlines()[0]}") from e
    print(out)
    print(contract_path(out))
    loaded.report_parameters()
    return 0
