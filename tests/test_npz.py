"""Public `.npz` checkpoints: layouts, prefixes, scan <-> unrolled, round trips, position
embedding resizing, head / pre_logits policies, clear errors, pickles refused."""

import functools
import os
import pickle
import re

import gcsfs
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vit_jax.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    load_npz,
    npz_arrays,
    read_npz,
    resize_posemb,
    save_npz,
)
from vit_jax.checkpoint.npz import write_npz
from vit_jax.models import create_model

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, img_size=32, num_classes=5)
forward = nnx.jit(lambda model, x: model(x))
pre_logits = nnx.jit(lambda model, x: model.forward_features(x)["pre_logits"])


def tiny(**overrides):
    """A tiny ViT with its own random initialisation."""
    return create_model("ViT-Ti/16", **{**TINY, **overrides})


def shell(**overrides):
    """A tiny ViT built abstractly (no initialisation): every parameter must be loaded. A
    new module every call, copied from one traced per set of overrides (tracing is slow)."""
    return nnx.merge(*_shell_parts(tuple(sorted(overrides.items()))), copy=True)


@functools.cache
def _shell_parts(overrides: tuple) -> tuple:
    return nnx.split(nnx.eval_shape(lambda: tiny(**dict(overrides))))


def randomize(model, seed):
    """Every parameter random (heads and biases included), so nothing is trivially zero."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        old = var.get_value()
        var.set_value(jnp.asarray(rng.standard_normal(old.shape) * 0.2, old.dtype))
    return model


def assert_same_arrays(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert a[key].tobytes() == b[key].tobytes(), key


@pytest.fixture(scope="module")
def source():
    return randomize(shell(), seed=0)


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)


@pytest.fixture(scope="module")
def source_file(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "source.npz"
    save_npz(source, path)
    return path


# --- layouts and round trips ---------------------------------------------------------------


@pytest.mark.parametrize("layout", ["original", "big_vision"])
@pytest.mark.parametrize("src_scan,dst_scan", [(False, True), (True, False)])
def test_round_trip_is_bit_identical(tmp_path, images, layout, src_scan, dst_scan):
    src = randomize(shell(scan=src_scan), seed=3)
    first, second, third = (tmp_path / f"{n}.npz" for n in ("1", "2", "3"))
    save_npz(src, first, layout=layout)
    dst = shell(scan=dst_scan)
    report = load_npz(dst, first)
    assert report.layout == layout and not report.missing and report.head == "loaded"
    save_npz(dst, second, layout=layout)
    back = shell(scan=src_scan)
    load_npz(back, second)
    save_npz(back, third, layout=layout)
    assert_same_arrays(read_npz(first), read_npz(third))
    if layout == "original":  # parameters themselves equal bit for bit, stacked or not
        assert_same_arrays(npz_arrays(src), npz_arrays(dst))
    np.testing.assert_allclose(forward(dst, images), forward(src, images), atol=1e-6)
    np.testing.assert_array_equal(forward(back, images), forward(src, images))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # no temp files left


def test_big_vision_layout_details(tmp_path):
    model = randomize(shell(scan=True), seed=4)
    arrays = npz_arrays(model, layout="big_vision")
    # Scanned blocks stacked under `encoderblock`, `_0` numbering, posemb without class slot
    # (folded into `cls`, as big_vision does).
    assert arrays["Transformer/encoderblock/LayerNorm_1/scale"].shape == (2, 32)
    q = "Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"
    assert arrays[q].shape == (2, 32, 2, 16)
    assert arrays["pos_embedding"].shape == (1, 16, 32)
    posemb, cls = model.posemb[...], model.cls_token[...]
    np.testing.assert_array_equal(arrays["cls"], np.asarray(cls + posemb[:, :1]))
    np.testing.assert_array_equal(arrays["pos_embedding"], np.asarray(posemb[:, 1:]))
    assert not any("encoderblock_" in k for k in arrays)
    assert not any(k.startswith("Transformer/posembed_input") for k in arrays)


def test_big_vision_file_with_params_prefix_and_stacked_blocks(tmp_path, images):
    src = randomize(shell(scan=True), seed=5)
    arrays = {f"params/{k}": v for k, v in npz_arrays(src, layout="big_vision").items()}
    arrays["opt/state/count"] = np.array(100, np.int32)  # optimizer state beside the weights
    path = tmp_path / "bv.npz"
    np.savez(path, **arrays)
    dst = shell()
    report = load_npz(dst, path)
    assert (report.layout, report.prefix) == ("big_vision", "params/")
    assert report.ignored == ["opt/state/count"]
    assert len(report.loaded) == len(jax.tree.leaves(nnx.state(dst, nnx.Param)))
    np.testing.assert_allclose(forward(dst, images), forward(src, images), atol=1e-6)


def test_opt_target_prefix_loads(tmp_path, source, source_file):
    arrays = {f"opt/target/{k}": v for k, v in read_npz(source_file).items()}
    arrays["opt/state/step"] = np.array(7)
    path = tmp_path / "old.npz"
    np.savez(path, **arrays)
    model = shell()
    report = load_npz(model, path)
    assert report.prefix == "opt/target/" and report.ignored == ["opt/state/step"]
    assert_same_arrays(npz_arrays(model), npz_arrays(source))


def test_save_writes_plain_float_arrays_and_overwrites(tmp_path):
    model = randomize(shell(param_dtype="bfloat16"), seed=2)
    path = tmp_path / "bf16.npz"
    path.write_bytes(b"old contents")
    save_npz(model, path)
    arrays = read_npz(path)
    assert {a.dtype for a in arrays.values()} == {np.dtype(np.float32)}
    again = shell(param_dtype="bfloat16")
    load_npz(again, path)
    for (_, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)),
        nnx.to_flat_state(nnx.state(again, nnx.Param)),
        strict=True,
    ):
        assert b[...].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    assert sorted(os.listdir(tmp_path)) == ["bf16.npz"]


# --- position embedding --------------------------------------------------------------------


def test_posemb_resize_to_same_grid_is_identity(source, source_file):
    posemb = np.asarray(source.posemb[...])
    assert resize_posemb(posemb, (4, 4)) is posemb
    assert resize_posemb(posemb, (4, 4), method="bicubic") is posemb
    model = shell()
    report = load_npz(model, source_file)
    assert report.posemb is None
    np.testing.assert_array_equal(np.asarray(model.posemb[...]), posemb)


def test_posemb_14_to_24_keeps_class_slot():
    posemb = np.random.default_rng(0).standard_normal((1, 197, 8)).astype(np.float32)
    for method in ("bilinear", "bicubic"):
        out = resize_posemb(posemb, (24, 24), method=method)
        assert out.shape == (1, 577, 8) and out.dtype == np.float32
        assert out[0, 0].tobytes() == posemb[0, 0].tobytes()
    # Corners land on corners with the release's (corner-aligned) bilinear resize.
    grid = resize_posemb(posemb, (24, 24))[0, 1:].reshape(24, 24, 8)
    old = posemb[0, 1:].reshape(14, 14, 8)
    rows, cols = [0, 0, -1, -1], [0, -1, 0, -1]
    np.testing.assert_allclose(grid[rows, cols], old[rows, cols], rtol=1e-6)


def test_posemb_bicubic_differs_from_bilinear_and_both_keep_constants():
    rng = np.random.default_rng(1)
    posemb = rng.standard_normal((1, 1 + 49, 4)).astype(np.float32)
    bilinear = resize_posemb(posemb, (10, 10))
    bicubic = resize_posemb(posemb, (10, 10), method="bicubic")
    assert np.abs(bilinear - bicubic).max() > 1e-2
    constant = np.full((1, 1 + 49, 4), 0.37, np.float32)
    for method in ("bilinear", "bicubic"):
        for grid in ((10, 10), (5, 3), (7, 12)):
            out = resize_posemb(constant, grid, method=method)
            np.testing.assert_allclose(out, 0.37, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown posemb interpolation"):
        resize_posemb(posemb, (10, 10), method="nearest")


def test_posemb_interpolation_matches_the_references():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    grid = np.random.default_rng(2).standard_normal((7, 7, 3)).astype(np.float32)
    posemb = grid.reshape(1, 49, 3)
    for new in (12, 4):
        ours = resize_posemb(posemb, (new, new), num_prefix_tokens=0)
        # The release: scipy.ndimage.zoom, order 1.
        zoomed = scipy_ndimage.zoom(grid, (new / 7, new / 7, 1), order=1)
        np.testing.assert_allclose(ours.reshape(new, new, 3), zoomed, atol=1e-5)
        cubic = resize_posemb(posemb, (new, new), num_prefix_tokens=0, method="bicubic")
        jax_cubic = jax.image.resize(grid, (new, new, 3), method="bicubic")
        np.testing.assert_allclose(cubic.reshape(new, new, 3), jax_cubic, atol=1e-5)


@pytest.mark.parametrize("layout", ["original", "big_vision"])
def test_load_resizes_posemb_for_another_resolution(tmp_path, layout):
    small = dict(width=8, num_heads=1, mlp_dim=16, patch_size=16)
    src = randomize(shell(img_size=224, **small), 8)
    path = tmp_path / "224.npz"
    save_npz(src, path, layout=layout)
    model = shell(img_size=384, **small)
    report = load_npz(model, path)
    assert report.posemb == "resized 14x14 -> 24x24 (bilinear)"
    posemb = np.asarray(model.posemb[...])
    assert posemb.shape == (1, 577, 8)
    old = np.asarray(src.posemb[...])
    if layout == "original":
        assert posemb[0, 0].tobytes() == old[0, 0].tobytes()
    else:  # big_vision folds the class slot into `cls`: their sum is what counts
        summed = np.asarray(model.cls_token[...] + model.posemb[:, :1])
        np.testing.assert_array_equal(summed, np.asarray(src.cls_token[...] + src.posemb[:, :1]))
    expected = resize_posemb(old, (24, 24))
    np.testing.assert_array_equal(posemb[:, 1:], expected[:, 1:])
    bicubic = shell(img_size=384, **small)
    report = load_npz(bicubic, path, posemb_interpolation="bicubic")
    assert report.posemb.endswith("(bicubic)")
    assert np.abs(np.asarray(bicubic.posemb[...]) - posemb).max() > 1e-3


# --- head and pre_logits policies ----------------------------------------------------------


def test_head_replaced_by_default_when_class_count_differs(source, source_file):
    model = shell(num_classes=7, head_zero_init=False, head_bias_init=-10.0)
    report = load_npz(model, source_file)
    assert report.head == "replaced"
    assert sorted(report.dropped) == ["head/bias", "head/kernel"]
    assert not np.asarray(model.head.kernel[...]).any()
    np.testing.assert_array_equal(np.asarray(model.head.bias[...]), np.full(7, -10.0))
    np.testing.assert_array_equal(
        np.asarray(model.encoder_norm.scale[...]), np.asarray(source.encoder_norm.scale[...])
    )


def test_head_replace_and_keep_policies(source, source_file):
    same = shell()
    assert load_npz(same, source_file, head="replace").head == "replaced"
    assert not np.asarray(same.head.kernel[...]).any()
    kept = shell()
    assert load_npz(kept, source_file, head="keep").head == "loaded"
    np.testing.assert_array_equal(kept.head.kernel[...], source.head.kernel[...])
    with pytest.raises(CheckpointMismatchError) as info:
        load_npz(shell(num_classes=7), source_file, head="keep")
    message = str(info.value)
    assert message.startswith(f"checkpoint {str(source_file)!r} (original layout) does not fit")
    assert "classes: the file has 5, the model 7" in message
    assert "head/kernel (file (32, 5) vs model (32, 7))" in message
    assert "head/bias (file (5,) vs model (7,))" in message
    assert "config.init_from.head=replace" in message
    assert [k for k, _, _ in info.value.mismatched] == ["head/bias", "head/kernel"]


@pytest.mark.parametrize("head", ["drop", "auto"])
def test_head_dropped_into_feature_model(source, source_file, images, head):
    model = shell(num_classes=0)
    report = load_npz(model, source_file, head=head)
    assert report.head == "dropped" and not report.unexpected
    features = forward(model, images)
    assert features.shape == (2, 32)
    np.testing.assert_allclose(features, pre_logits(source, images), rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointMismatchError, match="config.init_from.head=replace"):
        load_npz(shell(num_classes=0), source_file, head="keep")


def test_pre_logits_policies(tmp_path, source_file):
    with_rep = randomize(shell(representation_size=16), seed=12)
    rep_file = tmp_path / "rep.npz"
    save_npz(with_rep, rep_file)
    # The model has none: dropped by default, an error when asked to keep it.
    plain = shell(num_classes=0)
    report = load_npz(plain, rep_file)
    assert report.pre_logits == "dropped"
    assert "pre_logits/kernel" in report.dropped
    with pytest.raises(CheckpointMismatchError) as info:
        load_npz(shell(num_classes=0), rep_file, pre_logits="keep")
    assert "unexpected pre_logits/kernel (file (32, 16))" in str(info.value)
    assert "config.model.representation_size" in str(info.value)
    # The model has one and the shapes match: kept.
    rep = shell(representation_size=16)
    assert load_npz(rep, rep_file).pre_logits == "loaded"
    np.testing.assert_array_equal(rep.pre_logits.kernel[...], with_rep.pre_logits.kernel[...])
    # The model has one, the file none: missing, unless dropped (model keeps its own init).
    with pytest.raises(
        CheckpointMismatchError, match="missing pre_logits/kernel \\(model \\(32, 16\\)\\)"
    ):
        load_npz(shell(representation_size=16), source_file)
    fresh = randomize(shell(representation_size=16), seed=5)
    init = np.asarray(fresh.pre_logits.kernel[...])
    report = load_npz(fresh, source_file, pre_logits="drop")
    assert report.pre_logits == "dropped" and report.head == "replaced"  # head: 16 != 32 inputs
    np.testing.assert_array_equal(np.asarray(fresh.pre_logits.kernel[...]), init)


# --- errors --------------------------------------------------------------------------------


def test_all_problems_listed_in_one_error(tmp_path, source_file):
    arrays = read_npz(source_file)
    del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
    arrays["extra/kernel"] = np.zeros((3, 3), np.float32)
    arrays["Transformer/encoder_norm/scale"] = np.ones(33, np.float32)
    path = tmp_path / "broken.npz"
    np.savez(path, **arrays)
    model = randomize(shell(), seed=21)
    before = npz_arrays(model)
    with pytest.raises(CheckpointMismatchError) as info:
        load_npz(model, path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message and not message.rstrip().endswith(":")
    assert "missing Transformer/encoderblock_1/LayerNorm_2/scale (model (32,))" in message
    assert "unexpected extra/kernel (file (3, 3))" in message
    assert "Transformer/encoder_norm/scale (file (33,) vs model (32,))" in message
    assert "3 array(s) differ" in message and "strict" not in message  # no flag sets it
    assert info.value.missing == ["Transformer/encoderblock_1/LayerNorm_2/scale"]
    assert info.value.unexpected == ["extra/kernel"]
    assert_same_arrays(npz_arrays(model), before)  # a failed load leaves the model alone
    report = load_npz(model, path, strict=False)
    assert report.missing == info.value.missing and report.unexpected == ["extra/kernel"]
    assert [k for k, _, _ in report.mismatched] == ["Transformer/encoder_norm/scale"]
    after = npz_arrays(model)
    np.testing.assert_array_equal(after["head/kernel"], arrays["head/kernel"])
    np.testing.assert_array_equal(
        after["Transformer/encoder_norm/scale"], before["Transformer/encoder_norm/scale"]
    )


def test_depth_mismatch_lists_layers_and_hints(tmp_path):
    src = randomize(shell(scan=True, depth=3), seed=1)
    path = tmp_path / "deep.npz"
    save_npz(src, path, layout="big_vision")
    with pytest.raises(CheckpointMismatchError) as info:
        load_npz(shell(), path)
    message = str(info.value)
    # The diagnosis first, then a handful of keys and a count of the rest, in one line.
    assert message.index("depth: the file has 3 blocks, the model 2") < message.index("differ")
    assert "16 array(s) differ: unexpected Transformer/encoderblock/" in message
    assert "(+12 more)" in message and "\n" not in message
    assert len(info.value.unexpected) == 16  # every array of the third block


class _Payload:
    """Unpickling this creates a directory: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_arrays_refused_without_running_code(tmp_path, source_file):
    sanity = tmp_path / "sanity"
    pickle.loads(pickle.dumps(_Payload(sanity)))
    assert sanity.is_dir()  # the payload is live
    marker = tmp_path / "pwned"
    evil = np.empty(1, dtype=object)
    evil[0] = _Payload(marker)
    path = tmp_path / "evil.npz"
    np.savez(path, **read_npz(source_file), evil=evil)  # savez pickles object arrays
    with pytest.raises(CheckpointError) as info:
        load_npz(shell(), path)
    message = str(info.value)
    assert str(path) in message and "'evil'" in message
    assert "holds pickled objects; refusing to load it because loading would run code" in message
    whole = tmp_path / "whole.npz"
    whole.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="holds pickled objects"):
        load_npz(shell(), whole)
    assert not marker.exists()


