"""Presets: names, identical field sets, overrides and template filling."""

import ml_collections
import pytest

from vit_jax import data
from vit_jax.data import presets
from vit_jax.data.pp_parse import parse_pp
from vit_jax.data.registry import known_ops

FIXED = [
    "digits",
    "imagenet2012",
    "imagenet21k",
    "jft",
    "cifar10",
    "cifar100",
    "oxford_iiit_pet",
    "oxford_flowers102",
    "tfds:food101",
]
VTAB = [f"vtab/{t}" for t in presets.VTAB_TASKS]
TOP = {"name", "data_dir", "num_classes", "multi_label", "image_size", "train", "evals"}
SPLIT = {
    "source",
    "name",
    "split",
    "data_dir",
    "pp",
    "shuffle_buffer",
    "cache",
    "on_bad_image",
    "heldout_examples",
    "mask_empty_labels",
}


@pytest.mark.parametrize("name", FIXED + VTAB + [v + "/hparam" for v in VTAB])
def test_every_preset_has_the_same_fields_and_valid_pp(name):
    cfg = data.get_data_config(name)
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert set(cfg) == TOP
    for split in [cfg.train, *cfg.evals.values()]:
        # Source-specific fields: JFT-like shards choose how many files a round interleaves.
        assert set(split) == SPLIT | ({"cycle_length"} if split.source == "jft" else set())
        assert split.source in {"tfds", "folder", "imagenet21k", "jft", "digits"}
        for op in parse_pp(split.pp.format(image_size=1, resize_size=1, pad=1, num_classes=1)):
            assert op.name in known_ops()
    assert "onehot" in cfg.train.pp and len(cfg.evals) >= 1


def test_vtab_protocol_splits():
    final = data.get_data_config("vtab/cifar100")
    hparam = data.get_data_config("vtab/cifar100/hparam")
    assert final.train.split == "train[:800]+train[45000:45200]"
    assert hparam.train.split == "train[:800]"
    assert hparam.evals.val.split == "train[45000:45200]" and final.evals.test.split == "test"
    assert final.num_classes == 100
    assert data.get_data_config("vtab/dsprites_orientation").num_classes == 16
    assert "clevr_count_label" in data.get_data_config("vtab/clevr_count").train.pp


def test_imagenet_evals_include_real_and_v2():
    cfg = data.get_data_config("imagenet2012")
    assert cfg.evals.real.name == "imagenet2012_real" and cfg.evals.real.mask_empty_labels
    assert "multi=True" in cfg.evals.real.pp
    assert cfg.evals.v2.name == "imagenet_v2"
    assert data.get_data_config("jft").multi_label and not cfg.multi_label


def test_unknown_preset_lists_presets():
    with pytest.raises(
        ValueError, match="unknown data preset 'imagenet'.*cifar10.*vtab/<task>.*dtd"
    ):
        data.get_data_config("imagenet")
    with pytest.raises(ValueError, match="unknown VTAB preset"):
        data.get_data_config("vtab/nope")


def test_overrides_merge_and_unknown_fields_fail():
    cfg = data.get_data_config(
        "digits",
        image_size=20,
        train={"split": "train[:50%]"},
        evals={"extra": {"split": "train[50%:]"}},
    )
    assert cfg.image_size == 20 and cfg.train.split == "train[:50%]"
    assert cfg.train.source == "digits" and cfg.evals.extra.source == "digits"
    assert data.num_examples(cfg, "extra") + data.num_examples(cfg) == data.num_examples(
        data.get_data_config("digits")
    )
    with pytest.raises(ValueError, match="unknown data config field 'train.splt'"):
        data.get_data_config("digits", train={"splt": "x"})


def test_templates_follow_image_size_and_num_classes():
    cfg = data.get_data_config("imagenet2012", image_size=384, num_classes=10)
    assert data.format_pp(cfg.evals.val.pp, cfg) == (
        "decode|resize_small(439)|central_crop(384)|value_range(-1, 1)|onehot(10)"
    )
    cfg.train.pp = "resize({image_sise})"
    with pytest.raises(data.DataError, match="unknown placeholder"):
        data.format_pp(cfg.train.pp, cfg)


def test_config_can_be_locked_and_overridden_like_the_trainer_does():
    cfg = data.get_data_config("digits")
    cfg.lock()
    cfg.train.shuffle_buffer = 10
    with pytest.raises(AttributeError):
        cfg.train.new_field = 1
