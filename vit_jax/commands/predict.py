"""Top-k predictions for image files from a trained run or a released `.npz`.

    python -m vit_jax predict --workdir workdir/digits seven.png more/ [--top_k 3] [--json]
    python -m vit_jax predict --workdir workdir/flexivit seven.png --patch_size 8  # FlexiViT
    python -m vit_jax predict --checkpoint ViT-B_16.npz --model ViT-B/16 \
        --labels labels.txt x.jpg

Each image goes through the run's evaluation preprocessing (read from its saved config) and
the model in batches of `--batch_size`, padded to a fixed shape so one compiled program
serves every batch; a progress bar goes to stderr. A file that cannot be read as an image
does not stop the others: they are predicted and printed, each unreadable file is one
`error:` line on stderr, and the exit status is 2 when there was any.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from vit_jax import cli, inference
from vit_jax.errors import UserError


def predict(
    loaded: inference.LoadedModel,
    files: Sequence[str],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    progress: bool = False,
    unreadable: list[UserError] | None = None,
) -> list[dict]:
    """`[{"file", "top": [{"label", "prob"}, ...]}, ...]`, one entry per file, in order.

    A file that cannot be read as an image raises its UserError; with an `unreadable` list
    it is appended there instead and left out, and the other files are still predicted."""
    top_k = min(top_k, loaded.num_classes)
    results = []
    bar = ProgressBar(len(files), enabled=progress)
    for start in range(0, len(files), batch_size):
        chunk, images = [], []
        for path in files[start : start + batch_size]:
            try:
                images.append(loaded.preprocess(inference.read_image(path)))
            except UserError as error:
                if unreadable is None:
                    raise
                unreadable.append(error)
                continue
            chunk.append(path)
        if chunk:
            padded = np.zeros((batch_size, *images[0].shape), np.float32)
            padded[: len(chunk)] = np.stack(images)
            probs = loaded.probabilities(loaded.logits(padded))[: len(chunk)]
            for path, p in zip(chunk, probs, strict=True):
                order = np.argsort(-p, kind="stable")[:top_k]
                top = [{"label": loaded.label(int(i)), "prob": float(p[i])} for i in order]
                results.append({"file": path, "top": top})
        bar.update(len(files[start : start + batch_size]))
    bar.close()
    return results


class ProgressBar:
    """`[#####.....] 12/40 images` redrawn in place on stderr."""

    def __init__(self, total: int, *, enabled: bool, width: int = 30):
        self.total, self.done, self.enabled, self.width = total, 0, enabled, width

    def update(self, count: int) -> None:
        self.done += count
        if self.enabled:
            filled = self.width * self.done // max(1, self.total)
            bar = "#" * filled + "." * (self.width - filled)
            print(f"\r[{bar}] {self.done}/{self.total} images", end="", file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)


def format_text(results: list[dict]) -> str:
    """One header line per file, then `prob  label` lines."""
    lines = []
    for entry in results:
        lines.append(entry["file"])
        lines.extend(f"  {t['prob']:.4f}  {t['label']}" for t in entry["top"])
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser("predict", description="Top-k classes of image files.")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    inference.add_model_arguments(parser)
    parser.add_argument("--top_k", type=int, default=5, help="classes shown per image")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.top_k < 1:
        raise UserError(f"--top_k {args.top_k}: give a positive number of classes")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: give a positive batch size")
    files = inference.list_images(args.images)
    loaded = inference.load_from_args(args)
    unreadable: list[UserError] = []
    results = predict(
        loaded,
        files,
        top_k=args.top_k,
        batch_size=args.batch_size,
        progress=not args.quiet,
        unreadable=unreadable,
    )
    if results or args.json:
        print(json.dumps(results, indent=1) if args.json else format_text(results), flush=True)
    for error in unreadable:  # after the predictions: each file one line, as a UserError's
        print(f"error: {error}", file=sys.stderr, flush=True)
    if unreadable:
        return cli.USER_ERROR_STATUS
    loaded.report_parameters()
    return 0
