"""Checks a config before anything is compiled, and the `--dry_run` report.

`check_config` finds what is wrong in the config itself (valid names, sizes that fit each
other, a schedule that fits the run). `check_machine` finds what does not fit this machine
(mesh against device count, batch against data-parallel devices, paths, writable workdir):
a real run stops on it, a dry run reports it as warnings. Each problem is one line naming
the config field and what to do.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import ml_collections

from vit_jax import data, distill, losses, optim, sharding, storage
from vit_jax.checkpoint.npz import HEAD_POLICIES
from vit_jax.checkpoint.posemb import INTERPOLATIONS
from vit_jax.errors import UserError
from vit_jax.experiment import PARAMETER_SETS, total_steps
from vit_jax.models.layers import REMAT_POLICIES
from vit_jax.models.registry import is_plain_vit
from vit_jax.models.vit import ATTENTION_IMPLS, POOL_TYPES, POSEMB_TYPES
from vit_jax.steps import NONFINITE_POLICIES

# float16 is not offered: it needs loss scaling, which the train step does not do.
DTYPES = ("float32", "bfloat16")
REMOTE_PREFIXES = ("gs://", "s3://", "hf://", "http://", "https://")


def _choices(config) -> list[tuple[str, Any, tuple]]:
    model = config.model
    fields = [
        ("optim.name", config.optim.name, optim.VALID_OPTIMIZERS),
        ("optim.mu_dtype", config.optim.mu_dtype, (None, *DTYPES)),
        ("schedule.decay", config.schedule.decay, optim.VALID_DECAYS),
        ("loss", config.loss, losses.VALID_LOSSES),
        ("sharding_rules", config.sharding_rules, tuple(sharding.RULE_PRESETS)),
        ("on_nonfinite", config.on_nonfinite, NONFINITE_POLICIES),
        ("init_from.head", config.init_from.head, HEAD_POLICIES),
        ("init_from.posemb_interpolation", config.init_from.posemb_interpolation, INTERPOLATIONS),
        ("init_from.params", config.init_from.get("params", "auto"), PARAMETER_SETS),
        ("distill.params", _field(config, "distill.params") or "auto", PARAMETER_SETS),
        ("model.dtype", model.get("dtype"), (None, *DTYPES)),
        ("model.param_dtype", model.get("param_dtype"), DTYPES),
    ]
    optional = [
        ("model.pool_type", POOL_TYPES),
        ("model.posemb", POSEMB_TYPES),
        ("model.remat", ("none", *REMAT_POLICIES)),
        ("model.attention_impl", ATTENTION_IMPLS),
    ]
    for field, valid in optional:
        leaf = field.split(".")[1]
        if leaf in model:
            fields.append((field, model[leaf], valid))
    return fields


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises UserError on the first inconsistency of the config itself."""
    for field, value, valid in _choices(config):
        if field.endswith("dtype") and value == "float16":
            raise UserError(
                f"config.{field}='float16' needs loss scaling, which this trainer does not "
                "do; use bfloat16 (same memory, float32's range)"
            )
        if value not in valid:
            shown = ", ".join("None" if v is None else str(v) for v in valid)
            raise UserError(f"config.{field}={value!r} is not one of: {shown}")
    param_dtype = config.model.get("param_dtype")
    if param_dtype != "float32" and not config.get("low_precision_params_ok", False):
        raise UserError(
            f"config.model.param_dtype={param_dtype!r} keeps no float32 master copy of the "
            "weights (updates below its precision are lost); use float32, or set "
            "config.low_precision_params_ok=True to accept that"
        )
    model = config.model
    size, patch = model.img_size, model.patch_size
    if size <= 0 or size % patch:
        raise UserError(
            f"config.model.img_size={size} is not a positive multiple of the patch size "
            f"{patch} of {config.model_name}; use e.g. {max(patch, size // patch * patch)}"
        )
    _check_patch_sizes(config)
    if "num_heads" in model and model.width % model.num_heads:
        raise UserError(
            f"config.model.width={model.width} is not divisible by "
            f"config.model.num_heads={model.num_heads}"
        )
    _check_positive(config, "batch_size", "eval_batch_size", "optim.grad_accum_steps")
    _check_positive(config, "log_every_steps", "eval_every_steps", "checkpoint.every_steps")
    one_device = sharding.mesh_shape({}, 1)
    for problem in sharding.batch_problems(config, one_device, evaluation=False):
        raise UserError(problem)
    if config.total_steps is None and config.num_epochs is None:
        raise UserError("set config.total_steps or config.num_epochs")
    if config.total_steps is not None and config.total_steps <= 0:
        raise UserError(f"config.total_steps={config.total_steps} must be positive")
    if config.num_epochs is not None and config.num_epochs <= 0:
        raise UserError(f"config.num_epochs={config.num_epochs} must be positive")
    if config.total_steps and config.schedule.warmup_steps > config.total_steps:
        raise UserError(
            f"config.schedule.warmup_steps={config.schedule.warmup_steps} is longer than "
            f"config.total_steps={config.total_steps}"
        )
    _check_values(config)
    optim.check_patterns(config.optim)  # lr_mults / freeze: parsed and compiled here
    _check_mesh_fields(config.mesh)
    _check_classes(config)
    _check_starting_weights(config)
    distill.check_settings(config)  # a teacher where one is needed; its files: at run time


