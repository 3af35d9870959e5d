"""Named data presets: source, splits, class count and train/eval preprocessing.

Every preset returns a ConfigDict with the same fields, so trainers can lock it:
  name, num_classes (None: read from the source), multi_label, image_size,
  train: SPLIT, evals: {eval name: SPLIT}
where SPLIT has: source, name, split, data_dir, pp, shuffle_buffer, cache, on_bad_image,
heldout_examples, mask_empty_labels (and, for JFT-like shards, cycle_length).

pp strings are templates: ``{image_size}``, ``{resize_size}`` (image_size * 8/7), ``{pad}``
(image_size // 8) and ``{num_classes}`` are filled in when the pipeline is built, so
overriding ``image_size`` or ``num_classes`` after ``get_data_config`` takes effect.
"""

import copy
from collections.abc import Callable
from typing import Any

import ml_collections
from ml_collections import config_dict

from vit_jax import storage
from vit_jax.data.sources import DataError, folder, jft

TRAIN_PP = (
    "decode_jpeg_and_inception_crop({image_size})|flip_lr|value_range(-1, 1)|onehot({num_classes})"
)
EVAL_PP = (
    "decode|resize_small({resize_size})|central_crop({image_size})|value_range(-1, 1)"
    "|onehot({num_classes})"
)
LOWRES_TRAIN_PP = (
    "decode|inception_crop({image_size})|flip_lr|value_range(-1, 1)|onehot({num_classes})"
)
RESIZE_EVAL_PP = "decode|resize({image_size})|value_range(-1, 1)|onehot({num_classes})"
DIGITS_TRAIN_PP = (
    "decode(3)|resize({image_size})|random_crop({image_size}, pad={pad})"
    "|value_range(-1, 1)|onehot({num_classes})"
)
DIGITS_EVAL_PP = "decode(3)|resize({image_size})|value_range(-1, 1)|onehot({num_classes})"


def split_config(
    source: str,
    name: str | None,
    split: str,
    pp: str,
    *,
    data_dir: str | None = None,
    shuffle_buffer: int | None = None,
    cache: bool = False,
    on_bad_image: str = "skip",
    heldout_examples: int | None = None,
    mask_empty_labels: bool = False,
) -> ml_collections.ConfigDict:
    """One split's config; the field set is the same for train and eval splits."""
    return ml_collections.ConfigDict(
        {
            "source": source,
            "name": _typed(name, str),
            "split": split,
            "data_dir": _typed(data_dir, str),
            "pp": pp,
            "shuffle_buffer": _typed(shuffle_buffer, int),
            "cache": cache,
            "on_bad_image": on_bad_image,
            "heldout_examples": _typed(heldout_examples, int),
            "mask_empty_labels": mask_empty_labels,
        }
    )


def _typed(value: Any, kind: type) -> Any:
    """`value`, or a typed None (overridable from the command line) when it is None."""
    return config_dict.placeholder(kind) if value is None else value


def data_config(
    name: str,
    *,
    num_classes: int | None,
    image_size: int,
    train: ml_collections.ConfigDict,
    evals: dict[str, ml_collections.ConfigDict],
    multi_label: bool = False,
) -> ml_collections.ConfigDict:
    """Assembles a full data config."""
    return ml_collections.ConfigDict(
        {
            "name": name,
            # Where the data lives (TFDS data_dir, or the root of a folder / ImageNet-21k /
            # JFT-like dataset); a split's own `data_dir` takes precedence.
            "data_dir": config_dict.placeholder(str),
            "num_classes": _typed(num_classes, int),
            "multi_label": multi_label,
            "image_size": image_size,
            "train": train,
            "evals": ml_collections.ConfigDict(evals),
        }
    )


def _tfds(
    name: str,
    train_split: str,
    evals: dict[str, str],
    num_classes: int | None,
    *,
    image_size: int = 224,
    train_pp: str = TRAIN_PP,
    eval_pp: str = EVAL_PP,
    shuffle_buffer: int = 10_000,
    preset: str | None = None,
) -> ml_collections.ConfigDict:
    return data_config(
        preset or name,
        num_classes=num_classes,
        image_size=image_size,
        train=split_config("tfds", name, train_split, train_pp, shuffle_buffer=shuffle_buffer),
        evals={k: split_config("tfds", name, s, eval_pp) for k, s in evals.items()},
    )


def _digits(_: str) -> ml_collections.ConfigDict:
    return data_config(
        "digits",
        num_classes=10,
        image_size=16,
        train=split_config(
            "digits", "digits", "train", DIGITS_TRAIN_PP, shuffle_buffer=2048, cache=True
        ),
        evals={"test": split_config("digits", "digits", "test", DIGITS_EVAL_PP, cache=True)},
    )


def _imagenet2012(_: str) -> ml_collections.ConfigDict:
    cfg = _tfds(
        "imagenet2012",
        "train[:99%]",
        {"minival": "train[99%:]", "val": "validation"},
        1000,
        shuffle_buffer=50_000,
    )
    cfg.evals.real = split_config(
        "tfds",
        "imagenet2012_real",
        "validation",
        EVAL_PP.replace(
            "onehot({num_classes})", "onehot({num_classes}, key='real_label', multi=True)"
        ),
        mask_empty_labels=True,
    )  # ReaL drops images without any valid label.
    cfg.evals.v2 = split_config("tfds", "imagenet_v2", "test", EVAL_PP)
    return cfg


