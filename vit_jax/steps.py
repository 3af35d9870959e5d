"""The pure, jit-compiled pieces of training: state init, train step and eval step.

Everything here is a function of abstract shapes plus config, so it compiles ahead of time
(`jax.jit(...).lower(abstract...).compile()`) for any mesh. The train state is a plain dict
`{'params', 'opt_state', 'step'}`; randomness comes from `fold_in(seed, step)`, so the state
and the step alone fix every later update (bit-identical resume). With
`config.on_nonfinite="skip"` a step whose loss, gradients or new parameters are not finite
keeps the old parameters and optimizer moments (only the step and the optimizer's step
counters advance, so the learning rate stays `schedule(step)`) and reports `skipped=1`.

With `config.ema_decay > 0` the state also holds `ema_params`: an exponential moving average
of the parameters, in float32 and sharded like them, updated inside the step (`ema_update`).

A FlexiViT (`config.model.patch_sizes`) has one train, eval and feature step per patch size
(`make_train_step(patch_size)`, ...): the same parameters, the model run at that size.

With a teacher (`config.distill.weight > 0`, vit_jax/distill.py) the train step takes the
teacher's parameters as a third argument, runs the frozen teacher on each (micro-)batch the
student sees and mixes the label loss with the distillation loss (`losses.distilled_loss`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from vit_jax import eval_counts, losses, mixup, optim, sharding
from vit_jax.checkpoint import abstract_like
from vit_jax.errors import UserError
from vit_jax.models import ActivationSharding, create_model

if TYPE_CHECKING:
    from vit_jax.distill import Teacher

TrainState = dict[str, Any]


NONFINITE_POLICIES = ("stop", "skip")


class ConfigValueError(UserError, ValueError):
    """A config field has a value this trainer does not accept."""


def _keep_if_skipped(finite: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """One leaf of the state after a step that may be skipped (`finite` false).

    Floating leaves (parameters, moments, factored second moments) keep their old value.
    Integer leaves are optax's step counters (`count`): they advance with the train step, so
    schedules inside the optimizer stay at `schedule(step)`, the learning rate logged.
    """
    if jnp.issubdtype(new.dtype, jnp.integer):
        return new
    return jnp.where(finite, new, old)


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """The decay of the EMA update that makes step `step` (1, 2, ...): `decay`, held down
    early to `(1 + step) / (10 + step)` (TensorFlow's ExponentialMovingAverage warm-up), so
    the average forgets its random start within a few hundred steps, not tens of thousands."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def ema_update(ema: dict, params: dict, decay: jax.Array) -> dict:
    """`decay * ema + (1 - decay) * params`, leaf by leaf, in float32."""
    return jax.tree.map(
        lambda average, p: decay * average + (1.0 - decay) * p.astype(jnp.float32), ema, params
    )


def as_float32(params: dict) -> dict:
    return jax.tree.map(lambda p: p.astype(jnp.float32), params)


def nonfinite_policy(config: ml_collections.ConfigDict) -> str:
    """config.on_nonfinite, checked: "stop" the run or "skip" the step (no update)."""
    policy = config.get("on_nonfinite", "stop")
    if policy not in NONFINITE_POLICIES:
        raise ConfigValueError(
            f"config.on_nonfinite={policy!r} is not one of {NONFINITE_POLICIES}; use 'stop' "
            "to end the run at a NaN/Inf loss or 'skip' to drop such steps"
        )
    skips = config.get("max_consecutive_skips", 10)
    if policy == "skip" and (not isinstance(skips, int) or skips < 1):
        raise ConfigValueError(
            f"config.max_consecutive_skips={skips!r} must be a positive integer (the number "
            "of skipped steps in a row that stops the run)"
        )
    return policy


def teacher_logits(teacher: Teacher, params: dict, images: jax.Array) -> jax.Array:
    """The frozen teacher's logits for the student's (augmented) images, resized (bilinear)
    to the teacher's image size where it differs; no gradient flows into the teacher."""
    size = teacher.img_size
    if images.shape[1:3] != (size, size):
        shape = (images.shape[0], size, size, images.shape[3])
        images = jax.image.resize(images, shape, method="bilinear")
    model = nnx.merge(teacher.graphdef, jax.lax.stop_gradient(params))
    return jax.lax.stop_gradient(model(images, train=False))


class StepBuilder:
    """Everything needed to build, shard and compile the steps of one run."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh,
        *,
        num_classes: int,
        total_steps: int,
        teacher: Teacher | None = None,
    ):
        self.config = config
        self.mesh = mesh
        self.num_classes = num_classes
        self.total_steps = total_steps
        self.teacher = teacher  # distillation: the train step takes its parameters

    # --- model and optimizer -------------------------------------------------------------

    @property
    def patch_sizes(self) -> tuple[int, ...]:
        """config.model.patch_sizes: a FlexiViT's patch sizes (empty: a plain model)."""
        return tuple(int(p) for p in self.config.model.get("patch_sizes") or ())

    def model_overrides(self, patch_size: int | None = None) -> dict[str, Any]:
        """The model's settings; a FlexiViT at `patch_size` (None: config.model.patch_size,
        whose shapes its parameters keep at every size)."""
        overrides = {k: v for k, v in self.config.model.to_dict().items() if v is not None}
        if self.patch_sizes:
            overrides.update(patch_sizes=self.patch_sizes, param_patch_size=overrides["patch_size"])
            overrides["patch_size"] = patch_size or overrides["patch_size"]
        elif patch_size not in (None, overrides.get("patch_size")):
            raise ValueError(f"patch size {patch_size}: the model is not a FlexiViT")
        rules = sharding.get_rules(self.config.sharding_rules)
        return dict(
            overrides,
            num_classes=self.num_classes,
            activation_sharding=ActivationSharding(self.mesh, rules),
        )

    def build_model(self, seed: int, patch_size: int | None = None) -> nnx.Module:
        overrides = self.model_overrides(patch_size)
        return create_model(self.config.model_name, seed=seed, **overrides)

    @functools.cached_property
    def abstract_model(self) -> nnx.Module:
        """The model with ShapeDtypeStructs instead of arrays: no memory is allocated."""
        return nnx.eval_shape(lambda: self.build_model(0))

    @functools.cached_property
    def graphdef(self) -> nnx.GraphDef:
        return nnx.split(self.abstract_model, nnx.Param)[0]

    @functools.cached_property
    def _graphdefs(self) -> dict[int, nnx.GraphDef]:
        return {}

    def graphdef_at(self, patch_size: int | None = None) -> nnx.GraphDef:
        """The model's graph running at `patch_size` (a FlexiViT's; None: the model's own).
        The parameters are `abstract_model`'s at every size."""
        if patch_size is None or not self.patch_sizes:
            self.model_overrides(patch_size)  # a size other than a plain model's is refused
            return self.graphdef
        if patch_size not in self._graphdefs:
            model = nnx.eval_shape(lambda: self.build_model(0, patch_size))
            self._graphdefs[patch_size] = nnx.split(model, nnx.Param)[0]
        return self._graphdefs[patch_size]

    @functools.cached_property
    def tx(self) -> optax.GradientTransformation:
        abstract_params = nnx.to_pure_dict(nnx.state(self.abstract_model, nnx.Param))
        return optim.make_optimizer(
            self.config.optim, self.config.schedule, abstract_params, self.total_steps
        )

    def schedule(self) -> optax.Schedule:
        return optim.make_schedule(self.config.schedule, self.total_steps)

    @property
    def ema_decay(self) -> float:
        """config.ema_decay: 0 (no average kept) or the EMA's decay per step."""
        return float(self.config.get("ema_decay") or 0.0)

    # --- state ---------------------------------------------------------------------------

    @functools.cached_property
    def param_shardings(self) -> dict:
        """The parameters' shardings on this mesh (a pure dict), from their logical axes."""
        rules = sharding.get_rules(self.config.sharding_rules)
        param_state = nnx.state(self.abstract_model, nnx.Param)
        return sharding.param_shardings(param_state, self.mesh, rules)

    @functools.cached_property
    def state_shardings(self) -> tuple[TrainState, TrainState]:
        """(abstract state with shardings, shardings) for the train state on this mesh."""
        params_sharding = self.param_shardings
        abstract_params = nnx.to_pure_dict(nnx.state(self.abstract_model, nnx.Param))
        tx = self.tx
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        shardings = {
            "params": params_sharding,
            "opt_state": sharding.optimizer_shardings(tx, abstract_opt, params_sharding, self.mesh),
            "step": sharding.replicated(self.mesh),
        }
        abstract = {
            "params": abstract_params,
            "opt_state": abstract_opt,
            "step": jax.ShapeDtypeStruct((), jnp.int32),
        }
        if self.ema_decay:
            abstract["ema_params"] = jax.eval_shape(as_float32, abstract_params)
            shardings["ema_params"] = params_sharding
        return abstract_like(abstract, shardings), shardings

    def init_state(self, params: dict | None = None) -> TrainState:
        """A fresh sharded state; `params` (a pure dict) replaces the random init if given."""
        _, shardings = self.state_shardings
        tx = self.tx
        seed = self.config.seed
        ema = bool(self.ema_decay)

        def init(params):
            if params is None:
                params = nnx.to_pure_dict(nnx.state(self.build_model(seed), nnx.Param))
            state = {
                "params": params,
                "opt_state": tx.init(params),
                "step": jnp.zeros((), jnp.int32),
            }
            if ema:  # the average starts at the initial parameters
                state["ema_params"] = as_float32(params)
            return state

        if params is None:
            return jax.jit(lambda: init(None), out_shardings=shardings)()
        params = jax.device_put(jax.device_get(params), shardings["params"])
        return jax.jit(init, out_shardings=shardings)(params)

    # --- steps ---------------------------------------------------------------------------

    def batch_shardings(self) -> dict[str, jax.sharding.NamedSharding]:
        return {
            "image": sharding.batch_sharding(self.mesh, 4),
            "labels": sharding.batch_sharding(self.mesh, 2),
            "mask": sharding.batch_sharding(self.mesh, 1),
        }

    def make_train_step(
        self, patch_size: int | None = None
    ) -> Callable[..., tuple[TrainState, dict]]:
        """The jitted train step: state donated, explicit in/out shardings. With a teacher it
        takes the teacher's parameters as a third argument (`Teacher.bind`). A FlexiViT's
        step runs the model at `patch_size` (None: config.model.patch_size)."""
        config = self.config
        graphdef = self.graphdef_at(patch_size)  # FlexiViT: the size this step trains at
        _, state_sharding = self.state_shardings
        tx = self.tx
        schedule = self.schedule()
        loss_fn = losses.get_loss_fn(config.loss)
        accum = int(config.optim.grad_accum_steps)
        seed = int(config.seed)
        mix = config.mixup
        skip_nonfinite = nonfinite_policy(config) == "skip"
        ema_decay = self.ema_decay
        teacher = self.teacher

        def loss_of(params, images, labels, rng, teacher_params=None):
            model = nnx.merge(graphdef, params)
            logits = model(images, train=True, rngs=nnx.Rngs(dropout=rng))
            loss = loss_fn(logits, labels, **self._loss_kwargs())
            if teacher is None:
                return loss
            return losses.distilled_loss(
                loss,
                logits,
                teacher_logits(teacher, teacher_params, images),
                weight=teacher.weight,
                temperature=teacher.temperature,
            )

        def train_step(state, batch, teacher_params=None):
            step_rng = jax.random.fold_in(jax.random.key(seed), state["step"])
            mix_rng, dropout_rng = jax.random.split(step_rng)
            images, labels = batch["image"], batch["labels"]
            if mix.mixup_alpha or mix.cutmix_alpha:
                images, labels = mixup.mix_batch(
                    mix_rng,
                    images,
                    labels,
                    mixup_alpha=mix.mixup_alpha,
                    cutmix_alpha=mix.cutmix_alpha,
                    switch_prob=mix.switch_prob,
                )
            grad_fn = jax.value_and_grad(functools.partial(loss_of, teacher_params=teacher_params))
            if accum == 1:
                loss, grads = grad_fn(state["params"], images, labels, dropout_rng)
            else:
                loss, grads = self._accumulate(
                    grad_fn, state["params"], images, labels, dropout_rng, accum
                )
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            grad_norm = optax.global_norm(grads)
            param_norm = optax.global_norm(params)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
            stats = {"loss": loss, "finite": finite, "grad_norm": grad_norm}
            if skip_nonfinite:  # a bad step keeps the parameters and optimizer moments
                params, opt_state = jax.tree.map(
                    lambda new, old: _keep_if_skipped(finite, new, old),
                    (params, opt_state),
                    (state["params"], state["opt_state"]),
                )
                param_norm = optax.global_norm(params)
                stats["skipped"] = jnp.logical_not(finite).astype(jnp.int32)
            new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
            if ema_decay:
                decay = ema_decay_at(ema_decay, new_state["step"])
                ema = ema_update(state["ema_params"], params, decay)
                if skip_nonfinite:  # a skipped step leaves the average as it was
                    ema = jax.tree.map(
                        lambda new, old: jnp.where(finite, new, old), ema, state["ema_params"]
                    )
                new_state["ema_params"] = ema
            stats.update(param_norm=param_norm, learning_rate=schedule(state["step"]))
            return new_state, stats

        in_shardings = (state_sharding, self.batch_shardings_without_mask())
        if teacher is not None:
            in_shardings += (teacher.param_shardings,)
        return jax.jit(
            train_step,
            in_shardings=in_shardings,
            out_shardings=(state_sharding, sharding.replicated(self.mesh)),
            donate_argnums=(0,),
        )

    def batch_shardings_without_mask(self):
        shardings = self.batch_shardings()
        return {"image": shardings["image"], "labels": shardings["labels"]}

    def _loss_kwargs(self) -> dict[str, Any]:
        if self.config.loss == "softmax_xent" and self.config.label_smoothing:
            return {"label_smoothing": self.config.label_smoothing}
        return {}

    def _accumulate(self, grad_fn, params, images, labels, rng, accum):
        """Mean loss and gradient over `accum` micro-batches, scanned to bound memory."""
        batch = images.shape[0]  # a multiple of accum (sharding.batch_problems)

        def split(x):
            # (B, ...) -> (accum, B // accum, ...): micro-batch i takes rows i, i+accum, ...,
            # so every device keeps its own rows and no data moves between devices.
            x = x.reshape(batch // accum, accum, *x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        def body(carry, inputs):
            loss_sum, grad_sum = carry
            micro_images, micro_labels, index = inputs
            loss, grads = grad_fn(
                params, micro_images, micro_labels, jax.random.fold_in(rng, index)
            )
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        inputs = (split(images), split(labels), jnp.arange(accum))
        (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), inputs)
        return loss_sum / accum, jax.tree.map(lambda g: g / accum, grad_sum)

    def make_eval_step(self, patch_size: int | None = None) -> Callable[[dict, dict], dict]:
        """Jitted eval step: summed counts (correct top-1/top-5, loss, examples) for a batch
        (a FlexiViT at `patch_size`)."""
        graphdef = self.graphdef_at(patch_size)
        _, state_sharding = self.state_shardings
        loss_name = self.config.loss

        def eval_step(params, batch):
            model = nnx.merge(graphdef, params)
            logits = model(batch["image"], train=False)
            return eval_counts.classification_counts(
                logits, batch["labels"], batch["mask"], loss_name
            )

        return jax.jit(
            eval_step,
            in_shardings=(state_sharding["params"], self.batch_shardings()),
            out_shardings=sharding.replicated(self.mesh),
        )

    def make_feature_step(
        self, patch_size: int | None = None
    ) -> Callable[[dict, jax.Array], jax.Array]:
        """Jitted pre-logit features (for the few-shot evaluator; a FlexiViT at `patch_size`)."""
        graphdef = self.graphdef_at(patch_size)
        _, state_sharding = self.state_shardings

        def features(params, images):
            model = nnx.merge(graphdef, params)
            return model.forward_features(images, train=False)["pre_logits"]

        return jax.jit(
            features,
            in_shardings=(state_sharding["params"], self.batch_shardings()["image"]),
            out_shardings=sharding.replicated(self.mesh),
        )
