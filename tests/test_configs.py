"""Configs: the recipes reproduce the papers' and the release's settings; every preset loads;
every leaf of every config is overridable with its own type through the CLI's parser."""

import pytest
from flax import nnx

from configs import recipes
from configs.vit import build, get_config
from tests.data_fixtures.images import write_folder
from vit_jax import config_loader, data
from vit_jax.errors import UserError
from vit_jax.models import create_model, valid_overrides


def test_pretrain_recipe_follows_table_3_of_the_paper():
    b16 = get_config("B/16,imagenet21k,pretrain")
    assert (b16.num_epochs, b16.schedule.base_lr, b16.optim.weight_decay) == (90, 1e-3, 0.03)
    assert b16.model.dropout == 0.1 and b16.schedule.decay == "linear"
    assert b16.batch_size == 4096
    assert (b16.optim.name, b16.optim.b1, b16.optim.b2) == ("adamw", 0.9, 0.999)
    assert b16.optim.clip_global_norm == 1.0 and b16.schedule.warmup_steps == 10_000
    # The paper's weight decay is AdamW's: scaled by the learning rate.
    assert not b16.optim.decay_unscaled
    assert b16.loss == "sigmoid_xent" and b16.model.head_bias_init == -10.0
    assert b16.model.representation_size == 768 and b16.model.img_size == 224
    h14 = get_config("H/14,jft,pretrain")
    assert (h14.num_epochs, h14.schedule.base_lr, h14.optim.weight_decay) == (14, 3e-4, 0.1)
    assert h14.model.dropout == 0.0 and h14.model.representation_size == 1280
    i1k = get_config("S/16,imagenet2012,pretrain")
    assert (i1k.num_epochs, i1k.schedule.base_lr, i1k.optim.weight_decay) == (300, 3e-3, 0.3)
    assert i1k.schedule.decay == "cosine" and i1k.model.dropout == 0.1
    assert i1k.loss == "softmax_xent"
    l32 = get_config("L/32,jft,pretrain")
    assert l32.schedule.base_lr == 6e-4 and l32.num_epochs == 7


def test_pretrain_rows_name_their_source_and_fall_back_to_the_nearest():
    assert recipes.paper_row_source("ViT-H/14", "jft") == "ViT paper Table 3, row ViT-H/14 on jft"
    nearest = recipes.paper_row_source("ViT-g/14", "jft")
    assert "ViT-H/14" in nearest and "nearest" in nearest  # widest row in the table
    assert recipes.paper_row("ViT-Ti/16", "cifar10")[1] == "imagenet2012"


def test_plain_baseline_recipe_is_the_better_plain_vit_baseline():
    config = get_config("S/16,imagenet2012,plain_baseline")
    assert config.batch_size == 1024 and config.optim.weight_decay == 1e-4
    assert config.optim.decay_unscaled  # big_vision's unscaled decay
    assert (config.model.pool_type, config.model.posemb) == ("gap", "sincos2d")
    assert config.mixup.mixup_alpha == 0.2 and config.schedule.decay == "cosine"
    assert "randaug(2, 10)" in config.data.train.pp
    assert config.loss == "softmax_xent" and config.num_epochs == 90


def test_finetune_recipes_follow_the_release():
    config = get_config("B/16,cifar10,finetune")
    optim = config.optim
    assert (optim.name, optim.momentum, optim.weight_decay) == ("sgd", 0.9, 0.0)
    assert config.batch_size == 512 and config.optim.clip_global_norm == 1.0
    assert (config.schedule.decay, config.schedule.warmup_steps) == ("cosine", 500)
    assert config.model.img_size == 384 and config.model.head_zero_init
    assert config.data.image_size == 384 and config.total_steps == 10_000
    assert get_config("B/16,imagenet2012,finetune").total_steps == 20_000
    assert get_config("B/16,oxford_iiit_pet,finetune").total_steps == 500
    assert get_config("B/16,vtab/dtd,finetune").total_steps == 2_500
    assert get_config("L/16,cifar10,finetune").model.dropout == 0.1
    short = get_config("B/16,cifar10,finetune_short")
    assert short.total_steps == 500 and short.optim.name == "sgd"
    assert short.schedule.warmup_steps < short.total_steps


def test_small_recipe_is_the_demo():
    demo = get_config()
    assert (demo.model_name, demo.dataset, demo.recipe) == ("ViT-mu/4", "digits", "small")
    assert (demo.model.width, demo.model.depth, demo.model.img_size) == (96, 6, 16)
    assert demo.total_steps == 1000 and demo.batch_size == 128
    assert demo.data.image_size == 16 and data.num_classes(demo.data) == 10


