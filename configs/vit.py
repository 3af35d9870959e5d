"""Training configs: `vit:<model>,<dataset>,<recipe>` (or `configs/vit.py:<...>`).

Examples:
  vit                                the demo: `mu/4,digits,small`, a micro ViT on digits
  vit:B/16,cifar10,finetune          fine-tune ViT-B/16 (set config.init_from.path)
  vit:H/14,imagenet21k,pretrain      the paper's Table 3 recipe
  vit:S/16,imagenet2012,plain_baseline
  vit:R50+ViT-B/16,folder:/data/my_images,finetune_short

`<model>` is a zoo name (`ViT-B/16`, `R50+ViT-B/16`, `Mixer-B/16`) or a ViT size (`B/16`);
`<dataset>` a data preset (`vit_jax.data.preset_names()`); `<recipe>` one of
`configs.recipes.RECIPES`. `model_name`, `dataset`, `recipe` and `model.img_size` are the
config's sources: `build` derives everything else from them, and the command line rebuilds
the config when one of them is overridden. The config is locked: no field can be added.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from vit_jax import data
from vit_jax.models import full_name, model_defaults

# Relative: this file is the `configs.vit` module when imported, and a module of the loader's
# private package of this folder when vit_jax.config_loader loads it by path.
from . import recipes

DEMO = ("ViT-mu/4", "digits", "small")
# Model settings whose default is None ("the model decides"), with the type they take.
OPTIONAL_MODEL_FIELDS = {"representation_size": int, "dtype": str, "attention_impl": str}


def base_config() -> ml_collections.ConfigDict:
    """Every field that is not the model's or the data's, with its default."""
    config = ml_collections.ConfigDict()
    config.model_name = DEMO[0]
    config.dataset = DEMO[1]
    config.recipe = DEMO[2]
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
            decay_unscaled=False,
            weight_decay_exclude=(
                r"(.*bias$)|(.*scale$)|(.*posemb.*)|(.*cls_token.*)|(.*probe.*)|(.*registers.*)"
            ),
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
    # The device mesh: `data`, `fsdp`, `model` inside a slice (ICI; one may be -1: the rest),
    # and `dcn_data`, `dcn_fsdp` across slices (DCN: TPU slices, else processes; one may be
    # -1; their product is 1 or the slice count). The mesh axis `data` is dcn_data x data and
    # `fsdp` is dcn_fsdp x fsdp: e.g. dcn_data=2 with fsdp=-1 keeps FSDP inside each slice.
    config.mesh = ml_collections.ConfigDict(dict(dcn_data=1, dcn_fsdp=1, data=-1, fsdp=1, model=1))
    config.sharding_rules = "fsdp_tp"
    config.log_every_steps = 50
    config.eval_every_steps = 1000
    # `resume_step`: resume from this checkpoint step instead of the newest (e.g. the intact
    # step before a damaged one); the later steps are moved to `<workdir>/checkpoints_set_aside`.
    config.checkpoint = ml_collections.ConfigDict(
        dict(
            every_steps=1000,
            keep=3,
            keep_every=config_dict.placeholder(int),
            async_save=True,
            resume_step=config_dict.placeholder(int),
        )
    )
    config.init_from = ml_collections.ConfigDict(
        # params: a run's weight EMA where it kept one ("auto"), "ema" or "raw".
        dict(path="", head="auto", posemb_interpolation="bilinear", params="auto")
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
    # model.param_dtype other than float32 stores the weights themselves in low precision:
    # there is no float32 master copy, so updates smaller than the dtype's resolution are
    # lost. Set True to acknowledge that (validation refuses it otherwise).
    config.low_precision_params_ok = False
    # Weight EMA: 0 keeps none; e.g. 0.9999 keeps a float32 moving average of the parameters
    # (decay held to (1 + step) / (10 + step) early), evaluated next to them as `<eval>_ema`
    # and used by predict, visualize, export and init_from (`--params=raw` for the others).
    config.ema_decay = 0.0
    # Knowledge distillation from a frozen teacher run inside the train step, on the
    # student's augmented batch: loss = (1 - weight) * label loss + weight * T^2 *
    # KL(teacher / T || student / T). weight 0 (the default) trains on labels alone.
    # `teacher`: a training run's directory (local or gs://; `params`: its weight EMA where
    # it kept one, "auto", or "ema" / "raw"), or a public-layout .npz with `teacher_model`
    # (a zoo name) and `teacher_img_size` (0: the student's image size).
    config.distill = ml_collections.ConfigDict(
        dict(
            teacher="",
            teacher_model="",
            teacher_img_size=0,
            params="auto",
            weight=0.0,
            temperature=1.0,
        )
    )
    return config


def model_config(model_name: str) -> ml_collections.ConfigDict:
    """Every setting of `model_name` with its real default; None-defaults are typed."""
    fields = {}
    for name, value in model_defaults(model_name).items():
        if value is None:
            fields[name] = config_dict.placeholder(OPTIONAL_MODEL_FIELDS[name])
        else:
            fields[name] = value
    return ml_collections.ConfigDict(fields)


def build(
    model_name: str = DEMO[0],
    dataset: str = DEMO[1],
    recipe: str = DEMO[2],
    img_size: int | None = None,
) -> ml_collections.ConfigDict:
    """The config for a model, dataset and recipe; `img_size` overrides the recipe's."""
    model_name = full_name(model_name)
    config = base_config()
    config.model_name, config.dataset, config.recipe = model_name, dataset, recipe
    config.model = model_config(model_name)
    preset = data.get_data_config(dataset)
    values = recipes.recipe_values(recipe, model_name, dataset, preset.image_size)
    recipe_size = values.pop("model.img_size", None)
    size = img_size or recipe_size or preset.image_size
    config.model.img_size = size
    config.data = data.get_data_config(dataset, image_size=size)
    for key, value in values.items():
        *parents, leaf = key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        if parents == ["model"] and leaf not in target:
            continue  # a setting this model does not have (e.g. posemb for a Mixer)
        target[leaf] = value
    config.lock()
    return config


def demo_config() -> ml_collections.ConfigDict:
    """The README's default job: a micro ViT on the embedded 8x8 digits, CPU-sized."""
    return build(*DEMO)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """`arg` = '' (the demo) or '<model>,<dataset>,<recipe>'."""
    if not arg:
        return demo_config()
    parts = [p.strip() for p in arg.split(",")]
    if len(parts) != 3 or not all(parts):
        raise ValueError(
            f"config argument {arg!r} must be '<model>,<dataset>,<recipe>', "
            f"e.g. 'B/16,cifar10,finetune'; recipes: {', '.join(recipes.RECIPES)}"
        )
    return build(*parts)
