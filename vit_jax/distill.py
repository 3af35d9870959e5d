"""Knowledge distillation (`config.distill`): the frozen teacher a run learns from.

With `config.distill.weight` w > 0 the train step runs the teacher on exactly the batch the
student sees (after mixup or cutmix, the same crop: "function matching", Beyer et al. 2022)
and trains on `(1 - w) * label loss + w * T^2 * KL(softmax(teacher / T) || softmax(student
/ T))` (`losses.distilled_loss`). The teacher is a training run's directory (its newest
complete checkpoint; its weight EMA where it kept one, `config.distill.params`) or a
public-layout `.npz` (`config.distill.teacher_model`, `teacher_img_size`). It is built on
the student's mesh with the student's sharding rules, in its own dtype, and its parameters
are an argument of the compiled step, never part of the train state: a resumed run loads
them again from the same source. Its input is resized (bilinear) where its image size
differs from the student's. With w = 0 nothing here is used: the run and its compiled
program are those of a run without distillation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import jax
import ml_collections
from flax import nnx

from vit_jax import data, storage
from vit_jax.checkpoint import load_npz
from vit_jax.checkpoint.npz import REGISTERS_KEY, read_npz
from vit_jax.errors import UserError
from vit_jax.experiment import (
    Experiment,
    check_run_directory,
    open_checkpoints,
    pick_parameter_set,
    read_config,
)
from vit_jax.experiment import _num_classes as run_num_classes

log = logging.getLogger("vit_jax")

FIELD = "config.distill.teacher"
DISTILL_RECIPES = ("distill",)  # recipes that learn from a teacher (config.recipe)


def weight(config: ml_collections.ConfigDict) -> float:
    """config.distill.weight: 0 (no teacher: the run as without distillation) up to 1."""
    group = config.get("distill")
    return float(group.weight) if group is not None else 0.0


def check_settings(config: ml_collections.ConfigDict) -> None:
    """UserError for settings that cannot work, whatever the files hold (a teacher needed
    and not given, a temperature that is not positive, an `.npz` without its model name)."""
    group = config.get("distill")
    if group is None:
        return
    temperature = group.temperature
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"config.distill.temperature={temperature} must be a positive number")
    recipe = config.get("recipe")
    if not group.teacher and (recipe in DISTILL_RECIPES or group.weight > 0):
        why = (
            f"config.recipe={recipe} distils from a teacher"
            if recipe in DISTILL_RECIPES
            else f"config.distill.weight={group.weight:g} distils from a teacher"
        )
        raise UserError(
            f"{why}, but {FIELD} is empty: set it to a training run's directory or a "
            "released .npz (with config.distill.teacher_model)"
            + ("" if recipe in DISTILL_RECIPES else ", or set config.distill.weight=0")
        )
    if is_npz(group.teacher) and not group.teacher_model:
        raise UserError(
            f"{FIELD}={group.teacher}: an .npz needs config.distill.teacher_model, the zoo "
            "name it was trained as (e.g. ViT-B/16)"
        )
    if group.teacher_model:
        from vit_jax.models import list_models

        if group.teacher_model not in list_models():
            raise UserError(
                f"config.distill.teacher_model={group.teacher_model!r} is not a zoo model "
                "(python -c 'from vit_jax import models; print(models.list_models())')"
            )


def is_npz(path: str) -> bool:
    return path.endswith(".npz")


@dataclasses.dataclass(frozen=True)
class TeacherInfo:
    """What the teacher is, read without its weights (for the checks and the dry run)."""

    path: str
    model_name: str
    img_size: int
    num_classes: int
    config: ml_collections.ConfigDict  # its model: a run's config.json, or built for an .npz
    step: int | None = None  # a run's newest complete checkpoint
    parameter_set: str = "npz"  # a run's "ema" or "raw" parameters

    def description(self) -> str:
        if self.step is None:
            return f"{self.path} ({self.model_name} at {self.img_size} px, a released .npz)"
        which = "its weight EMA" if self.parameter_set == "ema" else "its trained parameters"
        return (
            f"{self.path} ({self.model_name} at {self.img_size} px, a run: step {self.step}, "
            f"{which})"
        )


def describe(config: ml_collections.ConfigDict, num_classes: int | None = None) -> TeacherInfo:
    """The teacher of `config` as its files describe it; UserError naming
    config.distill.teacher where it is missing, not a run, has no checkpoint or predicts
    another number of classes than the student's `num_classes` (unchecked when None)."""
    group = config.distill
    path = group.teacher
    info = _describe_npz(config) if is_npz(path) else _describe_run(config)
    if num_classes is not None and info.num_classes != num_classes:
        raise UserError(
            f"{FIELD} {path} predicts {info.num_classes} classes but the student "
            f"{num_classes} (config.data.num_classes of config.dataset={config.dataset}); "
            "distil from a teacher of the same classes"
        )
    return info


