"""A trained model ready for use: from a run's workdir or a released `.npz`.

`load_run(workdir)` rebuilds the run's config from the `config.json` the trainer wrote,
builds the model from abstract shapes (nothing random is allocated), restores the newest
complete checkpoint's parameters and builds the run's evaluation preprocessing for single
image files, so a picture goes through the same ops as the run's evaluation did. The class
names come from the run's `class_names.json` (saved when it started), so the data need not
be where it was.
A FlexiViT run (config.model.patch_sizes) runs at one of its sizes (`patch_size`, default
its own): the model is the plain ViT of that patch size (`Experiment.model`).
`load_npz_model` does the same for a public-layout `.npz` with the release's preprocessing.
The commands `predict`, `visualize` and `export` start from here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from vit_jax import data, storage
from vit_jax.checkpoint import CheckpointError, read_npz
from vit_jax.checkpoint.npz import REGISTERS_KEY
from vit_jax.data import label_ops, pp_parse, presets, registry
from vit_jax.data._tf import tf
from vit_jax.errors import UserError
from vit_jax.experiment import (
    CLASS_NAMES_FILE,
    PARAMETER_SETS,
    Experiment,
    pick_patch_size,
    read_class_names,
)
from vit_jax.models import full_name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
_TF_FORMATS = ("JPEG", "PNG", "GIF", "BMP")  # what the eval pipeline's decode op reads
# Label and key ops only touch labels; a single image has none, so they are left out.
_LABEL_OPS = frozenset(
    name
    for name, fn in vars(label_ops).items()
    if callable(fn) and getattr(fn, "__module__", None) == label_ops.__name__
)


@dataclasses.dataclass
class LoadedModel:
    """A model with what is needed to feed it images and name its outputs."""

    model: nnx.Module
    config: ml_collections.ConfigDict | None  # the run's config (None for an .npz)
    class_names: tuple[str, ...] | None
    pp: str  # the evaluation preprocessing applied to one image (label ops left out)
    image_size: int
    multi_label: bool = False  # sigmoid outputs instead of a softmax
    step: int | None = None
    source: str = ""  # the workdir or the .npz file
    parameters: str = "raw"  # "ema": a run's weight EMA (config.ema_decay), else "raw"
    patch_sizes: tuple[int, ...] = ()  # a FlexiViT run's sizes (config.model.patch_sizes)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def report_parameters(self) -> None:
        """Says on stderr, after a command's work, that a run's weight EMA was used and at
        which patch size a FlexiViT run ran."""
        if self.patch_sizes:
            print(
                f"ran the FlexiViT at patch size {self.model.patch_size} (trained at "
                f"{', '.join(map(str, self.patch_sizes))}; --patch_size to choose)",
                file=sys.stderr,
                flush=True,
            )
        if self.parameters == "ema":
            print(
                f"used the weight EMA of step {self.step} of {self.source} "
                "(--params=raw for the trained parameters)",
                file=sys.stderr,
                flush=True,
            )

    @functools.cached_property
    def _pp_fn(self) -> Callable[[tf.Tensor], tf.Tensor]:
        pp = registry.build_pp(self.pp)
        spec = tf.TensorSpec([], tf.string)
        return tf.function(
            lambda raw: tf.cast(pp({"image": raw}, 0)["image"], tf.float32), [spec], autograph=False
        )

    def preprocess(self, encoded: bytes) -> np.ndarray:
        """Encoded image bytes -> the (H, W, 3) float32 array evaluation would feed."""
        return self._pp_fn(tf.constant(encoded)).numpy()

    @functools.cached_property
    def _forward(self) -> Callable[[nnx.State, jax.Array], jax.Array]:
        graphdef, _ = nnx.split(self.model)
        return jax.jit(lambda state, images: nnx.merge(graphdef, state)(images, train=False))

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits (B, classes) of a batch of preprocessed images (jit-compiled per shape)."""
        return np.asarray(self._forward(nnx.state(self.model), images))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax over classes, or per-class sigmoids for a multi-label model."""
        logits = np.asarray(logits, np.float64)
        if self.multi_label:
            return 1.0 / (1.0 + np.exp(-logits))
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)

    def label(self, index: int) -> str | int:
        """The class name, or the index where the dataset has no names."""
        return self.class_names[index] if self.class_names else int(index)


# --- a run's workdir -------------------------------------------------------------------------


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
    """Turns a failure to read a file or bucket (FileNotFoundError, a refused or unanswered
    request) into one UserError line that starts with `what`."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any storage failure becomes one line
        raise read_failure(what, e) from e


def read_failure(what: str, error: BaseException) -> UserError:
    """`what: cannot read it (the error's first line)`."""
    text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return UserError(f"{what}: cannot read it ({text})")


