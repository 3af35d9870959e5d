"""Device mesh and logical-axis rules -> shardings for parameters, optimizer state and batches.

The mesh always has the axes `data`, `fsdp` and `model` (size 1 where unused). Models label
every parameter dimension with a logical name; a rule table maps those names to mesh axes.
A dimension whose size the mesh axes do not divide stays replicated, so any model fits any
mesh (e.g. 10 classes on a model axis of 4).

Several slices (TPU slices joined by the data-center network, DCN; or GPU/CPU hosts) add the
config fields `dcn_data` and `dcn_fsdp`: the mesh keeps its three axes, and `data` is
dcn_data x data, `fsdp` dcn_fsdp x fsdp, each axis's outer (slower) part running across
slices (jax's `create_hybrid_device_mesh`). Every rule keeps working; with dcn_fsdp=1 the
`fsdp` collectives stay inside a slice and only the data-parallel gradient sum crosses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils

from vit_jax.errors import UserError
from vit_jax.models.layers import ActivationSharding

MESH_AXES = ("data", "fsdp", "model")
# config.mesh fields for the slices (DCN), each the outer part of one mesh axis.
DCN_AXES = {"dcn_data": "data", "dcn_fsdp": "fsdp"}
BATCH_AXES = ("data", "fsdp")

_ACTIVATIONS = (("batch", BATCH_AXES), ("tokens", None))
RULE_PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    # Parameters replicated; the batch split over every data-like axis.
    "dp": _ACTIVATIONS,
    # Parameters and optimizer state sharded along their `embed` dimension over `fsdp`.
    "fsdp": _ACTIVATIONS + (("embed", "fsdp"),),
    # Attention heads, MLP hidden units and the pre-logits layer's units split over `model`
    # (Megatron-style), so a large head behind a representation layer is split too.
    "tp": _ACTIVATIONS + (("heads", "model"), ("mlp", "model"), ("representation", "model")),
    "fsdp_tp": _ACTIVATIONS
    + (("embed", "fsdp"), ("heads", "model"), ("mlp", "model"), ("representation", "model")),
}


class MeshError(UserError, ValueError):
    """config.mesh does not fit the devices."""


def mesh_layout(
    shape: Mapping[str, int], device_count: int, slices: int = 1
) -> tuple[dict[str, int], dict[str, int]]:
    """(DCN sizes, ICI sizes) of config.mesh on `device_count` devices in `slices` slices:
    missing fields are 1; one DCN field may be -1 (the remaining slices) and one ICI axis
    (the remaining devices of a slice). DCN sizes of product 1 lay one mesh over all devices;
    otherwise their product must be the slice count. The one place a -1 is resolved (through
    `mesh_shape`); MeshError (one line, naming the fields) if none fit."""
    valid = (*DCN_AXES, *MESH_AXES)
    unknown = sorted(set(shape) - set(valid))
    if unknown:
        raise MeshError(f"config.mesh has unknown axes {unknown}; valid axes: {list(valid)}")
    dcn = {name: int(shape.get(name, 1)) for name in DCN_AXES}
    sizes = {name: int(shape.get(name, 1)) for name in MESH_AXES}
    for axis, value in {**dcn, **sizes}.items():
        if value != -1 and value < 1:
            raise MeshError(f"config.mesh.{axis}={value} must be a positive size or -1")
    for group in (dcn, sizes):
        if list(group.values()).count(-1) > 1:
            kind = "DCN field" if group is dcn else "axis"
            raise MeshError(
                f"config.mesh: at most one {kind} ({', '.join(group)}) may be -1 (the rest), "
                f"got {dict(shape)}"
            )
    fixed_dcn = math.prod(v for v in dcn.values() if v != -1)
    free_dcn = [axis for axis, value in dcn.items() if value == -1]
    if free_dcn:
        if slices % fixed_dcn:
            raise MeshError(
                f"config.mesh {dcn} needs a multiple of {fixed_dcn} slices; the devices form "
                f"{slices} slice(s) (distinct slice_index, or processes where devices have none)"
            )
        dcn[free_dcn[0]] = slices // fixed_dcn
    across = math.prod(dcn.values())
    if across > 1 and across != slices:
        fields = " x ".join(f"config.mesh.{k}={v}" for k, v in dcn.items())
        raise MeshError(
            f"{fields} needs {across} slices but the devices form {slices} (distinct "
            "slice_index, or processes where devices have none); set them to the slice count"
        )
    if device_count % across:
        raise MeshError(f"{device_count} devices do not split into {across} equal slices")
    per_slice = device_count // across
    fixed = math.prod(v for v in sizes.values() if v != -1)
    free = [axis for axis, value in sizes.items() if value == -1]
    where = "" if across == 1 else " per slice"
    if free:
        if per_slice % fixed:
            raise MeshError(
                f"config.mesh {dict(shape)} needs a multiple of {fixed} devices{where}; "
                f"{per_slice} are available{where}"
            )
        sizes[free[0]] = per_slice // fixed
    elif fixed != per_slice:
        raise MeshError(
            f"config.mesh {sizes} needs {fixed} devices{where} but {per_slice} are "
            f"available{where}; set one axis to -1 to use the rest"
        )
    return dcn, sizes


def mesh_shape(shape: Mapping[str, int], device_count: int, slices: int = 1) -> dict[str, int]:
    """Every mesh axis's size on `device_count` devices in `slices` slices: DCN x ICI part
    (`data` = dcn_data x data, `fsdp` = dcn_fsdp x fsdp), resolved by `mesh_layout`."""
    dcn, ici = mesh_layout(shape, device_count, slices)
    outer = {axis: dcn[field] for field, axis in DCN_AXES.items()}
    return {axis: outer.get(axis, 1) * size for axis, size in ici.items()}


def _by_slice_index(devices: Sequence) -> bool:
    """Whether TPU slices group these devices; else processes do (CPU and GPU hosts, whose
    devices report slice_index 0 in a multi-process run)."""
    return all(d.platform == "tpu" and getattr(d, "slice_index", None) is not None for d in devices)


def slice_groups(devices: Sequence) -> list[list]:
    """`devices` grouped by slice: by `slice_index` on TPUs, else by process (CPU and GPU
    hosts), in index order."""
    key = "slice_index" if _by_slice_index(devices) else "process_index"
    groups: dict[int, list] = {}
    for device in devices:
        groups.setdefault(getattr(device, key), []).append(device)
    return [groups[k] for k in sorted(groups)]


def batch_problems(config, shape: Mapping[str, int], *, evaluation: bool = True) -> list[str]:
    """The batch sizes (train, and eval with `evaluation`) against the data-parallel devices
    (data x fsdp) of a mesh shape and the gradient accumulation: one line per problem."""
    parallel = math.prod(shape[a] for a in BATCH_AXES)
    accum = config.optim.grad_accum_steps
    problems = []
    if config.batch_size % (parallel * accum):
        problems.append(
            f"config.batch_size={config.batch_size} is not divisible by the {parallel} "
            f"data-parallel devices x config.optim.grad_accum_steps={accum}"
        )
    if evaluation and config.eval_batch_size % parallel:
        problems.append(
            f"config.eval_batch_size={config.eval_batch_size} is not divisible by the "
            f"{parallel} data-parallel devices"
        )
    return problems


def make_mesh(
    shape: Mapping[str, int], devices: list | None = None, *, slices: Sequence | None = None
) -> jax.sharding.Mesh:
    """A mesh with axes (data, fsdp, model) over `devices` (default: all), sized by
    `mesh_layout`. With DCN fields > 1 the device grid comes from jax's
    `create_hybrid_device_mesh` (ICI shape inside each slice, DCN shape across): each axis's
    outer part runs across slices. `slices` (lists of devices) replaces the grouping by
    `slice_index` or process, e.g. to treat groups of one process's CPU devices as slices."""
    devices = list(jax.devices() if devices is None else devices)
    groups = slice_groups(devices) if slices is None else [list(group) for group in slices]
    if sorted(d.id for group in groups for d in group) != sorted(d.id for d in devices):
        raise ValueError("make_mesh: `slices` must split `devices` into groups")
    dcn, ici = mesh_layout(shape, len(devices), len(groups))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if math.prod(dcn.values()) > 1:
        outer = {axis: dcn[field] for field, axis in DCN_AXES.items()}
        ici_shape = [ici[axis] for axis in MESH_AXES]
        dcn_shape = [outer.get(axis, 1) for axis in MESH_AXES]
        if slices is None:
            grid = mesh_utils.create_hybrid_device_mesh(
                ici_shape, dcn_shape, devices, process_is_granule=not _by_slice_index(devices)
            )
        else:  # the same builder, each device labelled with the slice it was given in
            labelled = [_InSlice(d, i) for i, group in enumerate(groups) for d in group]
            grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, labelled)
            grid = np.vectorize(lambda d: d.device, otypes=[object])(grid)
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)
    sizes = tuple(ici.values())
    if devices == list(jax.devices()):
        return jax.make_mesh(sizes, MESH_AXES, axis_types=auto)
    grid = np.asarray(devices).reshape(sizes)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