def test_missing_and_invalid_files_error_clearly(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_npz(shell(), missing)
    text = tmp_path / "notes.npz"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.npz.*not an .npz file"):
        load_npz(shell(), text)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(CheckpointError, match="single-array .npy"):
        load_npz(shell(), single)
    with pytest.raises(ValueError, match="unknown head policy 'reset'"):
        load_npz(shell(), text, head="reset")


def test_abstract_model_needs_every_parameter(source_file):
    model = shell(representation_size=16)
    with pytest.raises(CheckpointError, match="built abstractly .*pre_logits/kernel"):
        load_npz(model, source_file, pre_logits="drop")
    assert isinstance(model.pre_logits.kernel.get_value(), jax.ShapeDtypeStruct)


# --- buckets ---------------------------------------------------------------------------------


def test_save_and_load_through_a_bucket(
    storage_server, bucket, source, images, tmp_path, monkeypatch
):
    """A gs:// URL works like a path: one object written, read back bit-identically in a
    few range requests (not a few per array), and nothing created locally (the current
    directory is tmp_path)."""
    monkeypatch.chdir(tmp_path)
    url = f"gs://{bucket}/weights/vit.npz"
    save_npz(source, url)
    assert storage_server.objects(bucket) == ["weights/vit.npz"]
    ranges = []  # the range requests a read makes: a few, not some per member
    call = gcsfs.core.GCSFileSystem._call

    async def counted(self, method, path, *args, **kwargs):
        if "Range" in (kwargs.get("headers") or {}):
            ranges.append(kwargs["headers"]["Range"])
        return await call(self, method, path, *args, **kwargs)

    monkeypatch.setattr(gcsfs.core.GCSFileSystem, "_call", counted)
    assert_same_arrays(read_npz(url), npz_arrays(source))
    assert 1 <= len(ranges) <= 6 < len(npz_arrays(source)), ranges
    model = shell()
    report = load_npz(model, url)
    assert report.path == url and report.head == "loaded"
    np.testing.assert_array_equal(forward(model, images), forward(source, images))
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_npz(shell(), f"gs://{bucket}/weights/nope.npz")
    assert os.listdir(tmp_path) == []


def test_a_failed_save_leaves_the_old_file(storage_server, bucket, tmp_path):
    """An array that cannot be written (an object array: no pickles) fails the save before
    anything replaces the file, on a disk and in a bucket."""
    good = {"a": np.arange(3.0)}
    bad = {"a": np.zeros(3), "b": np.empty(1, dtype=object)}
    for path in (str(tmp_path / "w.npz"), f"gs://{bucket}/w.npz"):
        write_npz(path, good)
        with pytest.raises(ValueError, match="allow_pickle"):
            write_npz(path, bad)
        assert_same_arrays(read_npz(path), good)
    assert os.listdir(tmp_path) == ["w.npz"]  # no temporary file left behind
    assert storage_server.objects(bucket) == ["w.npz"]


def test_hybrid_group_norm_params_stored_as_1x1x1xc_load(tmp_path):
    # The released R+ViT files store GroupNorm scale/bias as (1, 1, 1, C); the model's are (C,).
    tiny_hybrid = dict(
        img_size=64, num_classes=5, width=32, depth=1, mlp_dim=64, num_heads=2,
        stem_layers=(1, 1), stem_width=0.5,
    )  # fmt: skip
    graphdef, state = nnx.split(nnx.eval_shape(lambda: create_model("R26+ViT-S/32", **tiny_hybrid)))
    build = lambda: nnx.merge(graphdef, state, copy=True)  # noqa: E731
    source = randomize(build(), seed=7)
    path = tmp_path / "hybrid.npz"
    save_npz(source, path)
    arrays = read_npz(path)
    group_norm = [k for k in arrays if re.search(r"(^|/)gn[^/]*/(scale|bias)$", k)]
    assert len(group_norm) >= 2 * 4  # gn_root and a unit's gn1..3 / gn_proj, scale and bias
    for key in group_norm:
        arrays[key] = arrays[key].reshape(1, 1, 1, -1)
    released = tmp_path / "released.npz"
    write_npz(released, arrays)
    model = build()
    report = load_npz(model, released)
    assert not report.mismatched and not report.missing
    images = jnp.asarray(np.random.default_rng(2).standard_normal((2, 64, 64, 3)), jnp.float32)
    np.testing.assert_array_equal(forward(model, images), forward(source, images))
