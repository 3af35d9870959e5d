"""Registry of preprocessing ops and the builder that chains them into one function.

An op is registered as a factory: called with the literal arguments from the pp string, it
returns a function ``fn(data) -> data`` on a feature dict, or, for ops declared ``random``,
``fn(data, seed) -> data`` where ``seed`` is a stateless-RNG seed (int64 tensor of shape [2])
unique to this op and example. Seeding from the example index keeps batches reproducible and
resumable from any step.

This module only defines the registry: it imports no op module. The op modules register
their ops when they are imported, and whoever builds a pp string names the op modules it
needs (``build_pp(..., op_modules=...)``, default ``DEFAULT_OP_MODULES``), which
``load_op_modules`` imports first. A user's own ops live in a module of their own, named
there (``"my_package.my_ops"``) or loaded once with ``load_op_modules`` before building.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from vit_jax.data._tf import tf
from vit_jax.data.pp_parse import OpCall, PPError, parse_pp

Features = dict[str, Any]
OpFn = Callable[..., Features]


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Callable[..., OpFn]
    random: bool


_REGISTRY: dict[str, _Entry] = {}
# The op modules of this package. A name is a module of vit_jax.data (`ops`) or any
# importable module (`my_package.my_ops`).
DEFAULT_OP_MODULES = ("ops", "label_ops", "randaug")


def register(name: str, *, random: bool = False) -> Callable[[Callable], Callable]:
    """Decorator registering an op factory under ``name``."""

    def deco(factory: Callable[..., OpFn]) -> Callable[..., OpFn]:
        if name in _REGISTRY:
            raise ValueError(f"pp op '{name}' is registered twice")
        _REGISTRY[name] = _Entry(factory, random)
        return factory

    return deco


def load_op_modules(names: Sequence[str] = DEFAULT_OP_MODULES) -> None:
    """Imports the op modules ``names`` (once each), which registers their ops."""
    for name in names:
        module = name
        if "." not in name and importlib.util.find_spec(f"vit_jax.data.{name}") is not None:
            module = f"vit_jax.data.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise  # the module exists; something it imports does not
            raise PPError(f"pp op module {name!r} not found ({module})") from None


def known_ops(op_modules: Sequence[str] = DEFAULT_OP_MODULES) -> list[str]:
    """Names of all registered ops, sorted, after loading ``op_modules``."""
    load_op_modules(op_modules)
    return sorted(_REGISTRY)


def _instantiate(call: OpCall) -> tuple[OpFn, bool]:
    entry = _REGISTRY.get(call.name)
    if entry is None:
        raise PPError(f"unknown pp op '{call.name}'; known ops: {', '.join(known_ops())}")
    sig = inspect.signature(entry.factory)
    try:
        sig.bind(*call.args, **call.kwargs)
    except TypeError as e:
        raise PPError(
            f"pp op '{call.name}': bad arguments {call.args} {call.kwargs}: {e}; "
            f"expected {call.name}{sig}; known ops: {', '.join(known_ops())}"
        ) from e
    try:
        fn = entry.factory(*call.args, **call.kwargs)
    except (TypeError, ValueError) as e:
        raise PPError(
            f"pp op '{call.name}': bad argument: {e}; expected {call.name}{sig}; "
            f"known ops: {', '.join(known_ops())}"
        ) from e
    return fn, entry.random


def build_pp(
    spec: str, *, seed: int = 0, op_modules: Sequence[str] = DEFAULT_OP_MODULES
) -> Callable[[Features, tf.Tensor], Features]:
    """Builds ``pp(data, index)`` applying the ops of ``spec`` in order.

    The op modules ``op_modules`` are loaded first (ops registered before stay known).
    ``index`` is the example's global counter (int64 scalar); random op number ``k`` uses the
    stateless seed ``(seed * 64 + k, index)``, so results depend only on (seed, index, k).
    """
    load_op_modules(op_modules)
    ops = [_instantiate(call) for call in parse_pp(spec)]
    if len(ops) >= 64:
        raise PPError(f"pp string has {len(ops)} ops; at most 63 are supported")
    base = (int(seed) * 64) % (2**62)

    def pp(data: Features, index: tf.Tensor) -> Features:
        data = dict(data)
        index = tf.cast(index, tf.int64)
        for k, (fn, is_random) in enumerate(ops):
            if is_random:
                data = fn(data, tf.stack([tf.constant(base + k, tf.int64), index]))
            else:
                data = fn(data)
        return data

    return pp
