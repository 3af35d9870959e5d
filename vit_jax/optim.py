"""Learning-rate schedules and optimizers (optax) for training ViTs.

`make_schedule` turns ``config.schedule`` into an ``optax.Schedule`` and `make_optimizer`
turns ``config.optim`` (plus the schedule) into one ``optax.GradientTransformation`` that
does gradient clipping, the base optimizer, decoupled weight decay, per-group learning-rate
multipliers and parameter freezing. Parameter groups are chosen by regular expressions that
must match the *whole* '/'-joined parameter path (``re.fullmatch``), e.g. ``head/kernel``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vit_jax.errors import UserError

# "adamw": Adam with decoupled weight decay (plain Adam with weight_decay=0).
VALID_OPTIMIZERS = ("adamw", "sgd", "adafactor")
VALID_DECAYS = ("cosine", "linear", "rsqrt", "constant")

PyTree = Any

# Trailing attribute entries that only unwrap a flax.nnx.Variable (not part of the name).
_VARIABLE_VALUE_ATTRS = ("value", "raw_value")


class PatternError(UserError, ValueError):
    """An `optim.lr_mults` or `optim.freeze` entry that is malformed or matches nothing."""


def _cfg_get(config: Any, name: str, default: Any = None) -> Any:
    """Reads a field from a ConfigDict / dict / object, falling back to a default."""
    if isinstance(config, Mapping) or hasattr(config, "get"):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None and default is not None else value


# ---------------------------------------------------------------------------------------
# Parameter path names.
# ---------------------------------------------------------------------------------------


def _key_to_str(key: Any) -> str:
    """Turns one pytree path entry (DictKey, GetAttrKey, SequenceKey, ...) into a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_to_name(path: Sequence[Any]) -> str:
    """Joins a key path with '/', dropping the trailing ``.value`` of nnx Variables."""
    path = list(path)
    if (
        path
        and isinstance(path[-1], jax.tree_util.GetAttrKey)
        and path[-1].name in _VARIABLE_VALUE_ATTRS
    ):
        path = path[:-1]
    return "/".join(_key_to_str(k) for k in path)


def _names_and_treedef(tree: PyTree) -> tuple[list[str], Any]:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [_path_to_name(p) for p, _ in leaves_with_path], treedef


def _tree_from_names(tree: PyTree, fn: Callable[[str], Any]) -> PyTree:
    """Applies ``fn`` to every leaf's path name, keeping ``tree``'s structure."""
    names, treedef = _names_and_treedef(tree)
    return jax.tree_util.tree_unflatten(treedef, [fn(n) for n in names])


# ---------------------------------------------------------------------------------------
# Schedules.
# ---------------------------------------------------------------------------------------