# (field, lowest, highest, highest included): values outside train nonsense or crash later.
RANGES = (
    ("model.dropout", 0.0, 1.0, False),
    ("model.attention_dropout", 0.0, 1.0, False),
    ("model.drop_path", 0.0, 1.0, False),
    ("model.num_registers", 0, math.inf, False),
    ("label_smoothing", 0.0, 1.0, False),
    ("ema_decay", 0.0, 1.0, False),
    ("distill.weight", 0.0, 1.0, True),
    ("distill.teacher_img_size", 0, math.inf, False),
    ("schedule.end_lr", 0.0, math.inf, False),
    ("schedule.warmup_steps", 0, math.inf, False),
    ("schedule.cooldown_steps", 0, math.inf, False),
    ("optim.weight_decay", 0.0, math.inf, False),
    ("mixup.mixup_alpha", 0.0, math.inf, False),
    ("mixup.cutmix_alpha", 0.0, math.inf, False),
    ("mixup.switch_prob", 0.0, 1.0, True),
)
# Recipes that continue from pre-trained weights (config.init_from.path).
FROM_WEIGHTS_RECIPES = ("finetune", "finetune_short")


def _field(config, field: str):
    value = config
    for part in field.split("."):
        if part not in value:
            return None
        value = value[part]
    return value


def _check_values(config) -> None:
    """Numbers inside their ranges, finite; the learning rate positive."""
    for field, low, high, high_included in RANGES:
        value = _field(config, field)
        if value is None:
            continue
        inside = value <= high if high_included else value < high
        if not (math.isfinite(value) and low <= value and inside):
            bracket = "]" if high_included else ")"
            raise UserError(f"config.{field}={value} must be in [{low}, {high}{bracket}")
    base_lr = config.schedule.base_lr
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise UserError(f"config.schedule.base_lr={base_lr} must be a positive number")


def _check_starting_weights(config) -> None:
    """A fine-tuning recipe needs the weights it fine-tunes."""
    recipe = config.get("recipe")
    if recipe in FROM_WEIGHTS_RECIPES and not config.init_from.path:
        raise UserError(
            f"config.recipe={recipe} fine-tunes pre-trained weights, but config.init_from.path "
            "is empty: set it to a released .npz or a run's directory, or train from scratch "
            "on purpose with a from-scratch recipe (--config.recipe=small, pretrain or "
            "plain_baseline)"
        )


