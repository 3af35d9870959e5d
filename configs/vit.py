"""Training configs: `configs/vit.py:<model>,<dataset>,<recipe>`.

Examples:
  configs/vit.py                          the demo: a small ViT on the embedded digits
  configs/vit.py:B/16,cifar10,finetune    fine-tune ViT-B/16 (set config.init_from.path)
  configs/vit.py:H/14,imagenet21k,pretrain
  configs/vit.py:R50+ViT-B/16,imagenet2012,pretrain

`<model>` is a zoo name (`ViT-B/16`, `R50+ViT-B/16`, `Mixer-B/16`) or a ViT size (`B/16`);
`<dataset>` is a data preset (see `vit_jax.data.get_data_config`); `<recipe>` is `pretrain`
or `finetune`. The returned config is locked: every field below is read by the trainer.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from vit_jax import data

RECIPES = ("pretrain", "finetune")


def model_config(**fields) -> ml_collections.ConfigDict:
    """Model overrides passed to `create_model`; None keeps the model's own default."""
    names = (
        "img_size pool_type posemb representation_size dropout attention_dropout drop_path "
        "dtype param_dtype scan remat head_zero_init head_bias_init attention_impl "
        "width depth mlp_dim num_heads patch_size"
    ).split()
    unknown = set(fields) - set(names)
    if unknown:
        raise ValueError(f"unknown model fields {sorted(unknown)}; valid: {names}")
    return ml_collections.ConfigDict({name: fields.get(name) for name in names})


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default; recipes change values, never add fields."""
    config = ml_collections.ConfigDict()
    config.model_name = "ViT-B/16"
    config.model = model_config()
    config.dataset = "digits"
    config.data = data.get_data_config("digits")
    config.seed = 0
    config.batch_size = 512
    config.eval_batch_size = 512
    config.total_steps = config_dict.placeholder(int)
    config.num_epochs = config_dict.placeholder(float)
    config.loss = "softmax_xent"
    config.label_smoothing = 0.0
    config.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            momentum=0.9,
            nesterov=False,
            weight_decay=0.0,
            decay_unscaled=True,
            weight_decay_exclude=r"(.*bias$)|(.*scale$)|(.*posemb.*)|(.*cls_token.*)|(.*probe.*)",
            mu_dtype=config_dict.placeholder(str),
            clip_global_norm=1.0,
            lr_mults=(),
            freeze="",
            grad_accum_steps=1,
        )
    )
    config.schedule = ml_collections.ConfigDict(
        dict(
            base_lr=1e-3,
            warmup_steps=10_000,
            decay="linear",
            end_lr=0.0,
            rsqrt_timescale=10_000,
            cooldown_steps=0,
        )
    )
    config.mixup = ml_collections.ConfigDict(
        dict(mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5)
    )
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    config.sharding_rules = "fsdp_tp"
    config.log_every_steps = 50
    config.eval_every_steps = 1000
    config.checkpoint = ml_collections.ConfigDict(
        dict(every_steps=1000, keep=3, keep_every=config_dict.placeholder(int), async_save=True)
    )
    config.init_from = ml_collections.ConfigDict(
        dict(path="", head="auto", posemb_interpolation="bilinear")
    )
    config.fewshot = ml_collections.ConfigDict(
        dict(
            datasets=(),
            shots=(1, 5, 10, 25),
            every_steps=config_dict.placeholder(int),
            max_train_examples=10_000,
        )
    )
    config.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=5))
    config.peak_flops_per_device = config_dict.placeholder(float)
    # A step whose loss or gradients are not finite: "stop" the run, or "skip" it (no
    # update, counted); `max_consecutive_skips` skipped steps in a row stop the run.
    config.on_nonfinite = "stop"
    config.max_consecutive_skips = 10
    return config


def demo_config() -> ml_collections.ConfigDict:
    """The README's default job: a small ViT on the embedded 8x8 digits, CPU-sized."""
    config = base_config()
    config.model_name = "ViT-Ti/4"
    config.model = model_config(
        img_size=16,
        width=96,
        depth=6,
        mlp_dim=384,
        num_heads=3,
        pool_type="gap",
        posemb="learn",
    )
    config.dataset = "digits"
    config.data = data.get_data_config("digits", image_size=16)
    config.batch_size = 128
    config.eval_batch_size = 512
    config.total_steps = 1000
    config.optim.update(name="adamw", weight_decay=1e-4, clip_global_norm=1.0)
    config.schedule.update(base_lr=2e-3, warmup_steps=100, decay="cosine")
    config.mesh.update(data=-1)
    config.log_every_steps = 100
    config.eval_every_steps = 500
    config.checkpoint.update(every_steps=500, keep=2)
    return config


