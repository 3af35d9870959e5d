"""Files written by `save_npz` load in PyTorch through timm's npz loader with identical logits.

Needs torch, torchvision and timm (the test extra installs them). timm's ViT uses the exact
erf GELU; the release (and this repo) use the tanh approximation, so the timm models are built with
`nn.GELU(approximate='tanh')` to compare logits tightly.
"""

from functools import partial

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from timm.models import vision_transformer

from vit_jax.checkpoint import resize_posemb, save_npz
from vit_jax.models import create_model


def random_vit(seed: int, **overrides):
    """ViT-Ti/16 at 224 px with every parameter random (built abstractly, then filled)."""
    model = nnx.eval_shape(lambda: create_model("ViT-Ti/16", **overrides))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        base = 1.0 if path[-1] == "scale" else 0.0
        var.set_value(jnp.asarray(base + 0.05 * rng.standard_normal(shape), jnp.float32))
    return model


def timm_logits(path, images, **kwargs):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    vision_transformer._load_weights(model, str(path))
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)


def test_original_layout_loads_in_timm_with_identical_logits(tmp_path, images):
    model = random_vit(1)
    path = tmp_path / "ti16.npz"
    save_npz(model, path)
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images)))
    tanh_gelu = partial(torch.nn.GELU, approximate="tanh")
    theirs = timm_logits(path, images, act_layer=tanh_gelu)
    assert np.abs(ours).max() > 0.1
    np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=1e-5)
    # timm's default (exact erf) GELU is measurably different: the setting above matters.
    erf = timm_logits(path, images)
    assert np.abs(erf - ours).max() > 1e-5


def test_big_vision_layout_of_scanned_gap_model_loads_in_timm(tmp_path, images):
    model = random_vit(2, scan=True, pool_type="gap")
    path = tmp_path / "ti16_gap_bv.npz"
    save_npz(model, path, layout="big_vision")
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images)))
    theirs = timm_logits(
        path,
        images,
        act_layer=partial(torch.nn.GELU, approximate="tanh"),
        class_token=False,
        global_pool="avg",
        fc_norm=False,
    )
    np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=1e-5)


def test_bicubic_posemb_matches_timm_resample():
    from timm.layers import resample_abs_pos_embed

    posemb = np.random.default_rng(3).standard_normal((1, 197, 8)).astype(np.float32)
    for grid in ((24, 24), (7, 7)):
        theirs = resample_abs_pos_embed(torch.from_numpy(posemb), list(grid), num_prefix_tokens=1)
        ours = resize_posemb(posemb, grid, method="bicubic")
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)