def _check_patch_sizes(config) -> None:
    """FlexiViT (config.model.patch_sizes): a plain ViT; distinct sizes that divide the image
    size, the model's own patch size (its parameters' shapes, its default size) among them."""
    sizes = tuple(config.model.get("patch_sizes") or ())
    if not sizes:
        return
    field = f"config.model.patch_sizes={sizes}"
    if not is_plain_vit(config.model_name):
        raise UserError(
            f"{field}: FlexiViT needs a plain ViT, and {config.model_name} is not one (a hybrid "
            "with a ResNet stem); choose a ViT-... model or leave config.model.patch_sizes empty"
        )
    size, own = config.model.img_size, config.model.patch_size
    for patch in sizes:
        if not isinstance(patch, int) or patch <= 0 or size % patch:
            divisors = ", ".join(str(d) for d in range(1, size + 1) if size % d == 0)
            raise UserError(
                f"{field}: {patch!r} is not a patch size of config.model.img_size={size}; "
                f"every listed size must divide it ({divisors})"
            )
    if len(set(sizes)) != len(sizes):
        raise UserError(f"{field} lists a size twice; list each once")
    if own not in sizes:
        raise UserError(
            f"{field} must include the model's own patch size {own} (config.model.patch_size): "
            "the parameters keep its shapes and it is the size the model runs at by default"
        )


def _check_positive(config, *fields: str) -> None:
    for field in fields:
        value = config
        for part in field.split("."):
            value = value[part]
        if value is not None and value <= 0:
            raise UserError(f"config.{field}={value} must be positive")


def _check_mesh_fields(mesh) -> None:
    """The mesh's sizes, whatever the device and slice counts: positive, at most one -1 among
    the DCN fields and one among the ICI axes."""
    sizes = dict(mesh.items())
    fixed = math.prod(v for v in sizes.values() if v > 0) or 1
    slices = math.prod(v for k, v in sizes.items() if k in sharding.DCN_AXES and v > 0)
    sharding.mesh_shape(sizes, fixed, slices)  # MeshError (one line): bad size, two -1s


def _check_classes(config) -> None:
    preset = data.get_data_config(config.dataset)
    known, configured = preset.num_classes, config.data.num_classes
    if known is not None and configured is not None and known != configured:
        raise UserError(
            f"config.data.num_classes={configured} but {config.dataset} has {known} classes"
        )
    if configured is not None and configured < 1:
        raise UserError(f"config.data.num_classes={configured} must be positive")


def check_machine(
    config: ml_collections.ConfigDict,
    workdir: str,
    device_count: int,
    *,
    create: bool,
    slices: int | None = None,
) -> list[str]:
    """What does not fit this machine, one line each (empty: all fits).

    `slices`: how many slices the devices form (default: this machine's, from
    `sharding.slice_groups`); the DCN fields must match it. With `create`, the workdir is
    made and a file written into it; otherwise only the nearest existing folder is checked
    for write permission. A bucket workdir is checked for real either way (a marker object
    written and deleted): its problems raise `storage.StorageError` at once, since nothing
    else can be checked without the bucket.
    """
    problems = []
    try:
        shape = sharding.mesh_shape(config.mesh, device_count, _slices(slices))
        problems += sharding.batch_problems(config, shape)
    except UserError as e:
        problems.append(str(e))
    problem = _workdir_problem(workdir, create=create)
    for field, path in _paths(config):
        if path and not _exists(path, check_buckets=create):
            problems.append(f"config.{field}={path!r} does not exist")
    if problem:
        problems.append(problem)
    return problems


def _paths(config) -> list[tuple[str, str | None]]:
    paths = [("init_from.path", config.init_from.path), ("data.data_dir", config.data.data_dir)]
    paths.append(("data.train.data_dir", config.data.train.data_dir))
    paths += [(f"data.evals.{k}.data_dir", v.data_dir) for k, v in config.data.evals.items()]
    return paths


def _exists(path: str, *, check_buckets: bool) -> bool:
    """Whether a local path exists; a bucket path is looked up only with `check_buckets`
    (other URLs, such as hf://, are left to the code that reads them)."""
    if storage.is_remote(path):
        if not check_buckets:
            return True
        try:
            return storage.exists(path)
        except Exception as error:  # noqa: BLE001 - no answer, no access: one line
            raise storage.storage_error(path, error, action="read") from error
    return path.startswith(REMOTE_PREFIXES) or os.path.exists(path)


