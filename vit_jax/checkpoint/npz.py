"""Model weights in the public `.npz` layouts: load (with conversions) and save.

Reads the original ViT release layout (`Transformer/encoderblock_{i}/...`, position embedding
under `Transformer/posembed_input`), the big_vision layout (top-level `pos_embedding` without
the class slot, `_0` numbering, blocks optionally stacked under `Transformer/encoderblock/...`
with a leading layer axis) and files whose keys carry a `params/` or `opt/target/` prefix.
Either layout loads into a scanned or an unrolled model: per-layer arrays are stacked or
unstacked as needed. The loader only relies on `model.npz_names(layout)`, so any model that
names its parameters that way (ViT, hybrids, Mixer) loads through it.

Register tokens (a ViT with `num_registers` > 0) are the top-level key `registers`, shape
(1, num_registers, width), next to `cls`, in both layouts; the position embedding has no
slots for them. A file and a model that disagree on them (registers on one side only, or
another count) are a mismatch like any other, and its message names the count to build.

Pickles are always refused: an `.npz` member holding an object array would run code from the
file when unpickled.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax import storage
from vit_jax.checkpoint.posemb import INTERPOLATIONS, resize_posemb
from vit_jax.errors import UserError
from vit_jax.models.resnet import GroupNorm

LAYOUTS = ("original", "big_vision")
HEAD_POLICIES = ("auto", "keep", "replace", "drop")
PRE_LOGITS_POLICIES = ("auto", "keep", "drop")
WEIGHT_PREFIXES = ("opt/target/", "params/")
POSEMB_LEAF = "pos_embedding"
REGISTERS_KEY = "registers"  # the register tokens, (1, num_registers, width)
# Where older big_vision files kept the position embedding (an accepted alias when loading).
LEGACY_POSEMB_KEYS = ("Transformer/pos_embedding",)

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_REFUSAL = (
    "holds pickled objects; refusing to load it because loading would run code from the file"
)


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read (not an `.npz`, pickled content, bad dtype)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's arrays do not fit the model; lists every problem at once."""

    def __init__(
        self,
        message: str,
        *,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


@dataclasses.dataclass
class LoadReport:
    """What `load_npz` did.

    `missing`, `unexpected` and `mismatched` (key, file shape, model shape) are only
    non-empty with `strict=False`. `dropped` lists file keys deliberately not loaded (head /
    pre_logits policies), `ignored` keys outside the weights prefix (e.g. optimizer state).
    `head` / `pre_logits` is one of 'loaded', 'replaced', 'dropped' (the file's ignored, the
    model's own initialisation kept) or 'absent'.
    """

    path: str
    layout: str
    prefix: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
        default_factory=list
    )
    dropped: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    head: str = "absent"
    pre_logits: str = "absent"
    posemb: str | None = None

    def __str__(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} parameters from {self.path} ({self.layout} layout"
            + (f", prefix {self.prefix!r}" if self.prefix else "")
            + f"); head {self.head}, pre_logits {self.pre_logits}"
        ]
        if self.posemb:
            lines.append(f"position embedding {self.posemb}")
        for name in ("missing", "unexpected", "mismatched", "dropped", "ignored"):
            values = getattr(self, name)
            if values:
                lines.append(f"{name}: {values}")
        return "\n".join(lines)


# --- reading ---------------------------------------------------------------------------------