def make_schedule(schedule_config: Any, total_steps: int) -> optax.Schedule:
    """Builds the learning-rate schedule: linear warmup, then a decay.

    With ``w = warmup_steps``, ``T = total_steps`` and ``p = clip((step - w) / (T - w), 0, 1)``:

    * warmup (``step < w``): ``lr = base_lr * step / w`` (0 at step 0, base_lr at step w);
    * ``linear``:   ``lr = base_lr + (end_lr - base_lr) * p``;
    * ``cosine``:   ``lr = end_lr + (base_lr - end_lr) * 0.5 * (1 + cos(pi * p))``;
    * ``constant``: ``lr = base_lr``;
    * ``rsqrt``:    ``lr = base_lr / sqrt(1 + (step - w) / rsqrt_timescale)`` (continuous at
      the end of warmup, big_vision convention);
    * ``cooldown_steps = c > 0`` (meant for rsqrt/constant) multiplies the post-warmup lr by
      ``min(1, (T - step) / c)``, a linear ramp to 0 over the last c steps.
    """
    base_lr = float(_cfg_get(schedule_config, "base_lr"))
    warmup = int(_cfg_get(schedule_config, "warmup_steps", 0))
    decay = _cfg_get(schedule_config, "decay", "cosine")
    end_lr = float(_cfg_get(schedule_config, "end_lr", 0.0))
    timescale = float(_cfg_get(schedule_config, "rsqrt_timescale", 10_000))
    cooldown = int(_cfg_get(schedule_config, "cooldown_steps", 0))
    total_steps = int(total_steps)
    if decay not in VALID_DECAYS:
        raise ValueError(f"Unknown schedule decay {decay!r}; valid: {', '.join(VALID_DECAYS)}.")
    if warmup < 0 or warmup > total_steps:
        raise ValueError(
            f"config.schedule.warmup_steps={warmup} must be in [0, total_steps={total_steps}]."
        )
    if decay == "rsqrt" and timescale <= 0:
        raise ValueError(f"rsqrt_timescale must be > 0, got {timescale}.")
    decay_steps = max(total_steps - warmup, 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if decay == "linear":
            lr = base_lr + (end_lr - base_lr) * progress
        elif decay == "cosine":
            lr = end_lr + (base_lr - end_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        elif decay == "rsqrt":
            lr = base_lr / jnp.sqrt(1.0 + jnp.maximum(step - warmup, 0.0) / timescale)
        else:  # constant
            lr = jnp.full_like(step, base_lr)
        if cooldown > 0:
            lr = lr * jnp.clip((total_steps - step) / cooldown, 0.0, 1.0)
        if warmup > 0:
            lr = jnp.where(step < warmup, base_lr * step / warmup, lr)
        return lr

    return schedule


# ---------------------------------------------------------------------------------------
# Parameter groups.
# ---------------------------------------------------------------------------------------


def _fullmatch(pattern: str | None, name: str) -> bool:
    return bool(pattern) and re.fullmatch(pattern, name) is not None


def _lr_mult_for(lr_mults: Sequence[tuple[str, float]], name: str) -> float:
    """First matching (regex, multiplier) pair wins; no match means 1.0."""
    for pattern, mult in lr_mults:
        if re.fullmatch(pattern, name):
            return float(mult)
    return 1.0


def _parse_lr_mults(optim_config: Any) -> tuple[tuple[str, float], ...]:
    lr_mults = _cfg_get(optim_config, "lr_mults", ()) or ()
    if isinstance(lr_mults, Mapping):
        lr_mults = tuple(lr_mults.items())
    parsed = []
    for item in lr_mults:
        if len(item) != 2:
            raise PatternError(
                f"config.optim.lr_mults entries must be (regex, multiplier) pairs, got {item!r}; "
                "e.g. --config.optim.lr_mults=\"(('head/.*', 10.0),)\""
            )
        try:
            parsed.append((str(item[0]), float(item[1])))
        except (TypeError, ValueError):
            raise PatternError(
                f"config.optim.lr_mults: the multiplier of {item!r} is not a number"
            ) from None
    return tuple(parsed)


def check_patterns(optim_config: Any) -> list[tuple[str, str]]:
    """The (field, regex) pairs of `freeze` and `lr_mults`, parsed and compiled; PatternError
    (one line) for a malformed entry or regex. Runs before anything compiles."""
    checks = [("freeze", _cfg_get(optim_config, "freeze", "") or "")]
    checks += [("lr_mults", p) for p, _ in _parse_lr_mults(optim_config)]
    for field, pattern in checks:
        try:
            re.compile(pattern)
        except re.error as e:
            raise PatternError(f"config.optim.{field} regex {pattern!r} is invalid: {e}") from e
    return [(field, pattern) for field, pattern in checks if pattern]


def _check_patterns_match(optim_config: Any, names: Sequence[str]) -> None:
    """Raises PatternError for any lr_mults / freeze regex that matches no parameter."""
    for field, pattern in check_patterns(optim_config):
        if not any(re.fullmatch(pattern, n) for n in names):
            examples = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise PatternError(
                f"config.optim.{field} regex {pattern!r} matches no parameter (regexes must "
                f"match the whole path). Parameter paths look like: {examples}"
            )


def _scale_by_lr_mults(lr_mults: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Stateless transform multiplying each leaf's update by its group's lr multiplier."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        mults = _tree_from_names(updates, lambda n: _lr_mult_for(lr_mults, n))
        updates = jax.tree_util.tree_map(
            lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype), updates, mults
        )
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def _base_optimizer(optim_config: Any) -> optax.GradientTransformation:
    """The un-scaled direction (no lr, no sign flip) of the chosen optimizer."""
    name = _cfg_get(optim_config, "name", "adamw")
    mu_dtype = _cfg_get(optim_config, "mu_dtype", None)
    mu_dtype = jnp.dtype(mu_dtype) if mu_dtype else None
    if name == "adamw":
        return optax.scale_by_adam(
            b1=float(_cfg_get(optim_config, "b1", 0.9)),
            b2=float(_cfg_get(optim_config, "b2", 0.999)),
            eps=float(_cfg_get(optim_config, "eps", 1e-8)),
            mu_dtype=mu_dtype,
        )
    if name == "sgd":
        momentum = float(_cfg_get(optim_config, "momentum", 0.0) or 0.0)
        if momentum == 0.0:
            return optax.identity()
        return optax.trace(
            decay=momentum,
            nesterov=bool(_cfg_get(optim_config, "nesterov")),
            accumulator_dtype=mu_dtype,
        )
    if name == "adafactor":
        # Factored second moments + update clipping (optax.adafactor defaults); the lr is
        # applied by the schedule below, so no parameter-scale multiplication.
        return optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0))
    raise ValueError(f"Unknown optimizer {name!r}; valid: {', '.join(VALID_OPTIMIZERS)}.")


