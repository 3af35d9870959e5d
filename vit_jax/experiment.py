"""One run, built once: the one place a config becomes a mesh, a model and compiled steps.

An `Experiment` owns the mesh (a `-1` axis resolved once, by `sharding.mesh_shape`), the
class count, the total steps, the `StepBuilder` (model, optimizer, shardings, jitted steps),
the abstract state, the compiled train step and its FLOPs. It is made
- `from_config(config)`: a run about to train (the training loop, plan, the step benchmark);
- `from_workdir(run_dir, step)`: a trained run, its parameters restored (predict, visualize,
  export, and `init_from` of another run);
- `from_npz(path, model_name)`: a released public-layout `.npz` (predict, visualize, export).
"A run" is always its directory, the `--workdir` it was trained in (local or gs://).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vit_jax import data, sharding, storage
from vit_jax.checkpoint import Checkpointer, abstract_like, load_npz
from vit_jax.checkpoint.manager import STEP_FLAG
from vit_jax.errors import UserError
from vit_jax.steps import StepBuilder

if TYPE_CHECKING:
    from vit_jax.distill import Teacher

log = logging.getLogger("vit_jax")


def total_steps(config: ml_collections.ConfigDict, train_examples: int | None) -> int | None:
    """config.total_steps, or num_epochs over the train split's size (None while unknown)."""
    if config.total_steps:
        return int(config.total_steps)
    if config.num_epochs and train_examples:
        return max(1, math.ceil(config.num_epochs * train_examples / config.batch_size))
    return None