def _describe_run(config: ml_collections.ConfigDict) -> TeacherInfo:
    group, path = config.distill, config.distill.teacher
    check_run_directory(path, FIELD)
    teacher_config = read_config(path)
    checkpoints = open_checkpoints(path, FIELD)
    try:
        step = checkpoints.latest_step()
        if step is None:
            raise UserError(f"{FIELD} {path}: no complete checkpoint yet; train it first")
        which = pick_parameter_set(
            checkpoints,
            step,
            group.params,
            field="config.distill.params",
            where=f"the teacher run {path}",
            continue_with=None,
        )
        classes = run_num_classes(teacher_config, checkpoints, step)
    finally:
        checkpoints.close()
    model_name, size = teacher_config.model_name, int(teacher_config.model.img_size)
    if group.teacher_model and group.teacher_model != model_name:
        raise UserError(
            f"config.distill.teacher_model={group.teacher_model} but the teacher run {path} "
            f"trained {model_name}; leave it empty for a run (it is for an .npz teacher)"
        )
    if group.teacher_img_size and group.teacher_img_size != size:
        raise UserError(
            f"config.distill.teacher_img_size={group.teacher_img_size} but the teacher run "
            f"{path} trained at {size} px; leave it at 0 for a run (it is for an .npz teacher)"
        )
    return TeacherInfo(
        path=path,
        model_name=model_name,
        img_size=size,
        num_classes=classes,
        config=teacher_config,
        step=step,
        parameter_set="ema" if which == "ema_params" else "raw",
    )


def _describe_npz(config: ml_collections.ConfigDict) -> TeacherInfo:
    group, path = config.distill, config.distill.teacher
    storage.check_reachable(path)
    if not storage.is_file(path):
        raise UserError(f"{FIELD} {path}: {storage.missing(path)}")

    def heads(keys: list[str]) -> list[str]:
        return [k for k in keys if k.endswith("head/bias") or k.endswith(REGISTERS_KEY)]

    try:
        arrays = read_npz(path, heads)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a bucket's failures become one line too
        raise UserError(f"{FIELD} {path}: cannot read it ({type(e).__name__}: {e})") from None
    head = [v.shape for k, v in arrays.items() if k.endswith("head/bias")]
    if not head:
        raise UserError(f"{FIELD} {path}: the file has no classifier head to distil from")
    registers = [v.shape for k, v in arrays.items() if k.rsplit("/", 1)[-1] == REGISTERS_KEY]
    size = int(group.teacher_img_size or config.model.img_size)
    model = {"img_size": size}
    if registers and len(registers[0]) == 3:  # a setting only ViTs have
        model["num_registers"] = int(registers[0][1])
    teacher_config = ml_collections.ConfigDict(
        {"model_name": group.teacher_model, "model": model, "sharding_rules": "dp"}
    )
    return TeacherInfo(
        path=path,
        model_name=group.teacher_model,
        img_size=size,
        num_classes=int(head[0][0]),
        config=teacher_config,
    )