def read_npz(
    path: str | os.PathLike, select: Callable[[list[str]], list[str]] | None = None
) -> dict[str, np.ndarray]:
    """Reads the arrays of an `.npz` file (a local path or a bucket URL) with pickles
    refused; clear errors otherwise.

    `select`, given the archive's keys, picks the ones to read (default: all). Members are
    read one at a time from the file (in a bucket, a few MiB of the object per request),
    never all at once.
    """
    path = os.fspath(path)
    if not storage.exists(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if storage.is_dir(path):
        raise CheckpointError(f"checkpoint path {path!r} is a directory, not an .npz file")
    with storage.open_file(path, read_ahead=True) as f:
        return _read_archive(path, f, select)


def _read_archive(
    path: str, f: BinaryIO, select: Callable[[list[str]], list[str]] | None
) -> dict[str, np.ndarray]:
    magic = f.read(6)
    f.seek(0)
    if magic.startswith(_NPY_MAGIC):
        raise CheckpointError(
            f"{path!r} is a single-array .npy file, not an .npz archive of named arrays"
        )
    if not magic.startswith(_ZIP_MAGIC):
        if magic[:1] == b"\x80":
            raise CheckpointError(f"{path!r} {_PICKLE_REFUSAL}")
        raise CheckpointError(f"{path!r} is not an .npz file (no zip archive header)")
    try:
        archive = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path!r} is not a readable .npz file: {e}") from None
    arrays: dict[str, np.ndarray] = {}
    with archive:
        for key in archive.files if select is None else select(list(archive.files)):
            try:
                value = archive[key]
            except ValueError as e:
                if "pickle" in str(e).lower() or "object" in str(e).lower():
                    raise CheckpointError(f"{path!r}: array {key!r} {_PICKLE_REFUSAL}") from None
                raise CheckpointError(f"{path!r}: array {key!r} cannot be read: {e}") from None
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                raise CheckpointError(f"{path!r}: array {key!r} cannot be read: {e}") from None
            if not isinstance(value, np.ndarray):
                raise CheckpointError(f"{path!r}: member {key!r} is not a .npy array")
            if value.dtype.kind not in "fiub":
                raise CheckpointError(
                    f"{path!r}: array {key!r} has dtype {value.dtype}; expected numbers"
                )
            arrays[key] = value
    return arrays


def _weights_prefix(keys: list[str]) -> str:
    """The prefix (`params/`, `opt/target/` or none) under which a file keeps the weights."""
    return next((p for p in WEIGHT_PREFIXES if any(k.startswith(p) for k in keys)), "")


# --- position embedding ----------------------------------------------------------------------


def _model_grid(model: Any, num_tokens: int) -> tuple[tuple[int, int], int]:
    """The model's position-embedding grid (a FlexiViT's underlying one, whatever patch size
    it runs at) and its number of prefix (class) tokens in the posemb."""
    grid = getattr(model, "posemb_grid", None) or getattr(model, "grid", None)
    if grid is None:
        side = math.isqrt(num_tokens)
        prefix = num_tokens - side * side
        if prefix not in (0, 1):
            side = math.isqrt(num_tokens - 1)
            prefix = 1
        grid = (side, side)
    grid = (int(grid[0]), int(grid[1]))
    return grid, num_tokens - grid[0] * grid[1]


def _adapt_posemb(
    value: np.ndarray,
    model_shape: tuple[int, ...],
    model: Any,
    *,
    big_vision_key: bool,
    method: str,
) -> tuple[np.ndarray, str | None] | None:
    """Converts a file position embedding to the model's shape; None when it cannot."""
    if value.ndim != 3 or len(model_shape) != 3 or value.shape[::2] != model_shape[::2]:
        return None
    grid, model_prefix = _model_grid(model, model_shape[1])
    grid_tokens = grid[0] * grid[1]
    n_file = value.shape[1]
    # big_vision keeps no class slot (its posemb is added before the class token is joined).
    order = (0, 1) if big_vision_key else (model_prefix, 1 - model_prefix)
    file_prefix, old_grid = None, None
    for prefix in order:
        if n_file - prefix == grid_tokens:
            file_prefix, old_grid = prefix, grid
            break
    if file_prefix is None:
        for prefix in order:
            side = math.isqrt(max(n_file - prefix, 0))
            if side > 0 and side * side == n_file - prefix:
                file_prefix, old_grid = prefix, (side, side)
                break
    if file_prefix is None:
        return None
    note = None
    if old_grid != grid:
        value = resize_posemb(
            value, grid, num_prefix_tokens=file_prefix, old_grid=old_grid, method=method
        )
        note = f"resized {old_grid[0]}x{old_grid[1]} -> {grid[0]}x{grid[1]} ({method})"
    if file_prefix < model_prefix:
        # big_vision folded the class slot into `cls`: an all-zero slot keeps the sum.
        value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
    elif file_prefix > model_prefix:
        value = value[:, file_prefix - model_prefix :]
    return value, note


# --- the model's side ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One file array a parameter needs: the whole parameter, or one layer of a stacked one."""

    path: str
    layer: int | None
    shape: tuple[int, ...]


