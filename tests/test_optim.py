"""Tests for vit_jax.optim: schedules, optimizer chain, parameter groups."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from vit_jax import optim

EXCLUDE = r"(.*bias$)|(.*scale$)|(.*posemb.*)|(.*cls_token.*)"


def optim_cfg(**overrides):
    cfg = dict(
        name="adamw",
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        momentum=0.9,
        nesterov=False,
        weight_decay=0.0,
        decay_unscaled=False,
        weight_decay_exclude=EXCLUDE,
        mu_dtype=None,
        clip_global_norm=None,
        lr_mults=(),
        freeze="",
        grad_accum_steps=1,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def sched_cfg(**overrides):
    cfg = dict(
        base_lr=0.1,
        warmup_steps=0,
        decay="constant",
        end_lr=0.0,
        rsqrt_timescale=10_000,
        cooldown_steps=0,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def tiny_params(seed=0):
    """A ViT-like parameter tree. Two shapes only: the optimizers work elementwise, and op by
    op every new shape is another compile of each of their ops."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {
        "patch_embed": {"kernel": r(2, 3), "bias": r(3)},
        "cls_token": r(2, 3),
        "posemb": r(2, 3),
        "blocks": {"norm1": {"scale": r(3)}, "mlp": {"fc1": {"kernel": r(2, 3), "bias": r(3)}}},
        "head": {"kernel": r(2, 3), "bias": r(3)},
    }


def random_grads(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params
    )


def run_steps(tx, params, grads_list):
    state = tx.init(params)
    updates_list = []
    for grads in grads_list:
        updates, state = tx.update(grads, state, params)
        updates_list.append(updates)
        params = optax.apply_updates(params, updates)
    return params, updates_list, state


