"""Export: the public .npz layout, and a jax.export artifact that runs with JAX alone."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import TRAINED_RUN, as_in_readme, readme_commands

from vit_jax import cli, inference
from vit_jax.checkpoint import npz_arrays, read_npz
from vit_jax.commands import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter: JAX only, the project's code never imported.
RUNNER = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np

    artifact, images_file, out_file = sys.argv[1:]
    with open(artifact, "rb") as f:
        exported = jax.export.deserialize(f.read())
    images = np.load(images_file)
    logits = {str(n): np.asarray(exported.call(images[:n])) for n in (1, len(images))}
    assert "vit_jax" not in sys.modules, "the artifact needed the project's code"
    np.savez(out_file, **logits)
    """
)


@pytest.fixture(scope="module")
def run_dir(trained_run, tmp_path_factory):
    """A copy of the shared tiny ViT (tests/conftest.py): exports go into its export/."""
    workdir = str(tmp_path_factory.mktemp("run") / "run")
    shutil.copytree(trained_run, workdir)
    return workdir


@pytest.mark.slow
def test_jax_artifact_runs_without_the_project_and_matches_the_model(run_dir, tmp_path, capsys):
    out = str(tmp_path / "shipped" / "vit.jax")
    assert cli.run("export", ["--workdir", run_dir, "--format", "jax", "--out", out]) == 0
    assert capsys.readouterr().out.split() == [out, str(tmp_path / "shipped" / "vit.json")]

    loaded = inference.load_run(run_dir)
    images = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, out, str(tmp_path / "images.npy"), str(tmp_path / "o.npz")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "o.npz") as logits:
        expected = np.asarray(loaded.model(images))
        assert logits["3"].shape == (3, 10)  # the batch dimension is symbolic
        np.testing.assert_allclose(logits["3"], expected, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(logits["1"], expected[:1], atol=1e-5, rtol=1e-5)

    with open(tmp_path / "shipped" / "vit.json") as f:
        contract = json.load(f)
    assert contract["artifact"] == "vit.jax"
    assert contract["input"] == {
        "shape": ["batch", 8, 8, 3],
        "dtype": "float32",
        "layout": "NHWC",
        "value_range": [-1.0, 1.0],
    }
    assert contract["output"]["shape"] == ["batch", 10]
    assert contract["class_names"] == [str(i) for i in range(10)]
    assert contract["preprocessing"] == "decode(3)|resize(8)|value_range(-1, 1)"
    assert contract["image_size"] == 8 and contract["step"] == TRAINED_RUN["total_steps"]


def test_npz_export_writes_the_public_layout(run_dir, capsys):
    assert cli.run("export", ["--workdir", run_dir, "--format", "npz"]) == 0
    path = os.path.join(run_dir, "export", "model.npz")
    assert capsys.readouterr().out.strip() == path
    arrays = read_npz(path)
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in arrays
    assert arrays["head/kernel"].shape == (32, 10)
    expected = npz_arrays(inference.load_run(run_dir).model)
    assert sorted(arrays) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(arrays[key], value)


def test_value_range_is_read_from_the_preprocessing():
    assert export.value_range("decode|resize(8)|value_range(-1, 1)") == [-1.0, 1.0]
    assert export.value_range("decode|value_range(0, 1, 0, 255)") == [0.0, 1.0]
    assert export.value_range("decode|value_range(vmax=2.0)") == [-1.0, 2.0]
    assert export.value_range("decode|resize(8)") is None


def test_export_needs_a_run(tmp_path, capsys):
    assert cli.run("export", ["--workdir", str(tmp_path), "--format", "jax"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --workdir") and "no config.json" in err


def test_readme_export_commands_run(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    commands = readme_commands("export")
    assert len(commands) == 3
    for args in commands:
        args = as_in_readme(args, run_dir, **{"--out=digits_vit": f"--out={tmp_path}/digits_vit"})
        assert cli.run("export", args) == 0
    written = capsys.readouterr().out.split()
    assert written == [
        f"{tmp_path}/digits_vit.npz",
        f"{tmp_path}/digits_vit.jax",
        f"{tmp_path}/digits_vit.json",
        os.path.join(run_dir, "export", "model.jax"),
        os.path.join(run_dir, "export", "model.json"),
    ]
    assert all(os.path.getsize(path) > 0 for path in written)
