"""Pictures of what a trained ViT learned (the paper's Figures 6 and 7) and its curves.

    python -m vit_jax visualize attention --workdir RUN image.jpg  # attention rollout
    python -m vit_jax visualize posemb    --workdir RUN        # position embeddings
    python -m vit_jax visualize filters   --workdir RUN        # patch-embedding PCs
    python -m vit_jax visualize distance  --workdir RUN        # attention distance
    python -m vit_jax visualize curves    --workdir RUN        # metrics.jsonl

PNG files go to RUN/pictures/ (or `--out`: a folder, or a .png file for one picture); RUN
and `--out` may be bucket URLs (gs://...). `--show` prints the pictures' paths. The NumPy
functions below do the arithmetic; `draw_*` renders.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from vit_jax import cli, data, inference, storage
from vit_jax.errors import UserError
from vit_jax.experiment import check_run_directory
from vit_jax.models.vit import VisionTransformer, posemb_sincos_2d

KINDS = ("attention", "posemb", "filters", "distance", "curves")
DPI = 100
FIGSIZE = {  # inches; a picture is FIGSIZE * DPI pixels
    "attention": (9.0, 3.2),
    "posemb": (6.0, 6.0),
    "filters": (7.0, 4.6),
    "distance": (5.0, 4.0),
    "curves": (12.0, 3.6),
}

# --- the arithmetic --------------------------------------------------------------------------


def attention_rollout(attention: np.ndarray) -> np.ndarray:
    """(layers, heads, N, N) -> (N, N): how much each token draws on each input token.

    Per layer: heads averaged, the identity added for the residual path, rows renormalised;
    then the layers' matrices multiplied from the first to the last (Abnar & Zuidema).
    """
    tokens = attention.shape[-1]
    joint = np.eye(tokens)
    for layer in np.asarray(attention, np.float64):
        mixed = layer.mean(axis=0) + np.eye(tokens)
        joint = (mixed / mixed.sum(axis=-1, keepdims=True)) @ joint
    return joint


def rollout_map(
    attention: np.ndarray, grid: tuple[int, int], num_prefix: int, num_registers: int = 0
) -> np.ndarray:
    """The rollout onto the patch grid: the class token's row, or (no class token, e.g. gap
    pooling) the mean over the patch tokens' rows. Tokens are [class, registers, patches].

    Register tokens are rolled out with the rest, and only then are their rows and columns
    dropped. Rollout follows attention paths through the layers, and a register is a relay
    on them: the class token may read a register in one layer that gathered from patches in
    an earlier one. Dropping the registers from each layer's matrix first would cut those
    paths, and renormalising would hand their share to whatever patches were read directly.
    In the product, patches get the credit for what flowed through registers; the register
    columns left over are what the learned register inputs (no image location) contribute,
    and their rows are no output the model pools."""
    joint = attention_rollout(attention)
    first_patch = num_prefix + num_registers
    row = joint[0] if num_prefix else joint[first_patch:].mean(axis=0)
    return row[first_patch:].reshape(grid)


def mean_attention_distance(
    attention: np.ndarray,
    grid: tuple[int, int],
    patch_size: int,
    num_prefix: int,
    num_registers: int = 0,
) -> np.ndarray:
    """(layers, batch, heads, N, N) -> (layers, heads): the pixel distance between patch
    centres, weighted by attention and averaged over query patches and images. Class-token
    and register rows and columns (they have no place in the image) are left out and the
    remaining weights renormalised: a statistic of each layer alone, unlike the rollout."""
    first_patch = num_prefix + num_registers
    weights = np.asarray(attention, np.float64)[..., first_patch:, first_patch:]
    weights = weights / weights.sum(axis=-1, keepdims=True)
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    centres = np.stack([rows.ravel(), cols.ravel()], axis=-1) * patch_size
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    return (weights * distance).sum(axis=-1).mean(axis=(1, 3))


def posemb_similarity(posemb: np.ndarray, grid: tuple[int, int], num_prefix: int) -> np.ndarray:
    """(N, D) -> (gh, gw, gh, gw): cosine similarity of every patch position to every other."""
    table = np.asarray(posemb, np.float64).reshape(-1, posemb.shape[-1])[num_prefix:]
    table = table / np.linalg.norm(table, axis=-1, keepdims=True)
    return (table @ table.T).reshape(*grid, *grid)


def filter_components(kernel: np.ndarray, count: int) -> np.ndarray:
    """(p, p, C, D) patch-embedding kernel -> (count, p, p, C): the leading principal
    components of its D filters, each a p x p x C patch."""
    size, _, channels, width = kernel.shape
    filters = np.asarray(kernel, np.float64).reshape(-1, width).T  # (D, p*p*C)
    _, _, components = np.linalg.svd(filters - filters.mean(axis=0), full_matrices=False)
    count = min(count, len(components))
    return components[:count].reshape(count, size, size, channels)


# --- the model's side ------------------------------------------------------------------------


def vit_of(loaded: inference.LoadedModel, kind: str) -> VisionTransformer:
    if not isinstance(loaded.model, VisionTransformer):
        raise UserError(f"visualize {kind}: needs a ViT; {type(loaded.model).__name__} has none")
    return loaded.model


def num_prefix(model: VisionTransformer) -> int:
    """Class-token slots (0 or 1), in the position embedding and the token sequence."""
    return int(model.cls_token is not None)


def num_registers(model: VisionTransformer) -> int:
    """Register tokens between the class token and the patches (none in the posemb)."""
    return int(getattr(model, "num_registers", 0))


def attention_fn(loaded: inference.LoadedModel) -> Callable[[np.ndarray], np.ndarray]:
    """Preprocessed images -> attention weights (layers, B, heads, N, N), jit-compiled."""
    graphdef, state = nnx.split(vit_of(loaded, "attention"))

    @jax.jit
    def forward(state, images):
        model = nnx.merge(graphdef, state)
        return model.forward_features(images, return_attention=True)["attention"]

    return lambda images: np.asarray(forward(state, images), np.float32)


def posemb_table(model: VisionTransformer) -> np.ndarray:
    """The learned table, or the fixed sin-cos one (class slot included if there is one)."""
    if model.posemb is not None:
        return np.asarray(model.posemb[...])[0]
    return np.asarray(posemb_sincos_2d(*model.grid, model.width))[0]


def eval_images(loaded: inference.LoadedModel, count: int) -> np.ndarray:
    """The first `count` images of the run's (first) evaluation split, preprocessed."""
    if loaded.config is None:
        raise UserError("visualize distance: give image files, or --workdir for its eval split")
    config = loaded.config.data
    name = next(iter(config.evals))
    batch = next(
        data.eval_batches(config, name, global_batch_size=count, process_index=0, process_count=1)
    )
    return batch["image"][batch["mask"] > 0]


