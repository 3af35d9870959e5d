"""Preprocessing strings: safe parsing, the op registry, and per-op behaviour."""

import uuid

import numpy as np
import pytest
from data_fixtures.images import encode, pattern

from vit_jax.data import randaug, registry
from vit_jax.data._tf import tf
from vit_jax.data.pp_parse import OpCall, PPError, parse_pp


def run(spec: str, data: dict, index: int = 0, seed: int = 0) -> dict:
    out = registry.build_pp(spec, seed=seed)(dict(data), tf.constant(index, tf.int64))
    return tf.nest.map_structure(lambda v: v.numpy(), out)


def photo(h: int = 40, w: int = 60, fmt: str = "JPEG", seed: int = 0) -> tf.Tensor:
    return tf.constant(encode(pattern(h, w, seed), fmt))


def test_parse_ops_args_and_kwargs():
    ops = parse_pp("decode|resize(224)|value_range(-1, 1)|onehot(10, multi=True, key='x')")
    assert ops == [
        OpCall("decode"),
        OpCall("resize", (224,)),
        OpCall("value_range", (-1, 1)),
        OpCall("onehot", (10,), {"multi": True, "key": "x"}),
    ]
    assert parse_pp("  ") == []
    assert parse_pp("resize((3, 4))\n | flip_lr") == [
        OpCall("resize", ((3, 4),)),
        OpCall("flip_lr"),
    ]


@pytest.mark.parametrize(
    "spec",
    [
        "resize(__import__('os').system('true'))",
        "resize(x)",
        "decode|",
        "resize(1)+flip_lr",
        "a.b(1)",
        "resize(*[1])",
    ],
)
def test_parse_rejects_non_literals(spec):
    with pytest.raises(PPError):
        parse_pp(spec)


def test_unknown_op_lists_known_ops():
    with pytest.raises(PPError, match="unknown pp op 'rezise'.*resize_small"):
        registry.build_pp("decode|rezise(3)")


def test_bad_arguments_name_the_op():
    with pytest.raises(PPError, match="'resize'.*bad arguments"):
        registry.build_pp("resize(1, 2, 3, 4, 5)")
    with pytest.raises(PPError, match="'resize'.*size"):
        registry.build_pp("resize(-3)")
    with pytest.raises(PPError, match="'onehot'"):
        registry.build_pp("onehot(10, bogus=1)")
    with pytest.raises(PPError, match="'randaug'.*magnitude"):
        registry.build_pp("randaug(2, 50)")


def test_known_ops_cover_required_set():
    required = {
        "decode",
        "decode_jpeg_and_inception_crop",
        "inception_crop",
        "random_crop",
        "resize",
        "resize_small",
        "central_crop",
        "flip_lr",
        "value_range",
        "vgg_value_range",
        "randaug",
        "onehot",
        "keep",
        "drop",
    }
    assert required <= set(registry.known_ops())


@pytest.mark.parametrize(
    "fmt,mode",
    [
        ("JPEG", None),
        ("PNG", None),
        ("JPEG", "CMYK"),
        ("PNG", "L"),
        ("PNG", "RGBA"),
        ("PNG", "LA"),
        ("PNG", "P"),
    ],
)
def test_decode_makes_rgb(fmt, mode):
    data = tf.constant(encode(pattern(7, 9, 1), fmt, mode))
    out = run("decode", {"image": data})
    assert out["image"].shape == (7, 9, 3) and out["image"].dtype == np.uint8


def test_decode_passes_pixels_and_expands_gray():
    gray = tf.constant(np.arange(64, dtype=np.uint8).reshape(8, 8, 1))
    out = run("decode(3)", {"image": gray})["image"]
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_jpeg_and_inception_crop(fmt):
    out = run("decode_jpeg_and_inception_crop(32)", {"image": photo(fmt=fmt)})
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.float32
    assert 0 <= out["image"].min() and out["image"].max() <= 255


def test_random_ops_depend_on_index_and_seed_only():
    spec = "decode_jpeg_and_inception_crop(16, area_min=10)|flip_lr"
    data = {"image": photo()}
    a = run(spec, data, index=3)["image"]
    np.testing.assert_array_equal(a, run(spec, data, index=3)["image"])
    others = [run(spec, data, index=i)["image"] for i in range(4, 8)]
    assert any(not np.array_equal(a, o) for o in others)
    assert not np.array_equal(a, run(spec, data, index=3, seed=1)["image"])


