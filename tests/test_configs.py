"""Configs: the recipes reproduce the paper's and the release's settings; every preset loads."""

import pytest

from configs.vit import get_config
from vit_jax import data
from vit_jax.models import valid_overrides


def test_pretrain_recipe_follows_the_paper():
    config = get_config("B/16,imagenet21k,pretrain")
    assert config.model_name == "ViT-B/16"
    assert config.batch_size == 4096
    assert (config.optim.name, config.optim.b1, config.optim.b2) == ("adamw", 0.9, 0.999)
    assert config.optim.weight_decay == 0.03 and config.optim.decay_unscaled
    assert config.optim.clip_global_norm == 1.0
    assert (config.schedule.warmup_steps, config.schedule.decay) == (10_000, "linear")
    assert config.loss == "sigmoid_xent" and config.model.head_bias_init == -10.0
    assert config.model.representation_size == 768 and config.model.img_size == 224
    assert config.model.dropout == 0.1
    jft = get_config("L/16,jft,pretrain")
    assert jft.optim.weight_decay == 0.1 and jft.schedule.base_lr == 4e-4


def test_imagenet_from_scratch_recipe_is_the_plain_vit_baseline():
    config = get_config("S/16,imagenet2012,pretrain")
    assert config.batch_size == 1024 and config.optim.weight_decay == 1e-4
    assert (config.model.pool_type, config.model.posemb) == ("gap", "sincos2d")
    assert config.mixup.mixup_alpha == 0.2 and config.schedule.decay == "cosine"
    assert config.loss == "softmax_xent" and config.num_epochs == 90


def test_finetune_recipe_follows_the_release():
    config = get_config("B/16,cifar10,finetune")
    assert (config.optim.name, config.optim.momentum, config.optim.weight_decay) == (
        "sgd",
        0.9,
        0.0,
    )
    assert config.batch_size == 512 and config.optim.clip_global_norm == 1.0
    assert (config.schedule.decay, config.schedule.warmup_steps) == ("cosine", 500)
    assert config.model.img_size == 384 and config.model.head_zero_init
    assert config.data.image_size == 384 and config.total_steps == 10_000
    assert get_config("B/16,imagenet2012,finetune").total_steps == 20_000


@pytest.mark.parametrize("model", ["Ti/16", "R50+ViT-B/16", "Mixer-B/16"])
@pytest.mark.parametrize("dataset", ["imagenet2012", "cifar100", "vtab/dtd", "jft"])
def test_every_model_family_and_preset_builds_a_consistent_config(model, dataset):
    for recipe in ("pretrain", "finetune"):
        config = get_config(f"{model},{dataset},{recipe}")
        accepted = set(valid_overrides(config.model_name))
        set_fields = {k for k, v in config.model.items() if v is not None}
        assert set_fields <= accepted  # nothing the model would refuse
        assert config.data.image_size == config.model.img_size


def test_config_is_locked_and_arguments_are_checked():
    config = get_config()
    with pytest.raises(AttributeError, match="total_steps"):
        config.totl_steps = 3
    with pytest.raises(ValueError, match="<model>,<dataset>,<recipe>"):
        get_config("B/16,cifar10")
    with pytest.raises(ValueError, match="unknown recipe"):
        get_config("B/16,cifar10,distill")
    with pytest.raises(ValueError, match="unknown data preset"):
        get_config("B/16,cifar11,finetune")
    assert data.num_classes(config.data) == 10
