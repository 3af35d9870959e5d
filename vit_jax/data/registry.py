"""Registry of preprocessing ops and the builder that chains them into one function.

An op is registered as a factory: called with the literal arguments from the pp string, it
returns a function ``fn(data) -> data`` on a feature dict, or, for ops declared ``random``,
``fn(data, seed) -> data`` where ``seed`` is a stateless-RNG seed (int64 tensor of shape [2])
unique to this op and example. Seeding from the example index keeps batches reproducible and
resumable from any step.
"""

import dataclasses
import inspect
from collections.abc import Callable
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


def register(name: str, *, random: bool = False) -> Callable[[Callable], Callable]:
    """Decorator registering an op factory under ``name``."""

    def deco(factory: Callable[..., OpFn]) -> Callable[..., OpFn]:
        if name in _REGISTRY:
            raise ValueError(f"pp op '{name}' is registered twice")
        _REGISTRY[name] = _Entry(factory, random)
        return factory

    return deco


def known_ops() -> list[str]:
    """Names of all registered ops, sorted."""
    _ensure_ops_loaded()
    return sorted(_REGISTRY)


def _ensure_ops_loaded() -> None:
    # The op modules register themselves on import; importing here avoids import cycles.
    from vit_jax.data import label_ops, ops, randaug  # noqa: F401


def _instantiate(call: OpCall) -> tuple[OpFn, bool]:
    _ensure_ops_loaded()
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


def build_pp(spec: str, *, seed: int = 0) -> Callable[[Features, tf.Tensor], Features]:
    """Builds ``pp(data, index)`` applying the ops of ``spec`` in order.

    ``index`` is the example's global counter (int64 scalar); random op number ``k`` uses the
    stateless seed ``(seed * 64 + k, index)``, so results depend only on (seed, index, k).
    """
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
