"""Training recipes as data: the values each recipe sets, and where they come from.

A recipe maps `(model_name, dataset)` to dotted config fields (`"optim.name": "sgd"`).
`model.*` values a model does not take (a Mixer has no `posemb`) are left out by the
config builder. Sources:

- `pretrain`: "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021), section 4.1 and
  Table 3 (per model and dataset: epochs, base learning rate, decay, weight decay, dropout).
  Adam (0.9, 0.999), batch 4096, 10k warmup steps, clipping at global norm 1, 224 px,
  a representation layer of the model's width, sigmoid loss on multi-label data.
- `plain_baseline`: "Better plain ViT baselines for ImageNet-1k" (Beyer et al., 2022):
  batch 1024, Adam lr 1e-3, weight decay 1e-4 (not scaled by the lr), 10k warmup, cosine,
  RandAugment(2, 10) and mixup 0.2, global average pooling, 2-D sin-cos position embedding,
  90 epochs (ViT-S/16: 76.5% top-1).
- `finetune`: the paper's appendix B.1.1 and the public release: SGD momentum 0.9, no weight
  decay, batch 512, clipping at 1, cosine decay, 500 warmup steps, 384 px, zero-initialised
  head; 20k steps for ImageNet, 10k for CIFAR, 500 for Pets and Flowers, 2.5k for VTAB.
- `finetune_short`: `finetune` over 500 steps, for quick results (the release reports
  98.59% on CIFAR-10 for ViT-B/16 after 500 steps).
- `small`: this project's from-scratch recipe for small datasets on a CPU (the demo):
  AdamW 2e-3, cosine, 100 warmup steps, 1000 steps of batch 128, gap pooling, 16 px for
  the 8x8 digits and 32 px otherwise.
- `distill`: "Knowledge distillation: a good teacher is patient and consistent" (Beyer et
  al., 2022), function matching: the student learns from the teacher alone (distillation
  weight 1, temperature 1, `config.distill.teacher` required) on exactly the images the
  teacher sees, mixup with uniform mixing coefficients (alpha 1, the paper's public
  configs) to widen the inputs the two functions are matched on, and a long ("patient")
  schedule. The optimizer and the rest are the from-scratch recipe of the data's scale, so
  the student is trained as it would be on labels: `small` on CPU-sized data (a preset of
  at most 32 px, the digits), there over 3,000 steps (3x `small`; more keeps helping, as in
  the paper); `plain_baseline` otherwise, without RandAugment (the paper's students see
  inception crop, flip and mixup only) and over 1,200 epochs (the paper's ImageNet
  schedules run from 30 to 9,600 epochs and the student improves all the way).
"""

from __future__ import annotations

from typing import Any

RECIPES = ("small", "pretrain", "plain_baseline", "finetune", "finetune_short", "distill")

# The ViT paper's Table 3: (models, dataset, epochs, base lr, lr decay, weight decay, dropout).
# Weight decay is in the paper's (AdamW) form: the update is scaled by the learning rate.
# "*" stands for every model. Where the paper gives two epoch counts (ViT-L/16 on JFT: 7/14,
# ViT-L on ImageNet-21k: 30/90) the row holds the longer-trained model's.
PAPER_TABLE_3 = (
    (("ViT-B/16", "ViT-B/32"), "jft", 7, 8e-4, "linear", 0.1, 0.0),
    (("ViT-L/32",), "jft", 7, 6e-4, "linear", 0.1, 0.0),
    (("ViT-L/16",), "jft", 14, 4e-4, "linear", 0.1, 0.0),
    (("ViT-H/14",), "jft", 14, 3e-4, "linear", 0.1, 0.0),
    (("R50+ViT-B/16", "R50+ViT-B/32"), "jft", 7, 8e-4, "linear", 0.1, 0.0),
    (("R50+ViT-L/32",), "jft", 7, 2e-4, "linear", 0.1, 0.0),
    (("R50+ViT-L/16",), "jft", 14, 4e-4, "linear", 0.1, 0.0),
    (("ViT-B/16", "ViT-B/32"), "imagenet21k", 90, 1e-3, "linear", 0.03, 0.1),
    (("ViT-L/16", "ViT-L/32"), "imagenet21k", 90, 1e-3, "linear", 0.03, 0.1),
    (("*",), "imagenet2012", 300, 3e-3, "cosine", 0.3, 0.1),
)
MULTI_LABEL_DATASETS = ("jft", "imagenet21k")
FINETUNE_STEPS = {
    "imagenet2012": 20_000,
    "cifar10": 10_000,
    "cifar100": 10_000,
    "oxford_iiit_pet": 500,
    "oxford_flowers102": 500,
}
VTAB_FINETUNE_STEPS = 2_500
DEFAULT_FINETUNE_STEPS = 10_000