def flat(tree):
    """{'head/kernel': array, ...} of a params-like tree (plain dicts or nnx.State)."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in leaves}


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_schedule_warmup_then_decay(decay):
    base, end, warm, total = 1e-3, 1e-5, 10, 110
    sched = optim.make_schedule(
        sched_cfg(base_lr=base, warmup_steps=warm, decay=decay, end_lr=end), total
    )

    def expected(step):
        if step < warm:
            return base * step / warm
        p = (step - warm) / (total - warm)
        if decay == "linear":
            return base + (end - base) * p
        return end + (base - end) * 0.5 * (1 + math.cos(math.pi * p))

    for step in (0, 5, 10, 60, 109, 110):
        np.testing.assert_allclose(float(sched(step)), expected(step), rtol=1e-5, atol=1e-10)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), base / 2, rtol=1e-6)
    np.testing.assert_allclose(float(sched(60)), (base + end) / 2, rtol=1e-5)  # mid-decay
    # Usable under jit with a traced step.
    np.testing.assert_allclose(float(jax.jit(sched)(jnp.int32(60))), (base + end) / 2, rtol=1e-5)


def test_schedule_rsqrt_and_cooldown():
    sched = optim.make_schedule(
        sched_cfg(
            base_lr=2.0, warmup_steps=100, decay="rsqrt", rsqrt_timescale=1000, cooldown_steps=1000
        ),
        total_steps=10_100,
    )
    np.testing.assert_allclose(float(sched(50)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(sched(3100)), 2.0 / math.sqrt(4.0), rtol=1e-6)
    # Last 1000 steps: multiplied by (total - step) / 1000.
    step = 9600
    np.testing.assert_allclose(
        float(sched(step)), 2.0 / math.sqrt(1 + 9500 / 1000) * 0.5, rtol=1e-5
    )
    assert float(sched(10_100)) == 0.0


def test_schedule_constant_and_errors():
    sched = optim.make_schedule(sched_cfg(base_lr=0.3, warmup_steps=4), 20)
    np.testing.assert_allclose([float(sched(s)) for s in (2, 4, 19)], [0.15, 0.3, 0.3], rtol=1e-6)
    with pytest.raises(ValueError, match="cosine"):
        optim.make_schedule(sched_cfg(decay="exponential"), 10)
    with pytest.raises(ValueError, match="warmup"):
        optim.make_schedule(sched_cfg(warmup_steps=20), 10)


# ------------------------------------------------------------------ optimizers


def test_adamw_matches_numpy():
    params = tiny_params()
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-8
    tx = optim.make_optimizer(optim_cfg(weight_decay=wd), sched_cfg(base_lr=lr), params, 10)
    grads = [random_grads(params, s) for s in (1, 2)]
    new_params, _, _ = run_steps(tx, params, grads)

    got = flat(new_params)
    p0, g = flat(params), [flat(gr) for gr in grads]
    for name, p in p0.items():
        p = p.astype(np.float64)
        m = v = np.zeros_like(p)
        decays = not any(s in name for s in ("bias", "scale", "posemb", "cls_token"))
        for t in (1, 2):
            gt = g[t - 1][name].astype(np.float64)
            m = b1 * m + (1 - b1) * gt
            v = b2 * v + (1 - b2) * gt**2
            mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
            p = p - lr * (mhat / (np.sqrt(vhat) + eps) + (wd * p if decays else 0.0))
        np.testing.assert_allclose(got[name], p, rtol=1e-5, atol=1e-6, err_msg=name)


def test_weight_decay_exclusion():
    params = tiny_params()
    cfg = optim_cfg(weight_decay=0.5)
    tx = optim.make_optimizer(cfg, sched_cfg(base_lr=0.1), params, 10)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    new, _, _ = run_steps(tx, params, [zeros])
    before, after = flat(params), flat(new)
    excluded = {
        "patch_embed/bias",
        "cls_token",
        "posemb",
        "blocks/norm1/scale",
        "blocks/mlp/fc1/bias",
        "head/bias",
    }
    for name in before:
        if name in excluded:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
        else:  # Adam direction is 0 for zero grads, so only decay: p * (1 - lr * wd).
            np.testing.assert_allclose(after[name], before[name] * 0.95, rtol=1e-6)


def test_freeze_gives_zero_updates_and_no_state():
    params = tiny_params()
    cfg = optim_cfg(freeze=r"patch_embed/.*|posemb", weight_decay=0.1)
    tx = optim.make_optimizer(cfg, sched_cfg(base_lr=0.1), params, 10)
    grads = [random_grads(params, s) for s in range(3)]
    new, _, state = jax.jit(lambda p: run_steps(tx, p, grads))(params)
    before, after = flat(params), flat(new)
    frozen = {"patch_embed/kernel", "patch_embed/bias", "posemb"}
    for name in before:
        if name in frozen:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
        else:
            assert not np.allclose(after[name], before[name]), name
    # Adam keeps mu and nu only for trainable parameters (plus scalar step counters).
    trainable = sum(v.size for k, v in before.items() if k not in frozen)
    state_size = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim > 0)
    assert state_size == 2 * trainable


def test_lr_mult_scales_sgd_update_exactly():
    params = tiny_params()
    grads = [random_grads(params, s) for s in range(3)]
    base = optim.make_optimizer(optim_cfg(name="sgd"), sched_cfg(), params, 10)
    mult = optim.make_optimizer(
        optim_cfg(name="sgd", lr_mults=(("head/.*", 0.1), (".*", 2.0))), sched_cfg(), params, 10
    )
    _, ub, _ = run_steps(base, params, grads[:1] * 3)
    _, um, _ = run_steps(mult, params, grads[:1] * 3)
    for b, m in zip(ub, um, strict=True):
        fb, fm = flat(b), flat(m)
        for name in fb:
            factor = 0.1 if name.startswith("head/") else 2.0  # first match wins
            np.testing.assert_allclose(fm[name], factor * fb[name], rtol=1e-6, err_msg=name)


def test_clipping_caps_global_norm():
    params = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 3))}
    cfg = optim_cfg(name="sgd", momentum=0.0, clip_global_norm=1.0)
    tx = optim.make_optimizer(cfg, sched_cfg(base_lr=1.0), params, 10)
    big = {"a": jnp.full((3,), 10.0), "b": jnp.full((2, 3), -10.0)}
    updates, _ = tx.update(big, tx.init(params), params)
    norm = float(optax.global_norm(updates))
    np.testing.assert_allclose(norm, 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["a"]), -10.0 / math.sqrt(900.0), rtol=1e-6)
    small = {"a": jnp.full((3,), 0.1), "b": jnp.zeros((2, 3))}
    updates, _ = tx.update(small, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["a"]), -0.1, rtol=1e-6)


def test_unscaled_vs_scaled_decay():
    params = {"w": jnp.asarray([1.0, -2.0, 0.5]), "bias": jnp.asarray([3.0, -1.0, 2.0])}
    grads = {"w": jnp.asarray([0.5, 0.5, -1.0]), "bias": jnp.asarray([1.0, 0.0, -0.5])}
    base_lr, wd = 0.1, 0.01
    sched = sched_cfg(base_lr=base_lr, warmup_steps=2, decay="linear")
    total = 12
    lr = optim.make_schedule(sched, total)
    for unscaled in (False, True):
        cfg = optim_cfg(name="sgd", momentum=0.0, weight_decay=wd, decay_unscaled=unscaled)
        tx = optim.make_optimizer(cfg, sched, params, total)
        p = {k: np.asarray(v, np.float64) for k, v in params.items()}
        new, _, _ = run_steps(tx, params, [grads] * 5)
        for step in range(5):
            lr_t = float(lr(step))
            ratio = lr_t / base_lr
            for k in p:
                g = np.asarray(grads[k], np.float64)
                decay = wd * p[k] if k == "w" else 0.0
                if unscaled:
                    p[k] = p[k] - lr_t * g - ratio * decay
                else:
                    p[k] = p[k] - lr_t * (g + decay)
        for k in p:
            np.testing.assert_allclose(np.asarray(new[k]), p[k], rtol=1e-6, err_msg=k)
    # The two modes really differ on the decayed parameter (by a factor 1/base_lr in decay).
    outs = []
    for unscaled in (False, True):
        cfg = optim_cfg(name="sgd", momentum=0.0, weight_decay=wd, decay_unscaled=unscaled)
        tx = optim.make_optimizer(cfg, sched, params, total)
        zero = jax.tree_util.tree_map(jnp.zeros_like, params)
        outs.append(run_steps(tx, params, [zero] * 4)[0]["w"])
    assert not np.allclose(outs[0], outs[1])


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_numpy(nesterov):
    params = tiny_params()
    lr, mu = 0.05, 0.9
    cfg = optim_cfg(name="sgd", momentum=mu, nesterov=nesterov)
    tx = optim.make_optimizer(cfg, sched_cfg(base_lr=lr), params, 10)
    grads = [random_grads(params, s) for s in range(3)]
    new, _, _ = run_steps(tx, params, grads)
    got = flat(new)
    for name, p in flat(params).items():
        p = p.astype(np.float64)
        t = np.zeros_like(p)
        for gr in grads:
            g = flat(gr)[name].astype(np.float64)
            t = g + mu * t
            p = p - lr * (g + mu * t if nesterov else t)
        np.testing.assert_allclose(got[name], p, rtol=1e-5, atol=1e-6, err_msg=name)


def test_mu_dtype_and_adafactor_and_nnx_state():
    params = tiny_params()
    tx = optim.make_optimizer(optim_cfg(mu_dtype="bfloat16"), sched_cfg(), params, 10)
    mu = optax.tree_utils.tree_get(tx.init(params), "mu")
    mu_dtypes = {x.dtype for x in jax.tree_util.tree_leaves(mu)}
    assert mu_dtypes == {jnp.dtype(jnp.bfloat16)}

    # Adafactor minimises a quadratic.
    target = tiny_params(seed=5)
    tx = optim.make_optimizer(optim_cfg(name="adafactor"), sched_cfg(base_lr=0.05), params, 50)

    def loss(p):
        return sum(
            jnp.sum((a - b) ** 2)
            for a, b in zip(
                jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(target), strict=True
            )
        )

    @jax.jit
    def step(p, state):
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates), state

    state, p = tx.init(params), params
    for _ in range(30):
        p, state = step(p, state)
    assert float(loss(p)) < 0.5 * float(loss(params))

    # nnx.State works as the params pytree, freezing included.
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    state_tree = nnx.state(model, nnx.Param)
    tx = optim.make_optimizer(
        optim_cfg(freeze="bias", weight_decay=0.1), sched_cfg(), state_tree, 10
    )
    grads = jax.tree_util.tree_map(jnp.ones_like, state_tree)
    updates, _ = tx.update(grads, tx.init(state_tree), state_tree)
    upd = flat(updates)
    assert np.all(upd["bias"] == 0.0) and np.all(upd["kernel"] != 0.0)


def test_config_errors():
    params = tiny_params()
    with pytest.raises(ValueError, match="adamw.*sgd"):
        optim.make_optimizer(optim_cfg(name="lamb"), sched_cfg(), params, 10)
    # One Adam: "adamw" (decoupled decay; weight_decay=0 is plain Adam), no look-alike "adam".
    with pytest.raises(ValueError, match="adamw.*sgd"):
        optim.make_optimizer(optim_cfg(name="adam"), sched_cfg(), params, 10)
    with pytest.raises(ValueError, match=r"'heda/\.\*'"):
        optim.make_optimizer(optim_cfg(freeze="heda/.*"), sched_cfg(), params, 10)
    with pytest.raises(ValueError, match=r"'encoder/.*'"):
        optim.make_optimizer(optim_cfg(lr_mults=(("encoder/.*", 0.1),)), sched_cfg(), params, 10)
    with pytest.raises(ValueError, match="linear"):
        optim.make_optimizer(optim_cfg(), sched_cfg(decay="step"), params, 10)


def test_lr_mult_scales_decay_only_in_scaled_mode():
    params = {"w": jnp.asarray([1.0, -2.0, 0.5]), "head": {"kernel": jnp.asarray([4.0, 1.0, -3.0])}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    lr, wd = 0.1, 0.2
    for unscaled in (False, True):
        cfg = optim_cfg(
            name="sgd",
            momentum=0.0,
            weight_decay=wd,
            decay_unscaled=unscaled,
            lr_mults=(("head/.*", 0.5),),
        )
        tx = optim.make_optimizer(cfg, sched_cfg(base_lr=lr), params, 10)
        updates, _ = tx.update(grads, tx.init(params), params)
        # Constant schedule. Scaled: -lr * mult * (g + wd * p); unscaled: -(lr * mult * g +
        # wd * p), i.e. the multiplier never touches the unscaled decay.
        for path, mult, p in (
            (("head", "kernel"), 0.5, np.array([4.0, 1.0, -3.0])),
            (("w",), 1.0, np.array([1.0, -2.0, 0.5])),
        ):
            got = updates[path[0]][path[1]] if len(path) == 2 else updates[path[0]]
            want = -(lr * mult + wd * p) if unscaled else -lr * mult * (1.0 + wd * p)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, err_msg=str(path))
