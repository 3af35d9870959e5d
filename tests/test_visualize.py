"""Pictures of a trained model: the arithmetic against NumPy by hand, and the PNG files."""

import math
import os
import shutil

import numpy as np
import pytest
from helpers import as_in_readme, readme_commands
from PIL import Image

from vit_jax import cli
from vit_jax.commands import visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(trained_run, tmp_path_factory):
    """A copy of the shared tiny class-token ViT (tests/conftest.py): pictures go into it."""
    workdir = str(tmp_path_factory.mktemp("run") / "run")
    shutil.copytree(trained_run, workdir)
    return workdir


# --- arithmetic ------------------------------------------------------------------------------


def test_rollout_of_a_known_stack():
    # Layer 1 attends to itself only: with the residual it stays the identity. Layer 2 (two
    # heads, averaging to a swap) mixed with the residual gives 1/2 everywhere.
    identity = np.eye(2)[None]
    swap_heads = np.array([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    stack = np.stack([np.concatenate([identity, identity]), swap_heads])
    np.testing.assert_allclose(visualize.attention_rollout(stack), np.full((2, 2), 0.5))


def test_rollout_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2, 5, 5))
    attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    layers = [(a.mean(0) + np.eye(5)) / 2 for a in attention]  # rows of a.mean(0) sum to 1
    expected = np.linalg.multi_dot(layers[::-1])
    np.testing.assert_allclose(visualize.attention_rollout(attention), expected, atol=1e-12)
    # Class token: its row over the 4 patches; no class token: the mean row over all 5.
    np.testing.assert_allclose(
        visualize.rollout_map(attention, (2, 2), 1), expected[0, 1:].reshape(2, 2)
    )
    grid = visualize.rollout_map(attention[:, :, 1:, 1:] * 0 + 0.25, (2, 2), 0)
    np.testing.assert_allclose(grid, np.full((2, 2), 0.25))


def test_mean_attention_distance_of_uniform_attention_by_hand():
    # 2x2 patches of 4 px, every patch attends equally to all: distances 0, 4, 4 and 4*sqrt(2).
    uniform = np.full((3, 2, 2, 4, 4), 0.25)  # (layers, batch, heads, N, N)
    distances = visualize.mean_attention_distance(uniform, (2, 2), 4, num_prefix=0)
    np.testing.assert_allclose(distances, np.full((3, 2), 2 + math.sqrt(2)))
    # A class token is left out and the rest renormalised: the same value.
    with_cls = np.full((1, 1, 1, 5, 5), 0.2)
    np.testing.assert_allclose(
        visualize.mean_attention_distance(with_cls, (2, 2), 4, num_prefix=1), [[2 + math.sqrt(2)]]
    )
    # One row of three 2-px patches: per query (0+2+4)/3, (2+0+2)/3, (4+2+0)/3 -> 16/9.
    row = np.full((1, 1, 1, 3, 3), 1 / 3)
    np.testing.assert_allclose(visualize.mean_attention_distance(row, (1, 3), 2, 0), [[16 / 9]])
    # Attending only to itself: distance 0.
    np.testing.assert_allclose(
        visualize.mean_attention_distance(np.eye(4)[None, None, None], (2, 2), 4, 0), [[0.0]]
    )


def test_posemb_similarity_and_filter_components():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(1 + 6, 8))
    sim = visualize.posemb_similarity(table, (2, 3), num_prefix=1)
    assert sim.shape == (2, 3, 2, 3)
    flat = sim.reshape(6, 6)
    np.testing.assert_allclose(np.diag(flat), 1.0)
    np.testing.assert_allclose(flat, flat.T)
    a, b = table[1], table[6]
    np.testing.assert_allclose(sim[0, 0, 1, 2], a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    # 16 filters varying mostly along one 2x2x3 pattern: that pattern is the first component.
    pattern = rng.normal(size=(2, 2, 3))
    kernel = pattern[..., None] * rng.normal(size=16) + 0.01 * rng.normal(size=(2, 2, 3, 16))
    components = visualize.filter_components(kernel, 28)
    assert components.shape == (12, 2, 2, 3)  # at most p*p*C components
    cosine = abs(np.sum(components[0] * pattern)) / np.linalg.norm(pattern)
    assert cosine > 0.99


# --- pictures --------------------------------------------------------------------------------


def check_png(path, kind):
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = visualize.FIGSIZE[kind]
        assert image.size == (round(width * visualize.DPI), round(height * visualize.DPI))
        assert np.asarray(image.convert("RGB"), np.float32).std() > 0


@pytest.mark.parametrize("kind", ["posemb", "filters", "distance", "curves"])
def test_each_picture_is_a_png_of_the_expected_size(run_dir, tmp_path, capsys, kind):
    extra = ["--num_images", "20"] if kind == "distance" else []
    assert (
        cli.run("visualize", [kind, "--workdir", run_dir, "--out", str(tmp_path), "--show", *extra])
        == 0
    )
    (path,) = capsys.readouterr().out.split()
    assert path == str(tmp_path / f"{kind}.png")
    check_png(path, kind)


def test_attention_goes_to_the_workdir_by_default(run_dir, digit_png, capsys):
    assert cli.run("visualize", ["attention", "--workdir", run_dir, "--show", digit_png]) == 0
    (path,) = capsys.readouterr().out.split()
    assert path == os.path.join(run_dir, "pictures", "attention_seven.png")
    check_png(path, "attention")


def test_distance_over_given_images_and_a_png_out(run_dir, digit_png, tmp_path, capsys):
    out = str(tmp_path / "sub" / "d.png")
    assert cli.run("visualize", ["distance", digit_png, "--workdir", run_dir, "--out", out]) == 0
    check_png(out, "distance")
    assert "wrote 1 picture" in capsys.readouterr().err


def test_user_mistakes_give_one_line(run_dir, digit_png, tmp_path, capsys):
    cases = [
        (["attention", "--workdir", run_dir], "give one or more image files"),
        (["curves", "--workdir", str(tmp_path)], "not a training run's directory"),
        (["posemb", "--workdir", str(tmp_path)], "no config.json"),
        (
            ["attention", digit_png, digit_png, "--workdir", run_dir, "--out", "x.png"],
            "need a folder",
        ),
    ]
    for argv, message in cases:
        assert cli.run("visualize", argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_readme_visualize_commands_run(run_dir, digit_png, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the README's image paths are relative to the repository
    commands = readme_commands("visualize")
    assert sorted({args[0] for args in commands}) == sorted(visualize.KINDS)
    for args in commands:
        assert (
            cli.run("visualize", as_in_readme(args, run_dir, **{"new_photo.jpg": digit_png})) == 0
        )
    pictures = sorted(os.listdir(os.path.join(run_dir, "pictures")))
    assert {"posemb.png", "filters.png", "distance.png", "curves.png"} <= set(pictures)
