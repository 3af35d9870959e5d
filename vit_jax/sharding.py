"""Device mesh and logical-axis rules -> shardings for parameters, optimizer state and batches.

The mesh always has the axes `data`, `fsdp` and `model` (size 1 where unused). Models label
every parameter dimension with a logical name; a rule table maps those names to mesh axes.
A dimension whose size the mesh axes do not divide stays replicated, so any model fits any
mesh (e.g. 10 classes on a model axis of 4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from vit_jax.errors import UserError
from vit_jax.models.layers import ActivationSharding

MESH_AXES = ("data", "fsdp", "model")
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


def mesh_shape(shape: Mapping[str, int], device_count: int) -> dict[str, int]:
    """Every mesh axis's size on `device_count` devices: missing axes are 1, one axis may be
    -1 (the rest). The one place a -1 is resolved; MeshError (one line) if none fit."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"config.mesh has unknown axes {unknown}; valid axes: {list(MESH_AXES)}")
    sizes = {name: int(shape.get(name, 1)) for name in MESH_AXES}
    for axis, value in sizes.items():
        if value != -1 and value < 1:
            raise MeshError(f"config.mesh.{axis}={value} must be a positive size or -1")
    free = [axis for axis, value in sizes.items() if value == -1]
    if len(free) > 1:
        raise MeshError(f"config.mesh: at most one axis may be -1 (the rest), got {dict(shape)}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if device_count % fixed:
            raise MeshError(
                f"config.mesh {dict(shape)} needs a multiple of {fixed} devices; "
                f"{device_count} are available"
            )
        sizes[free[0]] = device_count // fixed
    elif fixed != device_count:
        raise MeshError(
            f"config.mesh {sizes} needs {fixed} devices but {device_count} are available; "
            "set one axis to -1 to use the rest"
        )
    return sizes


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


def make_mesh(shape: Mapping[str, int], devices: list | None = None) -> jax.sharding.Mesh:
    """A mesh with axes (data, fsdp, model) over `devices` (default: all), sized by
    `mesh_shape`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = tuple(mesh_shape(shape, len(devices)).values())
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(sizes, MESH_AXES, axis_types=auto)
    grid = np.asarray(devices).reshape(sizes)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


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