class Teacher:
    """The teacher on the student's mesh: its model (graphdef), its parameters' shardings
    under the student's sharding rules, and how the train step uses it."""

    def __init__(self, info: TeacherInfo, config: ml_collections.ConfigDict, mesh):
        teacher_config = ml_collections.ConfigDict(info.config.to_dict())
        teacher_config.sharding_rules = config.sharding_rules
        self.info = info
        self.img_size = info.img_size
        self.weight = float(config.distill.weight)
        self.temperature = float(config.distill.temperature)
        self.experiment = Experiment(
            teacher_config, mesh, num_classes=info.num_classes, total_steps=1
        )
        self._params = None  # loaded by the first `bind`

    @property
    def graphdef(self) -> nnx.GraphDef:
        return self.experiment.steps.graphdef

    @property
    def param_shardings(self) -> dict:
        return self.experiment.steps.param_shardings

    def abstract_params(self) -> dict:
        """The parameters as shapes with their shardings (nothing allocated)."""
        return self.experiment.abstract_params()

    def load_params(self) -> dict:
        """The teacher's parameters, read from its source onto their shardings."""
        info = self.info
        if info.step is None:
            model = self.experiment.abstract_model()
            report = load_npz(model, info.path, head="keep")
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            params = jax.device_put(jax.device_get(params), self.param_shardings)
            log.info("distilling from %s: %s", info.path, report)
            return params
        checkpoints = open_checkpoints(info.path, FIELD)
        try:
            which = "ema_params" if info.parameter_set == "ema" else "params"
            params = checkpoints.restore_params(
                self.abstract_params(), info.step, continue_with=None, which=which
            )
        finally:
            checkpoints.close()
        log.info("distilling from %s", info.description())
        return params

    def bind(self, train_step: Callable) -> Callable:
        """`train_step(state, batch)` of a step compiled with the teacher's parameters as its
        third argument. The parameters are loaded on the first call and shared by every step
        bound (a FlexiViT has one per patch size)."""
        if self._params is None:
            self._params = self.load_params()
        params = self._params
        return lambda state, batch: train_step(state, batch, params)


def build_teacher(config: ml_collections.ConfigDict, mesh, num_classes: int) -> Teacher | None:
    """The run's teacher on `mesh` (None with config.distill.weight 0); UserError where the
    teacher cannot be used (see `describe`)."""
    if not weight(config):
        return None
    check_settings(config)
    return Teacher(describe(config, num_classes), config, mesh)


def check_teacher(config: ml_collections.ConfigDict) -> None:
    """Before the workdir is created: UserError where the teacher cannot be used."""
    if weight(config):
        describe(config, _student_classes(config))


def _student_classes(config: ml_collections.ConfigDict) -> int | None:
    try:
        return data.num_classes(config.data)
    except Exception:  # noqa: BLE001 - data on another machine: the run checks it later
        return None


def dry_run_lines(config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """(report lines, warnings) for `--dry_run`: the teacher, its model and image size, the
    weight and temperature. A teacher that is not on this machine is a warning (the run
    refuses it); one that is there but cannot be used is refused here too."""
    group = config.get("distill")
    if group is None or not (group.weight or group.teacher):
        return [], []
    if not group.weight:
        return [], [f"{FIELD}={group.teacher} is not used: config.distill.weight is 0"]
    mix = f"weight {group.weight:g} (labels {1 - group.weight:g})"
    mix += f", temperature {group.temperature:g}"
    path, student_size = group.teacher, config.model.img_size
    if not is_npz(path) and not storage.is_remote(path) and not storage.exists(path):
        line = f"distillation: teacher {path} (not on this machine: model unknown here), {mix}"
        return [line], [f"{FIELD}={path!r} does not exist"]
    if is_npz(path) and not storage.is_remote(path) and not storage.exists(path):
        size = group.teacher_img_size or student_size
        line = f"distillation: teacher {path} ({group.teacher_model} at {size} px), {mix}"
        return [_resized(line, size, student_size)], [f"{FIELD}={path!r} does not exist"]
    info = describe(config, _student_classes(config))
    line = f"distillation: teacher {info.description()}, {mix}"
    return [_resized(line, info.img_size, student_size)], []


def _resized(line: str, teacher_size: int, student_size: int) -> str:
    if teacher_size == student_size:
        return line + "; the teacher sees the student's augmented batch"
    return (
        line + f"; the teacher sees the student's augmented batch resized {student_size} -> "
        f"{teacher_size} px (bilinear)"
    )