def paper_row(model_name: str, dataset: str) -> tuple:
    """The Table 3 row for this model and dataset, else the nearest one.

    Nearest: the same dataset's row for the model of closest width; datasets the paper
    did not pre-train on use the ImageNet row (its from-scratch recipe).
    """
    rows = [r for r in PAPER_TABLE_3 if r[1] == dataset] or [
        r for r in PAPER_TABLE_3 if r[1] == "imagenet2012"
    ]
    for row in rows:
        if model_name in row[0] or "*" in row[0]:
            return row
    width = _width(model_name)
    return min(rows, key=lambda r: abs(_width(r[0][0]) - width))


def paper_row_source(model_name: str, dataset: str) -> str:
    """Where the pretrain values for this pair come from, in words."""
    models, row_dataset, *_ = paper_row(model_name, dataset)
    exact = row_dataset == dataset and (model_name in models or "*" in models)
    where = f"ViT paper Table 3, row {'/'.join(models)} on {row_dataset}"
    return where if exact else where + f" (nearest to {model_name} on {dataset})"


def _width(model_name: str) -> int:
    from vit_jax.models import model_defaults

    return int(model_defaults(model_name)["width"])


def small(model_name: str, dataset: str, preset_image_size: int) -> dict[str, Any]:
    return {
        "model.img_size": min(preset_image_size, 32),
        "model.pool_type": "gap",
        "batch_size": 128,
        "eval_batch_size": 512,
        "total_steps": 1000,
        "optim.name": "adamw",
        "optim.weight_decay": 1e-4,
        "optim.decay_unscaled": True,
        "optim.clip_global_norm": 1.0,
        "schedule.base_lr": 2e-3,
        "schedule.warmup_steps": 100,
        "schedule.decay": "cosine",
        "log_every_steps": 100,
        "eval_every_steps": 500,
        "checkpoint.every_steps": 500,
        "checkpoint.keep": 2,
    }


def pretrain(model_name: str, dataset: str, preset_image_size: int) -> dict[str, Any]:
    _, _, epochs, base_lr, decay, weight_decay, dropout = paper_row(model_name, dataset)
    values = {
        "model.img_size": 224,
        "model.dropout": dropout,
        "model.representation_size": _width(model_name),
        "batch_size": 4096,
        "eval_batch_size": 4096,
        "num_epochs": float(epochs),
        "optim.name": "adamw",
        "optim.b1": 0.9,
        "optim.b2": 0.999,
        "optim.weight_decay": weight_decay,
        "optim.decay_unscaled": False,
        "optim.clip_global_norm": 1.0,
        "schedule.base_lr": base_lr,
        "schedule.warmup_steps": 10_000,
        "schedule.decay": decay,
        "checkpoint.every_steps": 1000,
        "eval_every_steps": 5000,
    }
    if dataset in MULTI_LABEL_DATASETS:
        values.update({"loss": "sigmoid_xent", "model.head_bias_init": -10.0})
    return values