class _InSlice:
    """A device seen as a member of slice `slice_index` (for `make_mesh(slices=...)`)."""

    def __init__(self, device, slice_index: int):
        self.device, self.slice_index = device, slice_index

    def __getattr__(self, name):
        return getattr(self.device, name)


def get_rules(name: str) -> tuple[tuple[str, Any], ...]:
    """The rule table preset `name` ('dp', 'fsdp', 'tp', 'fsdp_tp')."""
    if name not in RULE_PRESETS:
        raise ValueError(f"unknown sharding rules {name!r}; valid: {sorted(RULE_PRESETS)}")
    return RULE_PRESETS[name]


def logical_to_spec(
    logical_axes: tuple[str | None, ...] | None,
    shape: tuple[int, ...],
    mesh: jax.sharding.Mesh,
    rules: tuple[tuple[str, Any], ...],
) -> jax.sharding.PartitionSpec:
    """PartitionSpec for an array with these logical axes; indivisible dims stay replicated."""
    if not logical_axes:
        return jax.sharding.PartitionSpec()
    spec = ActivationSharding(mesh, rules).spec(tuple(logical_axes))
    fitted = []
    for size, entry in zip(shape, spec, strict=True):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        split = math.prod(mesh.shape[n] for n in names)
        fitted.append(entry if names and size % split == 0 else None)
    return jax.sharding.PartitionSpec(*fitted)


def param_shardings(abstract_params: nnx.State, mesh, rules) -> dict:
    """NamedShardings (as a pure dict) for a Param state carrying `logical_axes` metadata."""

    def one(variable):
        axes = variable.get_metadata().get("logical_axes")
        spec = logical_to_spec(axes, variable.shape, mesh, rules)
        return jax.sharding.NamedSharding(mesh, spec)

    shardings = jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def optimizer_shardings(
    tx: optax.GradientTransformation, abstract_opt_state, params_sharding, mesh
):
    """Optimizer-state shardings: moments follow their parameter, everything else replicated."""
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_opt_state,
        params_sharding,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> jax.sharding.NamedSharding:
    """Leading (batch) dim split over the data-like axes, the rest replicated."""
    spec = jax.sharding.PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))
    return jax.sharding.NamedSharding(mesh, spec)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)