def test_inception_crop_area_bounds():
    img = tf.constant(pattern(50, 50, 2))
    crops = [
        run("inception_crop(area_min=50, area_max=60)", {"image": img}, i)["image"]
        for i in range(8)
    ]
    for c in crops:
        assert 0.4 * 2500 <= c.shape[0] * c.shape[1] <= 0.7 * 2500
    sized = run("inception_crop(12)", {"image": img})["image"]
    assert sized.shape == (12, 12, 3)
    static = registry.build_pp("inception_crop(12)|flip_lr")
    traced = tf.function(lambda x: static({"image": x}, tf.constant(0, tf.int64))["image"])
    spec = tf.TensorSpec([None, None, 3], tf.uint8)
    assert traced.get_concrete_function(spec).output_shapes.as_list() == [12, 12, 3]


def test_random_crop_with_padding_translates():
    img = tf.constant(pattern(16, 16, 3))
    outs = [run("random_crop(16, pad=2)", {"image": img}, i)["image"] for i in range(10)]
    assert all(o.shape == (16, 16, 3) for o in outs)
    assert any(not np.array_equal(o, img.numpy()) for o in outs)
    padded = np.pad(img.numpy(), [(2, 2), (2, 2), (0, 0)])
    windows = [padded[y : y + 16, x : x + 16] for y in range(5) for x in range(5)]
    assert all(any(np.array_equal(o, w) for w in windows) for o in outs)


def test_resize_resize_small_central_crop():
    img = tf.constant(pattern(30, 60, 4))
    assert run("resize(10)", {"image": img})["image"].shape == (10, 10, 3)
    assert run("resize((5, 7))", {"image": img})["image"].shape == (5, 7, 3)
    small = run("resize_small(15)", {"image": img})["image"]
    assert small.shape == (15, 30, 3)
    center = run("central_crop(10)", {"image": img})["image"]
    np.testing.assert_array_equal(center, img.numpy()[10:20, 25:35])


def test_flip_lr_flips_about_half():
    img = tf.constant(pattern(4, 6, 5))
    flipped = [
        np.array_equal(run("flip_lr", {"image": img}, i)["image"], img.numpy()[:, ::-1])
        for i in range(40)
    ]
    assert 8 < sum(flipped) < 32


def test_value_ranges():
    img = tf.constant(np.array([[[0, 128, 255]]], np.uint8))
    out = run("value_range(-1, 1)", {"image": img})["image"]
    np.testing.assert_allclose(out, [[[-1, 128 / 127.5 - 1, 1]]], atol=1e-6)
    out = run("value_range(0, 1, 0, 1)", {"image": tf.constant([[[0.5, 1.0, 0.0]]])})["image"]
    np.testing.assert_allclose(out, [[[0.5, 1.0, 0.0]]])
    vgg = run("vgg_value_range", {"image": img})["image"]
    np.testing.assert_allclose(vgg[0, 0, 0], -0.485 / 0.229, rtol=1e-5)


def test_onehot_multi_and_smoothing():
    out = run("onehot(4)", {"label": tf.constant(2, tf.int64)})["labels"]
    np.testing.assert_array_equal(out, [0, 0, 1, 0])
    out = run("onehot(5, multi=True)", {"label": tf.constant([1, 3, 3], tf.int64)})["labels"]
    np.testing.assert_array_equal(out, [0, 1, 0, 1, 0])
    out = run("onehot(4, smoothing=0.2)", {"label": tf.constant(0, tf.int64)})["labels"]
    np.testing.assert_allclose(out, [0.85, 0.05, 0.05, 0.05])
    empty = run("onehot(3, multi=True)", {"label": tf.zeros([0], tf.int64)})["labels"]
    np.testing.assert_array_equal(empty, [0, 0, 0])


def test_onehot_label_out_of_range_fails_clearly():
    with pytest.raises(tf.errors.InvalidArgumentError, match="label out of range"):
        run("onehot(3)", {"label": tf.constant(3, tf.int64)})
    with pytest.raises(tf.errors.InvalidArgumentError, match="label out of range"):
        run("onehot(3, multi=True)", {"label": tf.constant([0, -1], tf.int64)})