@pytest.mark.parametrize("model", ["Ti/16", "R50+ViT-B/16", "Mixer-B/16"])
@pytest.mark.parametrize("dataset", ["imagenet2012", "cifar100", "vtab/dtd", "jft"])
def test_every_model_family_and_preset_builds_a_consistent_config(model, dataset):
    for recipe in recipes.RECIPES:
        config = get_config(f"{model},{dataset},{recipe}")
        assert set(config.model.keys()) <= set(valid_overrides(config.model_name))
        assert config.data.image_size == config.model.img_size


def test_model_fields_carry_the_models_real_defaults():
    config = get_config("B/16,cifar10,finetune")
    model = nnx.eval_shape(
        lambda: create_model(config.model_name, num_classes=10, **config.model.to_dict())
    )
    assert model.width == 768 and model.depth == 12 and model.patch_size == 16
    assert config.model.pool_type == "tok" and config.model.posemb == "learn"
    assert config.model.representation_size is None  # a typed placeholder
    assert config_loader.field_type(config, "model.representation_size") == (int, True)


def test_config_is_locked_and_arguments_are_checked():
    config = get_config()
    with pytest.raises(AttributeError, match="total_steps"):
        config.totl_steps = 3
    with pytest.raises(ValueError, match="<model>,<dataset>,<recipe>"):
        get_config("B/16,cifar10")
    with pytest.raises(ValueError, match="unknown recipe"):
        get_config("B/16,cifar10,distil")
    with pytest.raises(ValueError, match="unknown data preset"):
        get_config("B/16,cifar11,finetune")


# --- every leaf through the command-line parser ----------------------------------------