def _params(model: nnx.Module) -> dict[str, nnx.Variable]:
    state = nnx.state(model, nnx.Param)
    return {"/".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def _group_norm_params(model: nnx.Module) -> set[str]:
    """Paths of the GroupNorm scales and biases (the hybrid's ResNet stem)."""
    paths = set()
    for path, node in nnx.iter_graph(model):
        if isinstance(node, GroupNorm):
            prefix = "/".join(str(k) for k in path)
            paths.update(f"{prefix}/{leaf}" for leaf in ("scale", "bias"))
    return paths


def _layout_names(model: nnx.Module) -> dict[str, dict[str, str]]:
    """`model.npz_names(layout)` for every layout the model supports."""
    names = {}
    for layout in LAYOUTS:
        try:
            names[layout] = model.npz_names(layout)
        except ValueError:
            continue
    if not names:
        raise ValueError(f"{type(model).__name__} supports none of the npz layouts {LAYOUTS}")
    return names


def _slots(names: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, _Slot]:
    """File key -> slot, with scanned parameters (`{i}` in the name) split into layers."""
    slots = {}
    for path, template in names.items():
        shape = shapes[path]
        if "{i}" in template:
            for layer in range(shape[0]):
                slots[template.replace("{i}", str(layer))] = _Slot(path, layer, shape[1:])
        else:
            slots[template] = _Slot(path, None, shape)
    return slots


def _unstack(
    weights: dict[str, np.ndarray], known: set[str]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Splits stacked file arrays (`.../encoderblock/...`, leading layer axis) into per-layer
    keys (`.../encoderblock_3/...`) when the model knows such per-layer names."""
    out: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for key, value in weights.items():
        if key in known or value.ndim == 0:
            out[key] = value
            continue
        parts = key.split("/")
        for j in range(len(parts)):
            template = parts[:j] + [parts[j] + "_{n}"] + parts[j + 1 :]
            if "/".join(template).replace("{n}", "0") in known:
                for n in range(value.shape[0]):
                    layer_key = "/".join(template).replace("{n}", str(n))
                    out[layer_key] = value[n]
                    sources[layer_key] = f"{key}[{n}]"
                break
        else:
            out[key] = value
    return out, sources


# --- loading ---------------------------------------------------------------------------------


def load_npz(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    head: str = "auto",
    pre_logits: str = "auto",
    posemb_interpolation: str = "bilinear",
    strict: bool = True,
) -> LoadReport:
    """Loads a public-layout `.npz` into `model` in place and returns a `LoadReport`.

    head: 'auto' keeps the file's head when its shape fits and otherwise starts a new one
      (zero kernel, bias = the model's `head_bias_init`); 'keep' demands the file's head;
      'replace' always starts a new one; 'drop' ignores the file's head.
    pre_logits: 'auto' drops the file's layer when the model has none and loads it otherwise;
      'keep' demands it; 'drop' ignores it (a model that has one keeps its initialisation).
    posemb_interpolation: how a position embedding of another grid is resized.
    strict: raise one `CheckpointMismatchError` listing every missing, unexpected and
      mismatched key (the model is left untouched); False loads what fits and reports the rest.

    `model` may be abstract (`nnx.eval_shape(lambda: create_model(...))`), which skips the
    random initialisation of a large model; then every parameter must get a value.
    """
    if head not in HEAD_POLICIES:
        raise ValueError(f"unknown head policy {head!r}; valid: {list(HEAD_POLICIES)}")
    if pre_logits not in PRE_LOGITS_POLICIES:
        raise ValueError(f"unknown pre_logits policy {pre_logits!r}; valid: {PRE_LOGITS_POLICIES}")
    if posemb_interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"unknown posemb_interpolation {posemb_interpolation!r}; valid: {list(INTERPOLATIONS)}"
        )
    path = os.fspath(path)
    prefix, ignored = "", []

    def select(keys: list[str]) -> list[str]:
        # Only the weights are read; optimizer state and the like are listed, never loaded.
        nonlocal prefix, ignored
        prefix = _weights_prefix(keys)
        ignored = sorted(k for k in keys if not k.startswith(prefix))
        return [k for k in keys if k.startswith(prefix)]

    weights = {k[len(prefix) :]: v for k, v in read_npz(path, select).items()}

    params = _params(model)
    shapes = {p: tuple(v.get_value().shape) for p, v in params.items()}
    slots_by_layout = {
        layout: _slots(names, shapes) for layout, names in _layout_names(model).items()
    }
    known = set().union(*slots_by_layout.values())
    weights, sources = _unstack(weights, known)
    layout = max(slots_by_layout, key=lambda name: len(slots_by_layout[name].keys() & weights))
    # Each parameter slot may come under any layout's name; the detected layout's wins.
    aliases: dict[_Slot, list[str]] = {}
    for name in [layout, *(n for n in slots_by_layout if n != layout)]:
        for key, slot in slots_by_layout[name].items():
            aliases.setdefault(slot, [])
            if key not in aliases[slot]:
                aliases[slot].append(key)
    for keys in aliases.values():
        if any(k.rsplit("/", 1)[-1] == POSEMB_LEAF for k in keys):
            keys.extend(k for k in LEGACY_POSEMB_KEYS if k not in keys)

    report = LoadReport(path=path, layout=layout, prefix=prefix, ignored=ignored)
    primary = {slot: keys[0] for slot, keys in aliases.items()}
    actions = {
        "head/": _head_action(head, primary, aliases, weights),
        "pre_logits/": _pre_logits_action(pre_logits, primary),
    }
    report.head = _describe("head/", actions["head/"], primary, weights)
    report.pre_logits = _describe("pre_logits/", actions["pre_logits/"], primary, weights)

    consumed: set[str] = set()
    values: dict[_Slot, np.ndarray] = {}
    group_norm = _group_norm_params(model)
    for slot, keys in aliases.items():
        group = next((g for g in actions if keys[0].startswith(g)), None)
        if group is not None and actions[group] != "load":
            continue
        key = next((k for k in keys if k in weights), None)
        if key is None:
            report.missing.append(primary[slot])
            continue
        consumed.add(key)
        value = weights[key]
        if key.rsplit("/", 1)[-1] == POSEMB_LEAF and value.shape != slot.shape:
            adapted = _adapt_posemb(
                value,
                slot.shape,
                model,
                big_vision_key=key == POSEMB_LEAF,
                method=posemb_interpolation,
            )
            if adapted is not None:
                value, report.posemb = adapted
        if slot.path in group_norm and value.shape != slot.shape:
            # The released R+ViT files store GroupNorm scale/bias as (1, 1, 1, C).
            if value.size == math.prod(slot.shape):
                value = value.reshape(slot.shape)
        if value.shape != slot.shape:
            report.mismatched.append((sources.get(key, key), value.shape, slot.shape))
            continue
        values[slot] = value

    file_shapes = {}
    for key in sorted(set(weights) - consumed):
        group = next((g for g in actions if key.startswith(g)), None)
        if group is not None and actions[group] != "load":
            report.dropped.append(key)
        else:
            report.unexpected.append(sources.get(key, key))
            file_shapes[sources.get(key, key)] = weights[key].shape

    if strict and (report.missing or report.unexpected or report.mismatched):
        every_shape = {k: tuple(v.shape) for k, v in weights.items()}
        message = _mismatch_message(report, slots_by_layout[layout], file_shapes, every_shape, head)
        raise CheckpointMismatchError(
            message,
            missing=report.missing,
            unexpected=report.unexpected,
            mismatched=report.mismatched,
        )

    by_path: dict[str, dict[int | None, np.ndarray]] = {}
    for slot, value in values.items():
        by_path.setdefault(slot.path, {})[slot.layer] = value
    complete = {}
    for param_path, layers in by_path.items():
        if None in layers:
            complete[param_path] = layers[None]
        elif len(layers) == shapes[param_path][0]:
            complete[param_path] = np.stack([layers[n] for n in range(len(layers))])
        # else some layers are missing (strict=False): the model keeps its own values
    head_paths = {s.path for s, k in primary.items() if k.startswith("head/")}
    will_set = set(complete) | (head_paths if actions["head/"] == "replace" else set())
    abstract = sorted(
        p for p, v in params.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)
    )
    if unset := [p for p in abstract if p not in will_set]:
        raise CheckpointError(
            f"the model was built abstractly (nnx.eval_shape) and {path!r} gives no value for "
            f"{unset}; initialise the model concretely to keep its own values there"
        )
    for param_path, full in complete.items():
        _assign(params[param_path], full)
        report.loaded.append(param_path)
    if actions["head/"] == "replace":
        _reset_head(model, params, primary)
    return report


def _head_action(
    policy: str,
    primary: Mapping[_Slot, str],
    aliases: Mapping[_Slot, list[str]],
    weights: Mapping[str, np.ndarray],
) -> str:
    model_has = any(k.startswith("head/") for k in primary.values())
    if not model_has:
        return "load" if policy == "keep" else "drop"  # 'keep': the file's head is unexpected
    if policy == "auto":
        fits = all(
            any(k in weights and weights[k].shape == slot.shape for k in aliases[slot])
            for slot, key in primary.items()
            if key.startswith("head/")
        )
        return "load" if fits else "replace"
    return {"keep": "load", "replace": "replace", "drop": "drop"}[policy]


def _pre_logits_action(policy: str, primary: Mapping[_Slot, str]) -> str:
    if policy == "auto":
        return "load" if any(k.startswith("pre_logits/") for k in primary.values()) else "drop"
    return "load" if policy == "keep" else "drop"


def _describe(group: str, action: str, primary: Mapping[_Slot, str], weights) -> str:
    model_has = any(k.startswith(group) for k in primary.values())
    file_has = any(k.startswith(group) for k in weights)
    if action == "load":
        return "loaded" if model_has else "absent"
    if action == "replace":
        return "replaced"
    return "dropped" if file_has or model_has else "absent"


def _assign(var: nnx.Variable, value: np.ndarray) -> None:
    """Sets a parameter, keeping its dtype and sharding (also into an abstract model)."""
    old = var.get_value()
    new = jnp.asarray(value, dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    if sharding is not None:
        new = jax.device_put(new, sharding)
    var.set_value(new)


def _reset_head(model: nnx.Module, params: Mapping[str, nnx.Variable], primary) -> None:
    """A fresh head: zero kernel, bias filled with the model's `head_bias_init`."""
    bias_init = float(getattr(model, "head_bias_init", 0.0))
    for slot, key in primary.items():
        if key.startswith("head/"):
            var = params[slot.path]
            fill = bias_init if key.endswith("/bias") else 0.0
            _assign(var, np.full(var.get_value().shape, fill, np.float32))


def _block_counts(keys) -> dict[str, int]:
    counts: dict[str, set[int]] = {}
    for key in keys:
        match = re.match(r"^(.*?)_(\d+)/", key)
        if match and ("block" in match.group(1).lower()):
            counts.setdefault(match.group(1), set()).add(int(match.group(2)))
    return {name: len(indices) for name, indices in counts.items()}


# (what, key suffix, the part of the shape that tells it): the model dimensions a mismatch
# message names first, from the arrays both sides have under these names.
_DIMENSIONS = (
    ("width", r"(^|/)embedding/bias$", lambda s: s[-1]),
    ("patch size", r"(^|/)embedding/kernel$", lambda s: s[:2]),
    ("MLP size", r"MlpBlock[^/]*/Dense_0/bias(\[0\])?$", lambda s: s[-1]),
    ("tokens (image size / patch size)", r"pos_embedding$", lambda s: s[-2]),
    ("classes", r"^head/bias$", lambda s: s[0]),
)
_SHOWN_KEYS = 4


def _dimension(shapes: Mapping[str, tuple[int, ...]], pattern: str, part):
    key = next((k for k in sorted(shapes) if re.search(pattern, k)), None)
    return None if key is None else part(tuple(shapes[key]))


def _mismatch_message(
    report: LoadReport,
    slots: Mapping[str, _Slot],
    file_shapes: Mapping[str, tuple[int, ...]],
    every_shape: Mapping[str, tuple[int, ...]],
    head: str,
) -> str:
    """One line: which model dimensions differ first, then a few keys and a count of the
    rest, then what to set (only settings that exist)."""
    model_shapes = {k: tuple(slot.shape) for k, slot in slots.items()}
    problem_keys = report.missing + report.unexpected + [k for k, _, _ in report.mismatched]
    differences = []
    file_blocks, model_blocks = _block_counts(every_shape), _block_counts(slots)
    for name, count in model_blocks.items():
        if file_blocks.get(name, count) != count:
            differences.append(f"depth: the file has {file_blocks[name]} blocks, the model {count}")
    for what, pattern, part in _DIMENSIONS:
        in_file = _dimension(every_shape, pattern, part)
        in_model = _dimension(model_shapes, pattern, part)
        if what == "classes" and not any(k.startswith("head/") for k in problem_keys):
            continue  # a head the policy replaces is no problem
        if None not in (in_file, in_model) and in_file != in_model:
            differences.append(f"{what}: the file has {in_file}, the model {in_model}")
    problems = [f"missing {k} (model {model_shapes.get(k, '?')})" for k in report.missing]
    problems += [f"unexpected {k} (file {file_shapes[k]})" for k in report.unexpected]
    problems += [f"{k} (file {a} vs model {b})" for k, a, b in report.mismatched]
    shown = ", ".join(problems[:_SHOWN_KEYS])
    if len(problems) > _SHOWN_KEYS:
        shown += f" (+{len(problems) - _SHOWN_KEYS} more)"
    parts = differences + [f"{len(problems)} array(s) differ: {shown}"]
    if head == "keep" and any(k.startswith("head/") for k in problem_keys):
        parts.append(
            "the file's head does not fit: config.init_from.head=replace starts a new one "
            "(predict/export: --num_classes is read from the file's head by default)"
        )
    if any(k.startswith("pre_logits/") for k in problem_keys):
        parts.append(
            "pre_logits: build the model with config.model.representation_size matching "
            "the file's pre-logits layer"
        )
    file_registers = every_shape.get(REGISTERS_KEY, (1, 0, 0))
    if REGISTERS_KEY in problem_keys and len(file_registers) == 3:
        count = file_registers[1]
        parts.append(
            f"registers: the file has {count} register token(s); build the model with "
            f"config.model.num_registers={count}"
        )
    if any(k.rsplit("/", 1)[-1] == POSEMB_LEAF for k, _, _ in report.mismatched):
        parts.append(
            "position embedding: its grid could not be mapped onto the model's (only square "
            "file grids are resized; widths must agree)"
        )
    if differences:
        parts.append("choose the model the file was trained as (its name and sizes)")
    return f"checkpoint {report.path!r} ({report.layout} layout) does not fit the model: " + (
        "; ".join(parts)
    )


# --- saving ----------------------------------------------------------------------------------


def _plain(value: Any) -> np.ndarray:
    value = np.asarray(jax.device_get(value))
    plain = (np.float16, np.float32, np.float64)
    if jnp.issubdtype(value.dtype, jnp.floating) and value.dtype not in plain:
        value = value.astype(np.float32)  # bfloat16 and friends are not plain numpy dtypes
    return value


def npz_arrays(model: nnx.Module, *, layout: str = "original") -> dict[str, np.ndarray]:
    """The model's parameters as `{npz key: array}` in the given public layout.

    The original layout always has one key per layer. The big_vision layout stacks the
    blocks of a scanned model under `.../encoderblock/...` (as big_vision's scanned models
    do), keeps the position embedding without the class slot and folds that slot into `cls`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown npz layout {layout!r}; valid: {list(LAYOUTS)}")
    params = _params(model)
    arrays: dict[str, np.ndarray] = {}
    for path, template in model.npz_names(layout).items():
        value = params[path].get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            raise ValueError(f"parameter {path!r} has no value (an abstract model); load it first")
        value = _plain(value)
        if "{i}" not in template:
            arrays[template] = value
        elif layout == "big_vision" and "_{i}" in template:
            arrays[template.replace("_{i}", "")] = value
        else:
            for layer in range(value.shape[0]):
                arrays[template.replace("{i}", str(layer))] = value[layer]
    posemb = arrays.get(POSEMB_LEAF)
    if layout == "big_vision" and posemb is not None and "cls" in arrays:
        _, prefix = _model_grid(model, posemb.shape[1])
        if prefix == 1:
            arrays["cls"] = arrays["cls"] + posemb[:, :1]
            arrays[POSEMB_LEAF] = posemb[:, 1:]
    return arrays


def save_npz(model: nnx.Module, path: str | os.PathLike, *, layout: str = "original") -> None:
    """Writes the model's parameters as a public-layout `.npz` (plain float arrays) to a
    local path or a bucket URL.

    The file is written in one piece (`storage.write_with`: a temporary file renamed into
    place, or one upload), so a crash never leaves a half-written checkpoint at `path`.
    """
    write_npz(path, npz_arrays(model, layout=layout))


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically writes `{key: array}` as an uncompressed `.npz` (no pickles)."""

    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED) as archive:
            for key, value in arrays.items():
                with archive.open(f"{key}.npy", mode="w", force_zip64=True) as member:
                    np.lib.format.write_array(
                        member, np.ascontiguousarray(value), allow_pickle=False
                    )

    storage.write_with(os.fspath(path), write)