def test_keep_drop_copy_bin_label():
    data = {"image": tf.zeros([1]), "label": tf.constant(5, tf.int64), "x": tf.constant(7)}
    assert set(run("keep('image', 'label')", data)) == {"image", "label"}
    assert set(run("drop('x')", data)) == {"image", "label"}
    assert run("copy('x', 'y')", data)["y"] == 7
    assert run("bin_label('label', 2.5)", data)["label"] == 2


def test_vtab_structured_labels():
    clevr = {
        "objects": {"size": tf.zeros([5]), "pixel_coords": tf.constant([[0, 0, 9.2], [1, 1, 12.0]])}
    }
    assert run("clevr_count_label", clevr)["label"] == 2
    assert run("clevr_distance_label", clevr)["label"] == 3
    kitti = {
        "objects": {
            "type": tf.constant([0, 5]),
            "location": tf.constant([[0, 0, 15.0], [0, 0, 3.0]]),
        }
    }
    assert run("kitti_distance_label", kitti)["label"] == 1
    none = {"objects": {"type": tf.constant([5]), "location": tf.constant([[0, 0, 3.0]])}}
    assert run("kitti_distance_label", none)["label"] == 3


def test_randaug_shapes_range_and_determinism():
    img = tf.constant(pattern(24, 24, 6))
    a = run("randaug(2, 9)", {"image": img}, index=1)["image"]
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, run("randaug(2, 9)", {"image": img}, index=1)["image"])
    outs = [run("randaug(2, 9)", {"image": img}, index=i)["image"] for i in range(2, 8)]
    assert any(not np.array_equal(a, o) for o in outs)
    np.testing.assert_array_equal(run("randaug(0, 9)", {"image": img})["image"], img.numpy())


@pytest.mark.parametrize("op", range(len(randaug.OP_NAMES)))
def test_each_randaug_op_keeps_shape_and_range(op):
    img = tf.cast(tf.constant(pattern(10, 14, op)), tf.float32)
    out = randaug.apply_op(img, op, tf.constant(0.7)).numpy()
    assert out.shape == (10, 14, 3)
    assert 0 <= out.min() and out.max() <= 255


def test_randaug_geometric_ops_move_pixels():
    img = tf.cast(tf.constant(pattern(16, 16, 9)), tf.float32)
    for name in ("rotate", "shear_x", "translate_y"):
        out = randaug.apply_op(img, randaug.OP_NAMES.index(name), tf.constant(1.0)).numpy()
        assert not np.array_equal(out, img.numpy()), name
        assert (out == 128).any(), name  # Pixels moved in from outside are grey.


def test_randaug_equalize_matches_pil():
    from PIL import Image, ImageOps

    img = pattern(20, 30, 11) // 3 + 40  # Narrow histogram so equalizing changes it.
    want = np.asarray(ImageOps.equalize(Image.fromarray(img)))
    got = randaug.apply_op(
        tf.cast(tf.constant(img), tf.float32), randaug.OP_NAMES.index("equalize"), tf.constant(1.0)
    ).numpy()
    np.testing.assert_array_equal(got.astype(np.uint8), want)


def test_a_user_op_module_is_named_by_the_builder(tmp_path, monkeypatch):
    suffix = uuid.uuid4().hex[:8]
    (tmp_path / f"my_ops_{suffix}.py").write_text(
        "from vit_jax.data.registry import register\n"
        f"@register('double_{suffix}')\n"
        "def double():\n"
        "    return lambda data: {**data, 'x': data['x'] * 2}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PPError, match=f"unknown pp op 'double_{suffix}'"):
        registry.build_pp(f"double_{suffix}")
    modules = (*registry.DEFAULT_OP_MODULES, f"my_ops_{suffix}")
    pp = registry.build_pp(f"keep('x')|double_{suffix}", op_modules=modules)
    assert pp({"x": tf.constant(3)}, tf.constant(0, tf.int64))["x"].numpy() == 6
    with pytest.raises(PPError, match="pp op module 'no_such_ops' not found"):
        registry.build_pp("flip_lr", op_modules=("no_such_ops",))