def _workdir_problem(workdir: str, *, create: bool) -> str | None:
    if storage.is_remote(workdir):
        storage.check_writable(workdir)  # StorageError: one line naming the URL
        return None
    if workdir.startswith(REMOTE_PREFIXES):
        return f"--workdir={workdir}: only local folders and gs:// buckets hold runs"
    if create:
        try:
            os.makedirs(workdir, exist_ok=True)
            with tempfile.TemporaryFile(dir=workdir):
                pass
        except OSError as e:
            return f"--workdir={workdir} is not writable ({e.strerror}); choose another folder"
        return None
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        return f"--workdir={workdir} is not writable (at {existing}); choose another folder"
    return None


def folder_listings(config: ml_collections.ConfigDict) -> list[str]:
    """The classes and image files per split of each local image-folder dataset the config
    reads, counted by file name (nothing is opened), for `--dry_run`. Raises DataError (one
    line naming the folder) where the run would find no images: an empty class folder, a
    split without class folders, class folders that are all empty. Folders that are not on
    this machine (missing, or in a bucket) are left to the run."""
    from vit_jax.data.sources import folder

    roots: list[str] = []
    for split in [config.data.train, *config.data.evals.values()]:
        root = split.data_dir or config.data.get("data_dir") or split.name
        if split.source == "folder" and root and root not in roots:
            roots.append(root)
    lines = []
    for root in roots:
        if not storage.is_remote(root) and os.path.isdir(root):
            lines += folder.describe(root).lines()
    return lines


def check_folder_splits(config: ml_collections.ConfigDict) -> None:
    """UserError for a split of a local image folder that selects no readable image (a
    percent split of a small folder, e.g. `all[90%:]` of 4 images), before anything is
    compiled or trained; the run would otherwise find it at its first evaluation."""
    from vit_jax.data.sources import folder

    named = {"train": ("data.train", config.data.train)}
    named.update({n: (f"data.evals.{n}", s) for n, s in config.data.evals.items()})
    for name, (field, split) in named.items():
        root = split.data_dir or config.data.get("data_dir") or split.name
        if split.source != "folder" or not root or storage.is_remote(root):
            continue
        if not os.path.isdir(root):
            continue
        folder.describe(root)  # empty class folders, splits without any: their own message
        if data.num_examples(config.data, name) == 0:
            raise UserError(
                f"config.{field}.split={split.split!r} selects no readable image of {root}: "
                "add images or choose another split"
            )


def _slices(slices: int | None) -> int:
    """The slice count given, or this machine's (slices by slice_index, else processes)."""
    if slices is not None:
        return slices
    import jax

    return len(sharding.slice_groups(jax.devices()))


def run_summary(
    config: ml_collections.ConfigDict, device_count: int, slices: int | None = None
) -> dict[str, Any]:
    """Mesh (and its DCN x ICI layout), per-device and per-micro-batch sizes, steps and epochs
    of the run (`slices` as for `check_machine`)."""
    slices = _slices(slices)
    shape = sharding.mesh_shape(config.mesh, device_count, slices)
    dcn, ici = sharding.mesh_layout(config.mesh, device_count, slices)
    parallel = math.prod(shape[a] for a in sharding.BATCH_AXES)
    accum = config.optim.grad_accum_steps
    summary: dict[str, Any] = {
        "devices": device_count,
        "mesh": shape,
        "slices": math.prod(dcn.values()),
        "dcn": dcn,
        "ici": ici,
        "batch_size": config.batch_size,
        "batch_per_device": config.batch_size / parallel,
        "grad_accum_steps": accum,
        "micro_batch": config.batch_size // accum,
        "micro_batch_per_device": config.batch_size / parallel / accum,
    }
    try:
        examples = data.num_examples(config.data, "train")
    except Exception as e:  # noqa: BLE001 - the data may live on another machine
        examples, summary["train_examples_unknown"] = None, f"{type(e).__name__}: {e}"
    summary["train_examples"] = examples
    steps = total_steps(config, examples)
    summary["total_steps"] = steps
    summary["epochs"] = steps * config.batch_size / examples if steps and examples else None
    if steps and config.schedule.warmup_steps > steps:
        raise UserError(
            f"config.schedule.warmup_steps={config.schedule.warmup_steps} is longer than "
            f"the run's {steps} steps"
        )
    return summary