def load_run(
    workdir: str, step: int | None = None, params: str = "auto", patch_size: int | None = None
) -> LoadedModel:
    """The model of a training run at its newest complete checkpoint (or at `step`), with
    its weight EMA where it kept one and `params` is "auto" or "ema" ("raw": the trained
    parameters); `LoadedModel.parameters_note` says which were taken. A FlexiViT run runs at
    `patch_size`, one of its config.model.patch_sizes (default: its own patch size)."""
    with reading(f"--workdir {workdir}"):
        experiment = Experiment.from_workdir(workdir, step, params)
    config, num_classes = experiment.config, experiment.num_classes
    size = pick_patch_size(config, patch_size, flag="--patch_size", where=f"the run {workdir}")
    return LoadedModel(
        model=experiment.model(size),
        config=config,
        class_names=_checked_names(run_class_names(workdir, config.data), num_classes),
        pp=eval_pp(config.data, num_classes),
        image_size=int(config.data.image_size),
        multi_label=bool(config.data.multi_label) or "sigmoid" in str(config.loss),
        step=experiment.checkpoint_step,
        source=workdir,
        parameters=experiment.parameter_set,
        patch_sizes=experiment.steps.patch_sizes,
    )


def eval_pp(data_config: ml_collections.ConfigDict, num_classes: int, split: str = "") -> str:
    """The run's evaluation pp string for one image: placeholders filled, label ops dropped."""
    name = split or next(iter(data_config.evals), None)
    if name is None:
        raise UserError("the run's config has no evaluation split (data.evals) to copy")
    cfg = ml_collections.ConfigDict(data_config.to_dict())
    cfg.num_classes = num_classes
    spec = data.format_pp(cfg.evals[name].pp, cfg)
    ops = [op for op in pp_parse.parse_pp(spec) if op.name not in _LABEL_OPS]
    return "|".join(_format_op(op) for op in ops)


def _format_op(op: pp_parse.OpCall) -> str:
    args = [repr(a) for a in op.args] + [f"{k}={v!r}" for k, v in op.kwargs.items()]
    return f"{op.name}({', '.join(args)})" if args else op.name