def _imagenet21k(_: str) -> ml_collections.ConfigDict:
    def split(s, pp, **kw):
        return split_config("imagenet21k", "imagenet21k", s, pp, heldout_examples=51_200, **kw)

    return data_config(
        "imagenet21k",
        num_classes=None,
        image_size=224,
        multi_label=True,
        train=split("train", TRAIN_PP, shuffle_buffer=50_000),
        evals={"val": split("val", EVAL_PP), "test": split("test", EVAL_PP)},
    )


def _jft(_: str) -> ml_collections.ConfigDict:
    multi = "onehot({num_classes}, multi=True)"
    cfg = data_config(
        "jft",
        num_classes=None,
        image_size=224,
        multi_label=True,
        train=split_config(
            "jft",
            "jft",
            "train",
            TRAIN_PP.replace("onehot({num_classes})", multi),
            shuffle_buffer=50_000,
        ),
        evals={
            "val": split_config(
                "jft", "jft", "val", EVAL_PP.replace("onehot({num_classes})", multi)
            )
        },
    )
    # Shard files interleaved per round: resuming re-reads at most one round per process,
    # and a round's records are shuffled together (1: one shard, the least to re-read).
    for split in (cfg.train, *cfg.evals.values()):
        split.cycle_length = jft.CYCLE_LENGTH
    return cfg


def _cifar(name: str) -> ml_collections.ConfigDict:
    return _tfds(
        name,
        "train[:98%]",
        {"val": "train[98%:]", "test": "test"},
        10 if name == "cifar10" else 100,
        train_pp=LOWRES_TRAIN_PP,
        eval_pp=RESIZE_EVAL_PP,
    )


def _pets(name: str) -> ml_collections.ConfigDict:
    return _tfds(name, "train[:90%]", {"val": "train[90%:]", "test": "test"}, 37)


def _flowers(name: str) -> ml_collections.ConfigDict:
    return _tfds(name, "train", {"val": "validation", "test": "test"}, 102)


def _generic_tfds(name: str) -> ml_collections.ConfigDict:
    dataset = name.split(":", 1)[1]
    if not dataset:
        raise ValueError("use 'tfds:<tfds name>', e.g. 'tfds:food101'")
    return _tfds(dataset, "train", {"test": "test"}, None, preset=name)


def _generic_folder(name: str) -> ml_collections.ConfigDict:
    root = name.split(":", 1)[1]
    if not storage.is_dir(root):
        raise DataError(
            f"image folder {root!r} does not exist; expected root/<split>/<class>/ or root/<class>/"
        )
    splits = folder.split_names(root)
    train = "train" if "train" in splits else (splits[0] if splits else "train")
    evals = {s: s for s in splits if s != train}
    if not evals:  # one split (e.g. class folders only): hold out 10% for evaluation
        evals, train = {"val": f"{train}[90%:]"}, f"{train}[:90%]"

    def split(s, pp, **kw):
        return split_config("folder", "folder", s, pp, data_dir=root, **kw)

    return data_config(
        name,
        num_classes=None,
        image_size=224,
        train=split(train, TRAIN_PP, shuffle_buffer=10_000),
        evals={k: split(s, EVAL_PP) for k, s in evals.items()},
    )


# VTAB-1k: (tfds name, train800, val200, test, classes, label ops, value range input max).
# train800/val200 are the first 800/200 examples of VTAB's train/val splits.
_VTAB = {
    "caltech101": ("caltech101", "train[:800]", "train[2754:2954]", "test", 102, "", 255),
    "cifar100": ("cifar100", "train[:800]", "train[45000:45200]", "test", 100, "", 255),
    "dtd": ("dtd", "train[:800]", "validation[:200]", "test", 47, "", 255),
    "oxford_flowers102": (
        "oxford_flowers102",
        "train[:800]",
        "validation[:200]",
        "test",
        102,
        "",
        255,
    ),
    "oxford_iiit_pet": ("oxford_iiit_pet", "train[:800]", "train[2944:3144]", "test", 37, "", 255),
    "sun397": ("sun397/tfds", "train[:800]", "validation[:200]", "test", 397, "", 255),
    "svhn": ("svhn_cropped", "train[:800]", "train[65931:66131]", "test", 10, "", 255),
    "patch_camelyon": ("patch_camelyon", "train[:800]", "validation[:200]", "test", 2, "", 255),
    "eurosat": ("eurosat/rgb", "train[:800]", "train[16200:16400]", "train[21600:]", 10, "", 255),
    "resisc45": ("resisc45", "train[:800]", "train[18900:19100]", "train[25200:]", 45, "", 255),
    "diabetic_retinopathy": (
        "diabetic_retinopathy_detection/btgraham-300",
        "train[:800]",
        "validation[:200]",
        "test",
        5,
        "",
        255,
    ),
    "clevr_count": (
        "clevr",
        "train[:800]",
        "train[63000:63200]",
        "validation",
        8,
        "clevr_count_label|",
        255,
    ),
    "clevr_distance": (
        "clevr",
        "train[:800]",
        "train[63000:63200]",
        "validation",
        6,
        "clevr_distance_label|",
        255,
    ),
    "dmlab": ("dmlab", "train[:800]", "validation[:200]", "test", 6, "", 255),
    "kitti_distance": (
        "kitti",
        "train[:800]",
        "validation[:200]",
        "test",
        4,
        "kitti_distance_label|",
        255,
    ),
    "dsprites_location": (
        "dsprites",
        "train[:800]",
        "train[589824:590024]",
        "train[663552:]",
        16,
        "bin_label('label_x_position', 2)|",
        1,
    ),
    "dsprites_orientation": (
        "dsprites",
        "train[:800]",
        "train[589824:590024]",
        "train[663552:]",
        16,
        "bin_label('label_orientation', 2.5)|",
        1,
    ),
    "smallnorb_azimuth": (
        "smallnorb",
        "train[:800]",
        "test[:200]",
        "test[50%:]",
        18,
        "copy('label_azimuth', 'label')|",
        255,
    ),
    "smallnorb_elevation": (
        "smallnorb",
        "train[:800]",
        "test[:200]",
        "test[50%:]",
        9,
        "copy('label_elevation', 'label')|",
        255,
    ),
}
VTAB_TASKS = tuple(_VTAB)


