"""Files written by `save_npz` load in PyTorch through timm's npz loader with identical logits.

timm (from the test extra) runs in a separate process, `timm_reference.py`. timm's ViT uses
the exact erf GELU; the release (and this repo) use the tanh approximation, so the timm models
are built with `nn.GELU(approximate='tanh')` to compare logits tightly. Every request of the
module goes to one such process (importing torch and timm costs more than their work).
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vit_jax.checkpoint import resize_posemb, save_npz
from vit_jax.models import create_model

TESTS = os.path.dirname(os.path.abspath(__file__))

# `timm_reference.py REQUEST.json` for several requests in one process.
RUN_REQUESTS = f"""
import sys
sys.path.insert(0, {TESTS!r})
import timm_reference
for request in sys.argv[1:]:
    timm_reference.main(request)
"""


def run_timm(folder, requests: dict[str, dict]) -> dict[str, np.ndarray]:
    """Runs `timm_reference.py` on every request in one fresh process (torch and TensorFlow
    cannot share one); returns each request's array by its name."""
    paths = []
    for name, request in requests.items():
        request = {**request, "output": str(folder / f"{name}.npy")}
        path = folder / f"{name}.json"
        path.write_text(json.dumps(request))
        paths.append(str(path))
    # One torch thread: its idle threads spin on 2 cores and double the CPU time.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", RUN_REQUESTS, *paths],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: np.load(folder / f"{name}.npy") for name in requests}


def random_vit(seed: int, **overrides):
    """ViT-Ti/16 at 224 px with every parameter random (built abstractly, then filled)."""
    model = nnx.eval_shape(lambda: create_model("ViT-Ti/16", **overrides))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        base = 1.0 if path[-1] == "scale" else 0.0
        var.set_value(jnp.asarray(base + 0.05 * rng.standard_normal(shape), jnp.float32))
    return model


def logits_request(npz_path, images_path, *, tanh_gelu=True, **timm_kwargs) -> dict:
    return {
        "kind": "logits",
        "npz": str(npz_path),
        "images": str(images_path),
        "tanh_gelu": tanh_gelu,
        "timm_kwargs": timm_kwargs,
    }


POSEMB_GRIDS = ((24, 24), (7, 7))


@pytest.fixture(scope="module")
def timm(tmp_path_factory):
    """Ours and timm's outputs: logits of a ViT-Ti/16 saved in the original layout (timm
    with the tanh and with its default erf GELU) and of a scanned gap model saved in the
    big_vision layout, and a position embedding resampled to each of POSEMB_GRIDS."""
    folder = tmp_path_factory.mktemp("timm")
    images = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    np.save(folder / "images.npy", images)
    forward = nnx.jit(lambda m, x: m(x))

    original = random_vit(1)
    save_npz(original, folder / "ti16.npz")
    scanned_gap = random_vit(2, scan=True, pool_type="gap")
    save_npz(scanned_gap, folder / "ti16_gap_bv.npz", layout="big_vision")
    posemb = np.random.default_rng(3).standard_normal((1, 197, 8)).astype(np.float32)
    np.save(folder / "posemb.npy", posemb)

    images_path = folder / "images.npy"
    requests = {
        "original": logits_request(folder / "ti16.npz", images_path),
        "original_erf": logits_request(folder / "ti16.npz", images_path, tanh_gelu=False),
        "big_vision": logits_request(
            folder / "ti16_gap_bv.npz",
            images_path,
            class_token=False,
            global_pool="avg",
            fc_norm=False,
        ),
    }
    for grid in POSEMB_GRIDS:
        path = str(folder / "posemb.npy")
        requests[f"posemb_{grid[0]}x{grid[1]}"] = {
            "kind": "resample",
            "posemb": path,
            "grid": list(grid),
        }
    theirs = run_timm(folder, requests)
    ours = {
        "original": np.asarray(forward(original, jnp.asarray(images))),
        "big_vision": np.asarray(forward(scanned_gap, jnp.asarray(images))),
        "posemb": posemb,
    }
    return ours, theirs


def test_original_layout_loads_in_timm_with_identical_logits(timm):
    ours, theirs = timm
    assert np.abs(ours["original"]).max() > 0.1
    np.testing.assert_allclose(theirs["original"], ours["original"], atol=2e-5, rtol=1e-5)
    # timm's default (exact erf) GELU is measurably different: the setting above matters.
    assert np.abs(theirs["original_erf"] - ours["original"]).max() > 1e-5


def test_big_vision_layout_of_scanned_gap_model_loads_in_timm(timm):
    ours, theirs = timm
    np.testing.assert_allclose(theirs["big_vision"], ours["big_vision"], atol=2e-5, rtol=1e-5)


def test_bicubic_posemb_matches_timm_resample(timm):
    ours, theirs = timm
    for grid in POSEMB_GRIDS:
        resized = resize_posemb(ours["posemb"], grid, method="bicubic")
        np.testing.assert_allclose(resized, theirs[f"posemb_{grid[0]}x{grid[1]}"], atol=1e-5)