def plain_baseline(model_name: str, dataset: str, preset_image_size: int) -> dict[str, Any]:
    return {
        "model.img_size": 224,
        "model.pool_type": "gap",
        "model.posemb": "sincos2d",
        "model.head_zero_init": True,
        "batch_size": 1024,
        "eval_batch_size": 1024,
        "num_epochs": 90.0,
        "optim.name": "adamw",
        "optim.b1": 0.9,
        "optim.b2": 0.999,
        "optim.weight_decay": 1e-4,
        "optim.decay_unscaled": True,
        "optim.clip_global_norm": 1.0,
        "schedule.base_lr": 1e-3,
        "schedule.warmup_steps": 10_000,
        "schedule.decay": "cosine",
        "mixup.mixup_alpha": 0.2,
        "data.train.pp": "decode_jpeg_and_inception_crop({image_size})|flip_lr|randaug(2, 10)"
        "|value_range(-1, 1)|onehot({num_classes})",
        "checkpoint.every_steps": 1000,
        "eval_every_steps": 5000,
    }


def finetune(model_name: str, dataset: str, preset_image_size: int) -> dict[str, Any]:
    if dataset.startswith("vtab/"):
        steps = VTAB_FINETUNE_STEPS
    else:
        steps = FINETUNE_STEPS.get(dataset, DEFAULT_FINETUNE_STEPS)
    size = model_name.split("-")[-1].split("/")[0]
    return {
        "model.img_size": 384,
        "model.head_zero_init": True,
        # The release's fine-tuning configs use dropout 0.1 for the large models.
        "model.dropout": 0.1 if size in ("L", "H") else 0.0,
        "batch_size": 512,
        "eval_batch_size": 512,
        "total_steps": steps,
        "optim.name": "sgd",
        "optim.momentum": 0.9,
        "optim.weight_decay": 0.0,
        "optim.clip_global_norm": 1.0,
        "schedule.base_lr": 0.01,
        "schedule.warmup_steps": 500,
        "schedule.decay": "cosine",
        "eval_every_steps": 1000,
        "checkpoint.every_steps": 1000,
    }


def finetune_short(model_name: str, dataset: str, preset_image_size: int) -> dict[str, Any]:
    return {
        **finetune(model_name, dataset, preset_image_size),
        "total_steps": 500,
        "schedule.base_lr": 0.03,
        "schedule.warmup_steps": 50,
        "eval_every_steps": 250,
        "checkpoint.every_steps": 250,
    }


# Function matching (`distill`): the student learns from the teacher alone, at temperature 1.
DISTILL_VALUES = {"distill.weight": 1.0, "distill.temperature": 1.0, "mixup.mixup_alpha": 1.0}
DISTILL_SMALL_STEPS = 3000  # 3x `small`: distillation wants a long schedule
DISTILL_EPOCHS = 1200.0


def distill(model_name: str, dataset: str, preset_image_size: int) -> dict[str, Any]:
    if preset_image_size <= 32:  # CPU-sized data (the digits): `small`, 3x as long
        return {
            **small(model_name, dataset, preset_image_size),
            **DISTILL_VALUES,
            "total_steps": DISTILL_SMALL_STEPS,
        }
    values = plain_baseline(model_name, dataset, preset_image_size)
    values["data.train.pp"] = values["data.train.pp"].replace("|randaug(2, 10)", "")
    return {**values, **DISTILL_VALUES, "num_epochs": DISTILL_EPOCHS}


def recipe_values(
    recipe: str, model_name: str, dataset: str, preset_image_size: int
) -> dict[str, Any]:
    """The dotted config values `recipe` sets for this model and dataset."""
    builders = {
        "small": small,
        "pretrain": pretrain,
        "plain_baseline": plain_baseline,
        "finetune": finetune,
        "finetune_short": finetune_short,
        "distill": distill,
    }
    if recipe not in builders:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    return builders[recipe](model_name, dataset, preset_image_size)