def head_distances(loaded: inference.LoadedModel, images: np.ndarray, chunk: int = 16):
    """Mean attention distance (layers, heads) over the images, computed in chunks."""
    model = vit_of(loaded, "distance")
    attention = attention_fn(loaded)
    total = 0.0
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk]
        maps = attention(part)
        total += len(part) * mean_attention_distance(
            maps, model.grid, model.patch_size, num_prefix(model), num_registers(model)
        )
    return total / len(images)


def read_metrics(workdir: str) -> list[dict]:
    """The records of the run's `metrics.jsonl` (a folder or a bucket URL)."""
    path = storage.join(workdir, "metrics.jsonl")
    with inference.reading(f"--workdir {workdir}"):
        check_run_directory(workdir, "--workdir")
        if not storage.is_file(path):
            raise UserError(f"--workdir {workdir}: no metrics.jsonl; train first (or another run)")
        text = storage.read_text(path)
    try:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise UserError(f"{path}: not JSON lines ({e})") from None
    if not records:
        raise UserError(f"{path} is empty: the run logged nothing yet")
    return records


# --- drawing ---------------------------------------------------------------------------------


def save_figure(figure, path: str) -> None:
    """Writes the figure as a PNG file to a local path or a bucket URL, in one piece."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    storage.write_bytes(path, buffer.getvalue())


def new_figure(kind: str):
    """A figure on the Agg canvas (no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGSIZE[kind], dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _display(image: np.ndarray) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def _upsample(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    resized = Image.fromarray(np.asarray(values, np.float32), mode="F")
    return np.asarray(resized.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def draw_attention(loaded: inference.LoadedModel, path: str, image: np.ndarray, title: str):
    model = vit_of(loaded, "attention")
    maps = attention_fn(loaded)(image[None])[:, 0]
    rollout = rollout_map(maps, model.grid, num_prefix(model), num_registers(model))
    mask = _display(_upsample(rollout, image.shape[:2]))
    probs = loaded.probabilities(loaded.logits(image[None]))[0]
    best = int(np.argmax(probs))
    shown = _display(image)
    figure = new_figure("attention")
    panels = [
        (shown, f"{title}"),
        (mask, "attention rollout"),
        (shown * mask[..., None], f"{loaded.label(best)} ({probs[best]:.2f})"),
    ]
    for i, (picture, text) in enumerate(panels):
        axis = figure.add_subplot(1, 3, i + 1)
        axis.imshow(picture, cmap="inferno" if picture.ndim == 2 else None, vmin=0, vmax=1)
        axis.set_title(text, fontsize=9)
        axis.axis("off")
    save_figure(figure, path)


def _mosaic(tiles: np.ndarray, columns: int, gap: int = 1) -> np.ndarray:
    """(n, h, w[, c]) tiles -> one image with NaN (blank) gaps between them."""
    n, h, w = tiles.shape[:3]
    rows = math.ceil(n / columns)
    out = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, *tiles.shape[3:]), np.nan)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return out


def draw_posemb(loaded: inference.LoadedModel, path: str) -> None:
    model = vit_of(loaded, "posemb")
    similarity = posemb_similarity(posemb_table(model), model.grid, num_prefix(model))
    grid_h, grid_w = model.grid
    tiles = similarity.reshape(grid_h * grid_w, grid_h, grid_w)
    figure = new_figure("posemb")
    axis = figure.add_subplot(1, 1, 1)
    shown = axis.imshow(_mosaic(tiles, grid_w), cmap="viridis", vmin=-1, vmax=1)
    figure.colorbar(shown, ax=axis, fraction=0.046, label="cosine similarity")
    axis.set_title("position embedding similarity (one tile per patch position)", fontsize=9)
    axis.axis("off")
    figure.tight_layout()
    save_figure(figure, path)


def draw_filters(loaded: inference.LoadedModel, path: str, count: int) -> None:
    model = vit_of(loaded, "filters")
    kernel = np.asarray(model.patch_embed.kernel[...])
    if model.stem is not None or kernel.shape[2] != 3:
        raise UserError("visualize filters: needs a ViT whose patches are RGB pixels (no stem)")
    components = filter_components(kernel, count)
    tiles = np.stack([_display(c) for c in components])
    figure = new_figure("filters")
    axis = figure.add_subplot(1, 1, 1)
    axis.imshow(np.nan_to_num(_mosaic(tiles, 7), nan=1.0))
    axis.set_title(f"first {len(tiles)} principal components of the patch filters", fontsize=9)
    axis.axis("off")
    save_figure(figure, path)


def draw_distance(loaded: inference.LoadedModel, path: str, images: np.ndarray) -> None:
    distances = head_distances(loaded, images)
    model = vit_of(loaded, "distance")
    layers, heads = distances.shape
    figure = new_figure("distance")
    axis = figure.add_subplot(1, 1, 1)
    for head in range(heads):
        axis.scatter(np.arange(1, layers + 1), distances[:, head], s=14, label=f"head {head}")
    axis.set_xticks(np.arange(1, layers + 1, max(1, layers // 12)))
    axis.set_xlabel("network depth (layer)")
    axis.set_ylabel("mean attention distance (pixels)")
    axis.set_ylim(0, model.patch_size * math.hypot(*model.grid))
    axis.set_title(f"{len(images)} images, {model.img_size[0]} px", fontsize=9)
    if heads <= 16:
        axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    save_figure(figure, path)


def draw_curves(workdir: str, path: str, records: list[dict] | None = None) -> None:
    records = read_metrics(workdir) if records is None else records
    panels = {
        "loss": [k for k in _keys(records) if k.endswith("/loss")],
        "accuracy (top-1)": [k for k in _keys(records) if k.endswith("top1")],
        "learning rate": [k for k in _keys(records) if k.endswith("learning_rate")],
    }
    figure = new_figure("curves")
    for i, (title, keys) in enumerate(panels.items()):
        axis = figure.add_subplot(1, 3, i + 1)
        for key in keys:
            points = [(r["step"], float(r[key])) for r in records if key in r]
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, marker="o" if len(points) < 20 else None, label=key)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step")
        if keys:
            axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def _keys(records: list[dict]) -> list[str]:
    return sorted({k for r in records for k in r if k != "step"})


# --- the command -----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        "visualize",
        description="Pictures of a trained model (PNG).",
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("images", nargs="*", help="attention: images; distance: optional")
    inference.add_model_arguments(parser)
    parser.add_argument("--out", help="folder (or .png file) for the pictures")
    parser.add_argument("--show", action="store_true", help="print the pictures' paths")
    parser.add_argument("--num_filters", type=int, default=28, help="filters: components")
    parser.add_argument("--num_images", type=int, default=128, help="distance: eval images")
    return parser


def output_paths(args: argparse.Namespace, names: list[str]) -> list[str]:
    """Where each picture goes: --out (folder or one .png), else <workdir>/pictures; local
    folders are created, a bucket is checked to take writes."""
    out = args.out or storage.join(args.workdir or ".", "pictures")
    if out.lower().endswith(".png"):
        if len(names) != 1:
            raise UserError(f"--out {out}: {len(names)} pictures need a folder, not one file")
        storage.check_output(out, "--out")
        return [out]
    storage.check_output(out, "--out", folder=True)
    return [storage.join(out, name) for name in names]


def make_pictures(args: argparse.Namespace) -> tuple[list[str], inference.LoadedModel | None]:
    """Draws the pictures the arguments ask for; returns their paths and the model drawn
    (None for the curves)."""
    if args.kind == "curves":
        if not args.workdir:
            raise UserError("visualize curves: give --workdir <run>")
        records = read_metrics(args.workdir)  # before anything is written
        (path,) = output_paths(args, ["curves.png"])
        draw_curves(args.workdir, path, records)
        return [path], None
    if args.kind == "attention" and not args.images:
        raise UserError("visualize attention: give one or more image files")
    if args.kind == "distance" and args.num_images < 1:
        raise UserError(f"--num_images {args.num_images}: give a positive number")
    files = inference.list_images(args.images) if args.images else []
    if args.kind == "attention":  # the arguments are checked before the model is loaded
        stems = [os.path.splitext(storage.basename(f))[0] for f in files]
        paths = output_paths(args, [f"attention_{stem}.png" for stem in stems])
    else:
        paths = output_paths(args, [f"{args.kind}.png"])
    loaded = inference.load_from_args(args)
    if args.kind == "attention":
        for file, path in zip(files, paths, strict=True):
            image = loaded.preprocess(inference.read_image(file))
            draw_attention(loaded, path, image, storage.basename(file))
        return paths, loaded
    (path,) = paths
    if args.kind == "posemb":
        draw_posemb(loaded, path)
    elif args.kind == "filters":
        draw_filters(loaded, path, args.num_filters)
    else:
        if files:
            images = inference.load_images(loaded, files)
        else:
            images = eval_images(loaded, args.num_images)
        draw_distance(loaded, path, images)
    return [path], loaded


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    paths, loaded = make_pictures(args)
    if args.show:
        print("\n".join(paths))
    else:
        print(f"wrote {len(paths)} picture(s) to {storage.dirname(paths[0])}", file=sys.stderr)
    if loaded is not None:
        loaded.report_parameters()
    return 0