def _vtab(name: str) -> ml_collections.ConfigDict:
    """``vtab/<task>`` trains on train800val200 (final); ``vtab/<task>/hparam`` on train800."""
    parts = name.split("/")
    task = parts[1] if len(parts) > 1 else ""
    hparam = len(parts) == 3 and parts[2] == "hparam"
    if task not in _VTAB or len(parts) > 3 or (len(parts) == 3 and not hparam):
        raise ValueError(
            f"unknown VTAB preset {name!r}; use vtab/<task> or vtab/<task>/hparam "
            f"with task in {list(VTAB_TASKS)}"
        )
    tfds_name, train800, val200, test, classes, labels, in_max = _VTAB[task]
    pp = (
        f"{labels}decode|resize({{image_size}})|value_range(-1, 1, 0, {in_max})"
        "|onehot({num_classes})"
    )
    train_split = train800 if hparam else f"{train800}+{val200}"
    return data_config(
        name,
        num_classes=classes,
        image_size=224,
        train=split_config("tfds", tfds_name, train_split, pp, shuffle_buffer=1000, cache=True),
        evals={
            "val": split_config("tfds", tfds_name, val200, pp, cache=True),
            "test": split_config("tfds", tfds_name, test, pp),
        },
    )


PRESETS: dict[str, Callable[[str], ml_collections.ConfigDict]] = {
    "digits": _digits,
    "imagenet2012": _imagenet2012,
    "imagenet21k": _imagenet21k,
    "jft": _jft,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "oxford_iiit_pet": _pets,
    "oxford_flowers102": _flowers,
}
PREFIXES: dict[str, Callable[[str], ml_collections.ConfigDict]] = {
    "tfds:": _generic_tfds,
    "folder:": _generic_folder,
    "vtab/": _vtab,
}


def preset_names() -> list[str]:
    """All preset names (VTAB tasks spelled out; 'tfds:' and 'folder:' take a suffix)."""
    return (
        sorted(PRESETS)
        + [f"vtab/{t}" for t in VTAB_TASKS]
        + [f"vtab/{t}/hparam" for t in VTAB_TASKS]
        + ["tfds:<name>", "folder:<root>"]
    )


def _merge(cfg: ml_collections.ConfigDict, overrides: dict[str, Any], path: str) -> None:
    for key, value in overrides.items():
        where = f"{path}{key}"
        if path == "evals." and key not in cfg:
            template = next(iter(cfg.values()), None)
            if template is None or not isinstance(value, dict):
                raise ValueError(f"new eval {where} must be given as a dict of split fields")
            cfg[key] = copy.deepcopy(template)
        if key not in cfg:
            raise ValueError(f"unknown data config field {where!r}; fields: {sorted(cfg)}")
        if isinstance(value, dict | ml_collections.ConfigDict) and isinstance(
            cfg[key], ml_collections.ConfigDict
        ):
            _merge(cfg[key], dict(value), where + ".")
        else:
            cfg[key] = value


def get_data_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The preset called ``name`` with ``overrides`` merged in (nested dicts merge)."""
    builder = PRESETS.get(name)
    if builder is None:
        builder = next((fn for p, fn in PREFIXES.items() if name.startswith(p)), None)
    if builder is None:
        raise ValueError(
            f"unknown data preset {name!r}; presets: {', '.join(sorted(PRESETS))}, "
            f"vtab/<task>[/hparam] ({len(VTAB_TASKS)} tasks: {', '.join(VTAB_TASKS)}), "
            "tfds:<any TFDS name>, folder:<root>"
        )
    cfg = builder(name)
    _merge(cfg, overrides, "")
    return cfg