def make_optimizer(
    optim_config: Any, schedule_config: Any, params: PyTree, total_steps: int
) -> optax.GradientTransformation:
    """Builds the full optax transformation from ``config.optim`` and ``config.schedule``.

    Update of a trainable parameter ``p`` with gradient ``g`` (``d`` = base optimizer
    direction, ``m`` = its lr multiplier, ``lr(t)`` = `make_schedule`, ``wd`` masked to 0 for
    paths matching ``weight_decay_exclude``):

    * ``decay_unscaled=False`` (optax adamw style): ``p -= m * lr(t) * (d + wd * p)``;
    * ``decay_unscaled=True`` (big_vision style): ``p -= lr(t) / base_lr * (m * base_lr * d
      + wd * p)``, i.e. the decay follows the schedule's shape but not the lr's size or the
      multiplier.

    Gradients are first clipped to global norm ``clip_global_norm`` (over trainable
    parameters). Parameters matching ``freeze`` get exactly zero updates and hold no
    optimizer state. ``params`` is used to validate the regexes (a freeze / lr_mults regex
    matching nothing raises ValueError); the transformation itself works on any pytree with
    the same path names (plain dicts or ``nnx.State``).
    """
    name = _cfg_get(optim_config, "name", "adamw")
    if name not in VALID_OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid: {', '.join(VALID_OPTIMIZERS)}.")
    names, _ = _names_and_treedef(params)
    _check_patterns_match(optim_config, names)

    schedule = make_schedule(schedule_config, total_steps)
    base_lr = float(_cfg_get(schedule_config, "base_lr"))
    wd = float(_cfg_get(optim_config, "weight_decay", 0.0) or 0.0)
    decay_unscaled = bool(_cfg_get(optim_config, "decay_unscaled", False))
    exclude = _cfg_get(optim_config, "weight_decay_exclude", "") or ""
    clip = _cfg_get(optim_config, "clip_global_norm", None)
    lr_mults = _parse_lr_mults(optim_config)
    freeze = _cfg_get(optim_config, "freeze", "") or ""

    def decay_mask(tree):
        return _tree_from_names(tree, lambda n: not _fullmatch(exclude, n))

    txs = []
    if clip:
        txs.append(optax.clip_by_global_norm(float(clip)))
    txs.append(_base_optimizer(optim_config))
    mults_tx = [_scale_by_lr_mults(lr_mults)] if lr_mults else []
    if decay_unscaled:
        txs += mults_tx
        txs.append(optax.scale(base_lr))
        if wd:
            txs.append(optax.add_decayed_weights(wd, mask=decay_mask))

        def ratio(step):
            return schedule(step) / base_lr if base_lr else jnp.zeros((), jnp.float32)

        txs.append(optax.scale_by_schedule(ratio))
    else:
        if wd:
            txs.append(optax.add_decayed_weights(wd, mask=decay_mask))
        txs.append(optax.scale_by_schedule(schedule))
        txs += mults_tx
    txs.append(optax.scale(-1.0))
    tx = optax.chain(*txs)

    if freeze:

        def labels(tree):
            return _tree_from_names(
                tree, lambda n: "frozen" if _fullmatch(freeze, n) else "trainable"
            )

        tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
    return tx