def run_class_names(workdir: str, data_config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
    """The class names the run saved when it started (no data needed); for a run trained
    before they were saved, read from the data as the run's config names it, with a note."""
    saved, names = read_class_names(workdir)
    if saved:
        return names
    names = class_names(data_config)
    found = "read from the data" if names else "not in the data either: indices are shown"
    print(
        f"note: {workdir} has no {CLASS_NAMES_FILE} (trained before the class names were "
        f"saved with the run); the class names were {found}",
        file=sys.stderr,
        flush=True,
    )
    return names


def class_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
    """Class names where the dataset has them (digits, image folders, TFDS), else None."""
    split = data_config.train
    try:
        if split.source == "digits":
            return tuple(str(i) for i in range(10))
        if split.source == "folder":
            from vit_jax.data.sources import folder

            return folder.class_names(split.data_dir or data_config.data_dir or split.name)
        if split.source == "tfds":
            import tensorflow_datasets as tfds

            builder = tfds.builder(split.name, data_dir=split.data_dir or data_config.data_dir)
            return tuple(builder.info.features["label"].names)
    except Exception:  # noqa: BLE001 - names are a nicety; a missing dataset leaves indices
        return None
    return None


def _checked_names(names: Sequence[str] | None, num_classes: int) -> tuple[str, ...] | None:
    return tuple(names) if names is not None and len(names) == num_classes else None


# --- a released .npz ---------------------------------------------------------------------------


def load_npz_model(
    path: str,
    model_name: str,
    num_classes: int | None = None,
    img_size: int = 224,
    labels_file: str | None = None,
) -> LoadedModel:
    """A public-layout `.npz` as a model, with the release's resize-to-size preprocessing."""
    with reading(f"--checkpoint {path}"):
        if not storage.is_file(path):
            raise UserError(f"--checkpoint {path}: {storage.missing(path)}")
    names = read_labels(labels_file) if labels_file else None
    if num_classes is None:
        num_classes = len(names) if names else _npz_num_classes(path)
    if names is not None and len(names) != num_classes:
        raise UserError(
            f"--labels {labels_file}: {len(names)} names for a {num_classes}-class model"
        )
    try:
        experiment = Experiment.from_npz(
            path,
            model_name,
            num_classes=num_classes,
            img_size=img_size,
            num_registers=_npz_num_registers(path),
        )
    except (ValueError, TypeError, CheckpointError) as e:
        first = str(e).splitlines()[0]
        raise UserError(f"--checkpoint {path} --model {model_name}: {first}") from None
    spec = presets.RESIZE_EVAL_PP.replace("|onehot({num_classes})", "")
    return LoadedModel(
        model=experiment.model(),
        config=None,
        class_names=names,
        pp=spec.format(image_size=img_size),
        image_size=img_size,
        source=path,
    )


def _npz_num_classes(path: str) -> int:
    with reading(f"--checkpoint {path}"):
        head = read_npz(path, lambda keys: [k for k in keys if k.endswith("head/bias")])
    if not head:
        raise UserError(f"--checkpoint {path}: the file has no classifier head; --num_classes")
    return int(next(iter(head.values())).shape[0])


def _npz_num_registers(path: str) -> int:
    """The file's register-token count (its `registers` array, (1, R, width)); 0 without."""
    with reading(f"--checkpoint {path}"):
        found = read_npz(path, lambda keys: [k for k in keys if k.endswith(REGISTERS_KEY)])
    shapes = [v.shape for k, v in found.items() if k.rsplit("/", 1)[-1] == REGISTERS_KEY]
    return int(shapes[0][1]) if shapes and len(shapes[0]) == 3 else 0


def read_labels(path: str) -> tuple[str, ...]:
    """One class name per line."""
    try:
        names = [line.strip() for line in storage.read_text(path).splitlines()]
    except FileNotFoundError:
        raise UserError(f"--labels {path}: {storage.missing(path)}") from None
    except Exception as e:  # noqa: BLE001 - a bucket's failures become one line too
        raise read_failure(f"--labels {path}", e) from None
    while names and not names[-1]:
        names.pop()
    if not names:
        raise UserError(f"--labels {path}: the file is empty; give one class name per line")
    return tuple(names)


# --- image files -------------------------------------------------------------------------------


def list_images(paths: Iterable[str]) -> list[str]:
    """Files as given, folders expanded to the image files under them (sorted); local paths
    or bucket URLs."""
    files: list[str] = []
    for path in paths:
        with reading(path):
            if storage.is_dir(path):
                found = sorted(
                    name
                    for name in storage.walk_files(path)
                    if storage.basename(name).lower().endswith(IMAGE_EXTENSIONS)
                )
                if not found:
                    raise UserError(
                        f"{path}: the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
                    )
                files.extend(found)
            elif storage.is_file(path):
                files.append(path)
            elif storage.is_remote(path):
                raise UserError(f"{path}: no such image file or folder ({storage.missing(path)})")
            else:
                raise UserError(f"{path}: no such image file or folder")
    return files


def read_image(path: str) -> bytes:
    """The file's encoded bytes, checked to decode; formats TF cannot read become PNG."""
    from PIL import Image

    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except Exception as e:  # noqa: BLE001 - a bucket's failures become one line too
        raise read_failure(path, e) from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            if image.format in _TF_FORMATS:
                return raw
            out = io.BytesIO()
            image.convert("RGB").save(out, "PNG")
            return out.getvalue()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = _decode_failure(e)
        raise UserError(
            f"{path}: not a readable image ({reason}); give a JPEG or PNG file"
        ) from None


def _decode_failure(error: BaseException) -> str:
    """PIL's reason, without the in-memory buffer it names instead of the file
    (`cannot identify image file <_io.BytesIO object at 0x...>`): the caller names the file."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "unrecognised image format, or not an image"
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_images(loaded: LoadedModel, files: Sequence[str]) -> np.ndarray:
    """Preprocessed images (B, H, W, 3) of the given files."""
    return np.stack([loaded.preprocess(read_image(f)) for f in files])


# --- command-line plumbing shared by predict, visualize and export ----------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--workdir, or --checkpoint/--model/--labels for a released .npz."""
    group = parser.add_argument_group("model (a training run, or a released .npz)")
    group.add_argument("--workdir", help="a training run's directory (newest checkpoint)")
    group.add_argument("--step", type=int, help="a checkpoint step other than the newest")
    group.add_argument(
        "--params",
        choices=PARAMETER_SETS,
        default="auto",
        help="a run with a weight EMA (config.ema_decay): its EMA (auto, the default; ema) or "
        "its trained parameters (raw)",
    )
    group.add_argument(
        "--patch_size",
        type=int,
        help="a FlexiViT run (config.model.patch_sizes): the patch size to run at, one of its "
        "sizes (default: the model's own)",
    )
    group.add_argument("--checkpoint", help="a public-layout .npz file instead of a run")
    group.add_argument("--model", help="the .npz's model name, e.g. ViT-B/16 or B/16")
    group.add_argument("--labels", help="class names for the .npz, one per line")
    group.add_argument("--img_size", type=int, default=224, help="the .npz model's input size")
    group.add_argument("--num_classes", type=int, help="the .npz's class count (default: its head)")


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    """The model the command-line arguments name."""
    if bool(args.workdir) == bool(args.checkpoint):
        raise UserError("give either --workdir <run> or --checkpoint <file.npz> --model <name>")
    patch_size = getattr(args, "patch_size", None)
    if args.workdir:
        return load_run(args.workdir, args.step, args.params, patch_size)
    if patch_size is not None:
        raise UserError(
            f"--patch_size {patch_size}: only a FlexiViT training run (--workdir) runs at "
            "other patch sizes; a released .npz runs at its model's patch size"
        )
    if not args.model:
        raise UserError("--checkpoint needs --model, e.g. --model ViT-B/16")
    model = full_name(args.model)
    return load_npz_model(args.checkpoint, model, args.num_classes, args.img_size, args.labels)