class Experiment:
    """The mesh, model, optimizer, shardings and steps of one run (see the module doc)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh,
        *,
        num_classes: int,
        total_steps: int,
        params: dict | None = None,
        checkpoint_step: int | None = None,
        teacher: Teacher | None = None,
    ):
        self.config = config
        self.mesh = mesh
        self.num_classes = num_classes
        self.total_steps = total_steps
        self.teacher = teacher  # config.distill: the frozen teacher on this mesh, else None
        self.steps = StepBuilder(
            config, mesh, num_classes=num_classes, total_steps=total_steps, teacher=teacher
        )
        self.params = params  # restored parameters (from_workdir, from_npz), else None
        self.checkpoint_step = checkpoint_step
        self.parameter_set = "raw"  # or "ema": a run's weight EMA (from_workdir)
        self._lowered_train_steps: dict = {}  # by patch size: compiling and FLOPs share one

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: ml_collections.ConfigDict,
        *,
        devices: list | None = None,
        num_classes: int | None = None,
        steps: int | None = None,
        slices: list | None = None,
        evaluates: bool = True,
    ) -> Experiment:
        """A run of `config` on `devices` (default: all). The class count and the total steps
        come from the data unless given (the planner gives them: it reads no data). `slices`
        (lists of devices) replaces their grouping by slice or process (the planner's
        simulated slices). `evaluates=False` leaves the eval batch unchecked (the planner
        compiles the train step only)."""
        devices = list(jax.devices() if devices is None else devices)
        groups = sharding.slice_groups(devices) if slices is None else slices
        shape = sharding.mesh_shape(config.mesh, len(devices), len(groups))
        problems = sharding.batch_problems(config, shape, evaluation=evaluates)
        if problems:
            raise UserError(problems[0])
        if num_classes is None:
            num_classes = data.num_classes(config.data)
        if steps is None:
            examples = None if config.total_steps else data.num_examples(config.data, "train")
            steps = total_steps(config, examples)
            if steps is None:
                raise UserError(
                    "config.num_epochs is set but the train split's size is unknown; "
                    "set config.total_steps instead"
                )
        mesh = sharding.make_mesh(config.mesh, devices, slices=slices)
        from vit_jax.distill import build_teacher  # distill builds on this module

        teacher = build_teacher(config, mesh, num_classes)
        return cls(config, mesh, num_classes=num_classes, total_steps=steps, teacher=teacher)

    @classmethod
    def from_workdir(
        cls, workdir: str, step: int | None = None, params: str = "auto"
    ) -> Experiment:
        """A trained run on one device with the parameters of its newest complete checkpoint
        (or of `step`); UserError naming what is missing otherwise. `params` (PARAMETER_SETS):
        "auto" takes the weight EMA where the run kept one, "ema" requires it, "raw" takes the
        trained parameters; `parameter_set` says which were taken."""
        config = read_config(workdir)
        checkpoints = open_checkpoints(workdir)
        try:
            step = pick_step(workdir, checkpoints, step)
            num_classes = _num_classes(config, checkpoints, step)
            mesh = sharding.make_mesh({}, jax.devices()[:1])
            experiment = cls(
                config, mesh, num_classes=num_classes, total_steps=1, checkpoint_step=step
            )
            which = pick_parameter_set(
                checkpoints, step, params, field="--params", where=f"the run {workdir}"
            )
            experiment.params = checkpoints.restore_params(
                experiment.abstract_params(), step, which=which
            )
            experiment.parameter_set = "ema" if which == "ema_params" else "raw"
        finally:
            checkpoints.close()
        return experiment

    @classmethod
    def from_npz(
        cls,
        path: str,
        model_name: str,
        *,
        num_classes: int,
        img_size: int = 224,
        num_registers: int = 0,
    ) -> Experiment:
        """A released public-layout `.npz` as a one-device experiment, its head kept
        (`num_registers`: the file's register tokens, 0 for none)."""
        model = {"img_size": img_size}
        if num_registers:  # a setting only ViTs have
            model["num_registers"] = num_registers
        config = ml_collections.ConfigDict(
            {"model_name": model_name, "model": model, "sharding_rules": "dp"}
        )
        mesh = sharding.make_mesh({}, jax.devices()[:1])
        experiment = cls(config, mesh, num_classes=num_classes, total_steps=1)
        model = experiment.abstract_model()
        load_npz(model, path, head="keep")
        experiment.params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return experiment

    # --- state and steps -------------------------------------------------------------------

    @property
    def abstract_state(self) -> dict:
        """The train state as shapes with shardings (nothing allocated)."""
        return self.steps.state_shardings[0]

    def abstract_params(self) -> dict:
        """The parameters as shapes with shardings, without building the optimizer (whose
        schedule needs the run's real length)."""
        state = nnx.to_pure_dict(nnx.state(self.steps.abstract_model, nnx.Param))
        return abstract_like(state, self.steps.param_shardings)

    def abstract_model(self, patch_size: int | None = None, *, plain: bool = False) -> nnx.Module:
        """The model with shapes instead of arrays and no activation-sharding constraints
        (for loading parameters into and running on one device). A FlexiViT runs at
        `patch_size` (None: its own); with `plain`, the plain ViT of that patch size."""
        overrides = dict(self.steps.model_overrides(patch_size), activation_sharding=None)
        if plain:
            overrides.update(patch_sizes=(), param_patch_size=None)
        from vit_jax.models import create_model

        return nnx.eval_shape(lambda: create_model(self.config.model_name, **overrides))

    def model(self, patch_size: int | None = None) -> nnx.Module:
        """The model holding `self.params` (from_workdir, from_npz).

        A FlexiViT (config.model.patch_sizes) comes as the plain ViT of `patch_size` (None:
        config.model.patch_size): its kernel PI-resized and its position embedding resized
        once, here, as its forward pass at that size does. So it runs without resizing,
        saves as a plain `.npz` of that patch size and exports as one."""
        if self.params is None:
            raise ValueError("this experiment has no restored parameters")
        model = _filled(self.abstract_model(patch_size), self.params)
        if not self.steps.patch_sizes:
            return model
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        kernel = params["patch_embed"]["kernel"]
        params["patch_embed"]["kernel"] = model.patch_kernel().astype(kernel.dtype)
        if model.posemb is not None:
            params["posemb"] = model.position_embedding().astype(params["posemb"].dtype)
        return _filled(self.abstract_model(patch_size, plain=True), params)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch of one train step as shapes with shardings (no mask)."""
        batch = self.abstract_eval_batch(self.config.batch_size)
        return {k: batch[k] for k in ("image", "labels")}

    def abstract_eval_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """An eval batch of `batch_size` images (with its mask) as shapes with shardings."""
        shardings, size = self.steps.batch_shardings(), self.config.data.image_size
        shapes = {
            "image": (batch_size, size, size, 3),
            "labels": (batch_size, self.num_classes),
            "mask": (batch_size,),
        }
        return {
            k: jax.ShapeDtypeStruct(shapes[k], jnp.float32, sharding=shardings[k]) for k in shapes
        }

    def abstract_train_args(self) -> tuple:
        """The train step's arguments as shapes with shardings: the state, the batch and,
        with a teacher, the teacher's parameters."""
        args = (self.abstract_state, self.abstract_batch())
        if self.teacher is not None:
            args += (self.teacher.abstract_params(),)
        return args

    def lower_train_step(self, patch_size: int | None = None):
        """The train step lowered from abstract shapes (nothing allocated), once per patch
        size: compiling it and counting its FLOPs trace the model only once."""
        if patch_size not in self._lowered_train_steps:
            step = self.steps.make_train_step(patch_size)
            self._lowered_train_steps[patch_size] = step.lower(*self.abstract_train_args())
        return self._lowered_train_steps[patch_size]

    def compile_train_step(self, patch_size: int | None = None):
        """The train step compiled ahead of time from abstract shapes; a FlexiViT's at
        `patch_size` (None: config.model.patch_size)."""
        return self.lower_train_step(patch_size).compile()

    def compile_train_steps(self) -> dict:
        """The run's compiled train steps by patch size: one per size of a FlexiViT
        (config.model.patch_sizes), each compiled once; `{None: step}` for other models."""
        return {size: self.compile_train_step(size) for size in self.steps.patch_sizes or (None,)}

    def patch_size_at(self, step: int) -> int | None:
        """The key in `compile_train_steps()` of train step `step`: a FlexiViT's patch size,
        drawn from (config.seed, step) alone (`flexi.patch_size_at`); None otherwise."""
        if not self.steps.patch_sizes:
            return None
        from vit_jax.models import flexi

        return flexi.patch_size_at(self.steps.patch_sizes, int(self.config.seed), step)

    def step_flops(self, *, patch_size: int | None = None) -> float | None:
        """FLOPs of one train step for the global batch, from XLA's analysis of the program
        before partitioning (the lowering `compile_train_step` uses, so no second trace). A
        scanned model is counted as `_counted` says. A FlexiViT's count is the mean over its
        patch sizes (each is drawn equally often), or that of `patch_size`."""
        sizes = self.steps.patch_sizes
        if sizes and patch_size is None:
            counts = [self.step_flops(patch_size=p) for p in sizes]
            return None if None in counts else sum(counts) / len(counts)
        return self._counted(lambda run: lowered_flops(run.lower_train_step(patch_size)))

    def eval_flops(self, batch_size: int, *, patch_size: int | None = None) -> float | None:
        """FLOPs of one eval step on `batch_size` images (a FlexiViT's at `patch_size`),
        counted before partitioning as `step_flops` counts."""

        def count(run: Experiment) -> float | None:
            step = run.steps.make_eval_step(patch_size)
            batch = run.abstract_eval_batch(batch_size)
            return lowered_flops(step.lower(run.abstract_state["params"], batch))

        return self._counted(count)

    def _counted(self, count: Callable[[Experiment], float | None]) -> float | None:
        """`count(experiment)` for this model. XLA counts a loop body once, so a scanned
        model is counted through unrolled twins (lowered, never compiled) at depth 1 and 2
        and extrapolated: its blocks are identical, so the cost is linear in depth, and
        lowering a 48-block model unrolled takes minutes."""
        model = self.config.model
        if not model.get("scan"):
            return count(self)
        depth = model.get("depth") or 0
        if depth <= 2:
            return count(self._twin(scan=False))
        one, two = (count(self._twin(scan=False, depth=d)) for d in (1, 2))
        if one is None or two is None:
            return None
        return one + (depth - 1) * (two - one)

    def _twin(self, **model_fields) -> Experiment:
        config = ml_collections.ConfigDict(self.config.to_dict())
        config.model.update(model_fields)
        return Experiment(
            config,
            self.mesh,
            num_classes=self.num_classes,
            total_steps=self.total_steps,
            teacher=self.teacher,
        )

    def init_state(self, params: dict | None = None) -> dict:
        """A fresh sharded train state; `params` replaces the random initialisation."""
        return self.steps.init_state(params)

    # --- parameters from elsewhere (config.init_from) --------------------------------------

    def initial_params(self) -> dict | None:
        """Parameters from config.init_from.path: a released `.npz` or another run's
        directory (local or gs://); None for a random initialisation."""
        init = self.config.init_from
        path = init.path
        if not path:
            return None
        if path.endswith(".npz"):
            # An abstract model: the file provides the values, nothing is randomly initialised.
            model = nnx.eval_shape(lambda: self.steps.build_model(self.config.seed))
            report = load_npz(
                model, path, head=init.head, posemb_interpolation=init.posemb_interpolation
            )
            log.info("initialised from %s: %s", path, report)
            return nnx.to_pure_dict(nnx.state(model, nnx.Param))
        check_run_directory(path, "config.init_from.path")
        source = open_checkpoints(path, "config.init_from.path")
        try:
            step = source.latest_step()
            if step is None:
                raise UserError(f"config.init_from.path {path}: no complete checkpoint yet")
            which = pick_parameter_set(
                source,
                step,
                init.get("params", "auto"),
                field="config.init_from.params",
                where=f"the run {path}",
                continue_with=None,
            )
            params = source.restore_params(
                self.abstract_state["params"], step, continue_with=None, which=which
            )
        finally:
            source.close()
        used = "its weight EMA" if which == "ema_params" else "its trained parameters"
        log.info("initialised from the run %s, step %d: %s", path, step, used)
        return params


# --- a run's directory ---------------------------------------------------------------------


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config as the trainer saved it in `config.json` (a folder or a bucket URL)."""
    path = storage.join(workdir, "config.json")
    check_run_directory(workdir, "--workdir")
    text = storage.read_text(path)
    try:
        return ml_collections.ConfigDict(json.loads(text))
    except ValueError as e:
        raise UserError(f"{path}: not a readable config ({e})") from None


CLASS_NAMES_FILE = "class_names.json"  # next to config.json: the names, or null


def read_class_names(workdir: str) -> tuple[bool, tuple[str, ...] | None]:
    """(whether the run saved its class names, the names): `class_names.json`, written by
    the trainer when the run started (`null` where the data has none). A run trained before
    that, or whose file cannot be read, gives (False, None)."""
    path = storage.join(workdir, CLASS_NAMES_FILE)
    try:
        if not storage.is_file(path):
            return False, None
        names = json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return False, None
    if names is None:
        return True, None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return False, None
    return True, tuple(names)


def check_run_directory(path: str, name: str) -> None:
    """UserError unless `path` is a training run's directory (it holds `config.json`)."""
    storage.check_reachable(path)
    if not storage.is_dir(path):
        what = storage.missing(path)
        if what == "no such file or folder":
            what = "no such directory"
        raise UserError(f"{name} {path}: {what}; give a training run's directory")
    if not storage.is_file(storage.join(path, "config.json")):
        parent = storage.dirname(path.rstrip("/"))
        if storage.basename(path.rstrip("/")) == "checkpoints" and storage.is_file(
            storage.join(parent, "config.json")
        ):
            raise UserError(f"{name} {path}: give the run's directory, {parent}")
        raise UserError(
            f"{name} {path}: no config.json, so not a training run's directory "
            "(`python -m vit_jax train --workdir=...` writes it)"
        )


def open_checkpoints(workdir: str, name: str = "--workdir") -> Checkpointer:
    """The run's checkpoints, read-only (`name`: the flag or field that gave the run)."""
    directory = storage.join(workdir, "checkpoints")
    if not storage.is_dir(directory):
        raise UserError(f"{name} {workdir}: no checkpoints yet; train first")
    return Checkpointer(directory, every_steps=1, read_only=True)


def pick_step(workdir: str, checkpoints: Checkpointer, step: int | None) -> int:
    """`step` if the run has a complete checkpoint there, else the newest one."""
    steps = checkpoints.all_steps()
    if not steps:
        raise UserError(f"--workdir {workdir}: no complete checkpoint yet; train longer")
    if step is not None and step not in steps:
        raise UserError(f"--step {step}: {workdir} has checkpoints at steps {steps}")
    return max(steps) if step is None else step


def _filled(model: nnx.Module, params: dict) -> nnx.Module:
    """`model` (abstract) holding `params` (a pure dict)."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def pick_patch_size(
    config: ml_collections.ConfigDict, requested: int | None, *, flag: str, where: str
) -> int:
    """The patch size to run a trained model at: `requested` (given by `flag`), one of a
    FlexiViT's config.model.patch_sizes, or the model's own patch size (the default; the
    only one of a model that is not a FlexiViT); UserError otherwise. `where` names the run."""
    own = int(config.model.patch_size)
    sizes = tuple(int(p) for p in config.model.get("patch_sizes") or ())
    if requested is None or requested in (sizes or (own,)):
        return own if requested is None else int(requested)
    if sizes:
        raise UserError(
            f"{flag} {requested}: {where} was trained at patch sizes "
            f"{', '.join(map(str, sizes))} (config.model.patch_sizes); give one of them"
        )
    raise UserError(
        f"{flag} {requested}: {where} is not a FlexiViT (its config.model.patch_sizes is "
        f"empty) and runs at its patch size {own} only"
    )


PARAMETER_SETS = ("auto", "ema", "raw")  # which parameters of a run with a weight EMA


def pick_parameter_set(
    checkpoints: Checkpointer,
    step: int,
    params: str,
    *,
    field: str,
    where: str,
    continue_with: str | None = STEP_FLAG,
) -> str:
    """The saved tree to restore: "ema_params" for `params` "ema", or "auto" where the run
    kept a weight EMA (config.ema_decay); "params" otherwise. `field` names the setting that
    gave `params` (`--params`), `where` the run, in errors."""
    if params not in PARAMETER_SETS:
        raise UserError(f"{field}={params!r} is not one of {', '.join(PARAMETER_SETS)}")
    has_ema = "ema_params" in checkpoints.parameter_sets(step, continue_with)
    if params == "ema" and not has_ema:
        raise UserError(
            f"{field}=ema: {where} kept no weight EMA (its config.ema_decay is 0); use "
            f"{field}=raw for its trained parameters"
        )
    return "ema_params" if has_ema and params != "raw" else "params"


def _num_classes(config: ml_collections.ConfigDict, checkpoints: Checkpointer, step: int) -> int:
    """From the data config, else (the dataset is gone) from the checkpoint's head shape
    (DamagedCheckpointError where that step cannot be read)."""
    try:
        return data.num_classes(config.data)
    except (data.DataError, OSError):
        reason = checkpoints.damage(step)
        if reason is not None:
            raise checkpoints.damaged_error(step, reason, STEP_FLAG) from None
        import orbax.checkpoint as ocp

        path = storage.as_path(storage.join(checkpoints.directory, str(step), "state"))
        tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
        return int(tree["params"]["head"]["bias"].shape[0])


def lowered_flops(lowered) -> float | None:
    """XLA's FLOPs of a lowered or compiled program (None where the backend has no count)."""
    try:
        analysis = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None