def apply_recipe(config: ml_collections.ConfigDict, recipe: str) -> None:
    """The paper's pre-training settings or the release's fine-tuning settings."""
    size = config.model_name.split("-")[-1].split("/")[0]
    if recipe == "pretrain":
        multi_label = bool(config.data.multi_label) or config.dataset == "imagenet21k"
        config.batch_size = 4096
        config.optim.update(
            name="adamw",
            b1=0.9,
            b2=0.999,
            clip_global_norm=1.0,
            decay_unscaled=True,
            weight_decay=0.03,
        )
        config.schedule.update(
            base_lr=4e-4 if size in ("L", "H", "g", "G") else 1e-3,
            warmup_steps=10_000,
            decay="linear",
        )
        config.model.update(img_size=224, dropout=0.1 if config.dataset == "imagenet21k" else 0.0)
        config.model.representation_size = _width(config.model_name)
        if multi_label:
            config.loss = "sigmoid_xent"
            config.model.head_bias_init = -10.0
        if config.dataset == "jft":
            config.optim.weight_decay = 0.1
            config.num_epochs = 7
        elif config.dataset == "imagenet21k":
            config.num_epochs = 90
        elif config.dataset == "imagenet2012":
            # "Better plain ViT baselines": S/16 reaches 76.5% top-1 in 90 epochs.
            config.batch_size = 1024
            config.optim.update(weight_decay=1e-4)
            config.schedule.update(base_lr=1e-3, decay="cosine")
            config.model.update(pool_type="gap", posemb="sincos2d", representation_size=None)
            config.mixup.mixup_alpha = 0.2
            config.num_epochs = 90
        else:
            config.num_epochs = 300
        config.checkpoint.every_steps = 1000
        config.eval_every_steps = 5000
    elif recipe == "finetune":
        config.batch_size = 512
        config.optim.update(name="sgd", momentum=0.9, weight_decay=0.0, clip_global_norm=1.0)
        config.schedule.update(base_lr=0.01, warmup_steps=500, decay="cosine")
        config.model.update(img_size=384, head_zero_init=True)
        config.total_steps = 20_000 if config.dataset == "imagenet2012" else 10_000
        if config.dataset.startswith("vtab"):
            config.total_steps = 2_500
        config.eval_every_steps = 1000
    else:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {list(RECIPES)}")
    config.data = data.get_data_config(config.dataset, image_size=config.model.img_size)


def _width(model_name: str) -> int:
    from vit_jax.models.registry import VIT_SIZES

    size = model_name.split("-")[-1].split("/")[0]
    return VIT_SIZES[size]["width"] if size in VIT_SIZES else 768


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """`arg` = '' (the demo) or '<model>,<dataset>,<recipe>'."""
    if not arg:
        config = demo_config()
    else:
        parts = [p.strip() for p in arg.split(",")]
        if len(parts) != 3:
            raise ValueError(
                f"config argument {arg!r} must be '<model>,<dataset>,<recipe>', "
                "e.g. 'B/16,cifar10,finetune'"
            )
        model, dataset, recipe = parts
        config = base_config()
        config.model_name = model if "-" in model else f"ViT-{model}"
        config.dataset = dataset
        config.data = data.get_data_config(dataset)
        apply_recipe(config, recipe)
        _drop_inapplicable_model_fields(config)
    config.lock()
    return config


def _drop_inapplicable_model_fields(config: ml_collections.ConfigDict) -> None:
    """Recipe defaults that the chosen model does not take (e.g. `posemb` for a Mixer)."""
    from vit_jax.models import valid_overrides

    accepted = set(valid_overrides(config.model_name))
    for field in config.model:
        if field not in accepted:
            config.model[field] = None