def _text(value) -> str:
    """How a user types `value` on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "None"
    return value if isinstance(value, str) else repr(value)


def _changed(value, kind, field=""):
    """A different value of the same type (strings stay: any text is a valid string; an
    empty tuple gains an item of the type its field takes)."""
    if kind is bool:
        return not value
    if kind is int:
        return (value or 0) + 3
    if kind is float:
        return (value or 0.0) * 2 + 0.5
    if kind is tuple:
        if value:
            return (*value, value[0])
        return (config_loader.TUPLE_ITEM_TYPES.get(field, str)(16),)
    return value


def _all_presets(folder_root: str) -> list[str]:
    names = [n for n in data.preset_names() if not n.endswith(">")]
    return [*names, "tfds:food101", f"folder:{folder_root}"]


def test_every_leaf_of_every_recipe_and_preset_parses_with_its_type(tmp_path):
    write_folder(str(tmp_path / "images"), {"train": {"a": 2, "b": 2}, "test": {"a": 1}})
    checked = 0
    for recipe in recipes.RECIPES:
        for dataset in _all_presets(str(tmp_path / "images")):
            config = build("ViT-B/16", dataset, recipe)
            spec = f"vit:B/16,{dataset},{recipe}"
            expected, overrides = {}, []
            for field in config_loader.leaf_paths(config):
                if field in config_loader.DERIVED:
                    continue
                kind, optional = config_loader.field_type(config, field)
                value = _lookup(config, field)
                assert kind is not type(None), f"{spec}: config.{field} has no type"
                new = value if field in config_loader.SOURCES else _changed(value, kind, field)
                if optional and value is not None and field not in config_loader.SOURCES:
                    new = None  # an optional field set back to None
                expected[field] = new
                overrides.append(f"{field}={_text(new)}")
            result = config_loader.load_config(spec, overrides)
            for field, value in expected.items():
                assert _lookup(result, field) == value, (spec, field)
                checked += 1
    assert checked > 10_000  # 5 recipes x ~50 presets x ~80 leaves


def _lookup(config, field):
    for part in field.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize(
    "override, value",
    [
        ("fewshot.shots=1,5, 10", (1, 5, 10)),
        ("fewshot.shots=(2,)", (2,)),
        ("fewshot.datasets=cifar10,vtab/dtd", ("cifar10", "vtab/dtd")),
        ("fewshot.datasets=()", ()),
        ("optim.lr_mults=(('head.*', 10.0), ('.*', 0.5))", (("head.*", 10.0), (".*", 0.5))),
        ("total_steps=1e4", 10_000),
        ("total_steps=10_000", 10_000),
        ("schedule.base_lr=3e-3", 3e-3),
        ("optim.clip_global_norm=2", 2.0),
        ("model.scan=True", True),
        ("model.scan=no", False),
        ("model.scan", True),
        ("model.dtype=bfloat16", "bfloat16"),
        ("model.dtype=None", None),
        ("model.representation_size=768", 768),
        ("model.remat=none", "none"),  # a string value, not None
        ("data.data_dir=/data/x", "/data/x"),
        ("data.train.shuffle_buffer=100", 100),
        ("init_from.path=/a=b.npz", "/a=b.npz"),
    ],
)
def test_override_syntax(override, value):
    config = config_loader.load_config("vit", [override])
    assert _lookup(config, override.split("=")[0]) == value


@pytest.mark.parametrize(
    "override, message",
    [
        ("total_steps=ten", "config.total_steps='ten' is not a valid int"),
        ("total_steps=1.5", "not a whole number"),
        ("model.scan=maybe", "is not a valid bool (use true or false)"),
        ("batch_size=None", "config.batch_size cannot be None"),
        ("batch_size", "--config.batch_size needs a value (int)"),
        ("totl_steps=3", "unknown config field 'totl_steps'. Did you mean total_steps"),
        ("optim.wieght_decay=0.1", "Did you mean optim.weight_decay"),
        ("model=3", "config.model is a group of fields"),
        ("data.image_size=32", "config.data.image_size follows config.model.img_size"),
        ("data.name=cifar10", "config.data.name follows config.dataset"),
        ("dataset=cifar11", "config.dataset: unknown data preset 'cifar11'"),
        ("recipe=distil", "config.recipe: unknown recipe 'distil'"),
        ("model_name=ViT-X/16", "config.model_name: unknown model 'ViT-X/16'"),
        ("fewshot.shots=1,x", "config.fewshot.shots='1,x' is not a valid tuple"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(UserError, match=None) as info:
        config_loader.load_config("vit", [override])
    assert message in str(info.value)


def test_a_mixer_refuses_vit_settings_with_its_own_list():
    with pytest.raises(UserError) as info:
        config_loader.load_config("vit", ["model_name=Mixer-B/16", "model.posemb=learn"])
    assert "Mixer-B/16 has no such setting" in str(info.value)
    assert "tokens_mlp_dim" in str(info.value)


def test_sources_rebuild_what_depends_on_them(tmp_path):
    write_folder(str(tmp_path / "faces"), {"train": {"a": 3, "b": 3}, "test": {"a": 2}})
    root = str(tmp_path / "faces")
    # Order does not matter: the source is applied first, the other overrides on top.
    config = config_loader.load_config(
        "vit", ["data.data_dir=" + root, f"dataset=folder:{root}", "model.img_size=24"]
    )
    assert config.dataset == config.data.name == f"folder:{root}"
    assert config.data.train.source == "folder" and config.data.data_dir == root
    assert config.model.img_size == config.data.image_size == 24
    assert data.num_classes(config.data) == 2
    assert config.model_name == "ViT-mu/4" and config.recipe == "small"

    cifar = config_loader.load_config("vit", ["dataset=cifar100"])
    assert cifar.data.num_classes == 100 and cifar.model.img_size == 32  # the small recipe
    finetune = config_loader.load_config("vit:B/16,cifar10,finetune", ["dataset=imagenet2012"])
    assert finetune.total_steps == 20_000  # a recipe value that depends on the dataset
    assert finetune.data.num_classes == 1000
    mixer = config_loader.load_config("vit:B/16,cifar10,finetune", ["model_name=Mixer-B/16"])
    assert "posemb" not in mixer.model and mixer.model.tokens_mlp_dim == 384
    assert mixer.model.img_size == mixer.data.image_size == 384
    resized = config_loader.load_config("vit:B/16,cifar10,finetune", ["model.img_size=224"])
    assert resized.data.image_size == 224


def test_folder_of_class_folders_holds_out_a_validation_slice(tmp_path):
    write_folder(str(tmp_path / "x"), {"unused": {"cat": 10, "dog": 10}})
    root = tmp_path / "x" / "unused"  # root/<class>/*.png, no split folders
    config = data.get_data_config(f"folder:{root}")
    assert config.train.split == "all[:90%]" and config.evals.val.split == "all[90%:]"
    assert data.num_classes(config) == 2
    assert data.num_examples(config, "train") + data.num_examples(config, "val") == 20


def test_configs_are_found_by_name_and_by_path_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: configs/vit.py is not here
    by_name = config_loader.load_config("vit:B/16,cifar10,finetune")
    by_path = config_loader.load_config("configs/vit.py:B/16,cifar10,finetune")
    assert by_name.to_dict() == by_path.to_dict()
    own = tmp_path / "mine.py"
    own.write_text(
        "from configs.vit import build\n"
        "def get_config(arg=''):\n"
        "    return build('S/16', 'cifar10', 'finetune')\n"
    )
    assert config_loader.load_config(str(own)).model_name == "ViT-S/16"
    with pytest.raises(UserError, match="has no build"):
        config_loader.load_config(str(own), ["dataset=cifar100"])
    with pytest.raises(UserError, match="named configs: vit"):
        config_loader.load_config("nope.py")
