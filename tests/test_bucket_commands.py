"""predict, visualize and export on a run kept in a bucket (--workdir=gs://...), against the
local GCS server, through the commands' entry points from an empty directory; mistakes with
bucket paths."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TRAINED_RUN
from PIL import Image

from vit_jax import cli, inference, storage
from vit_jax.checkpoint import load_npz, npz_arrays, read_npz
from vit_jax.commands import predict, transfer, visualize

PICTURES = ["attention_seven.png", "curves.png", "distance.png", "filters.png", "posemb.png"]


@pytest.fixture(scope="module")
def local_run(trained_run):
    """The shared tiny class-token ViT (tests/conftest.py), logged and checkpointed; read only."""
    return trained_run


@pytest.fixture(scope="module")
def bucket_run(storage_server, local_run, digit_png):
    """A fresh bucket holding a copy of the whole run under run/ and the image under images/."""
    bucket = storage_server.new_bucket()
    for path in storage.walk_files(local_run):
        relative = os.path.relpath(path, local_run).replace(os.sep, "/")
        with open(path, "rb") as f:
            storage.write_bytes(f"gs://{bucket}/run/{relative}", f.read())
    with open(digit_png, "rb") as f:
        storage.write_bytes(f"gs://{bucket}/images/seven.png", f.read())
    assert "run/config.json" in storage_server.objects(bucket, "run/")
    return bucket


@pytest.fixture
def empty_cwd(tmp_path):
    """An empty current directory for the commands; it must stay empty (no `gs:` folder)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    yield str(cwd)
    assert os.listdir(cwd) == []


def read_png(url: str) -> Image.Image:
    image = Image.open(io.BytesIO(storage.read_bytes(url)))
    image.load()
    return image


def test_predict_reads_the_run_and_an_image_from_the_bucket(
    storage_server, bucket_run, local_run, digit_png, empty_cwd, monkeypatch, capsys
):
    """Through the command's entry point, in this process (no start-up cost)."""
    monkeypatch.chdir(empty_cwd)
    url, image_url = f"gs://{bucket_run}/run", f"gs://{bucket_run}/images/seven.png"
    argv = [f"--workdir={url}", "--json", "--quiet", "--top_k=3", digit_png, image_url]
    capsys.readouterr()
    assert cli.run("predict", argv) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["file"] for e in entries] == [digit_png, image_url]
    (expected,) = predict.predict(inference.load_run(local_run), [digit_png], top_k=3)
    for entry in entries:
        assert [t["label"] for t in entry["top"]] == [t["label"] for t in expected["top"]]
        np.testing.assert_allclose(
            [t["prob"] for t in entry["top"]], [t["prob"] for t in expected["top"]], rtol=1e-5
        )


def test_visualize_writes_every_picture_into_the_bucket(
    storage_server, bucket_run, empty_cwd, monkeypatch, capsys
):
    """Every kind through the command's entry point, in this process (no start-up cost)."""
    monkeypatch.chdir(empty_cwd)
    url = f"gs://{bucket_run}/run"
    image_url = f"gs://{bucket_run}/images/seven.png"
    assert cli.run("visualize", ["attention", image_url, f"--workdir={url}", "--show"]) == 0
    assert capsys.readouterr().out.split() == [f"{url}/pictures/attention_seven.png"]
    kinds = ("posemb", "filters", "distance", "curves")
    for kind in kinds:
        extra = ["--num_images", "20"] if kind == "distance" else []
        assert cli.run("visualize", [kind, "--workdir", url, "--show", *extra]) == 0
    assert capsys.readouterr().out.split() == [f"{url}/pictures/{kind}.png" for kind in kinds]
    objects = storage_server.objects(bucket_run, "run/pictures/")
    assert objects == [f"run/pictures/{name}" for name in PICTURES]
    for name in PICTURES:
        kind = name.removesuffix(".png").split("_")[0]
        image = read_png(f"{url}/pictures/{name}")
        width, height = visualize.FIGSIZE[kind]
        assert image.format == "PNG"
        assert image.size == (round(width * visualize.DPI), round(height * visualize.DPI))
        assert np.asarray(image.convert("RGB"), np.float32).std() > 0


def test_export_writes_npz_and_jax_into_the_bucket(
    storage_server, bucket_run, local_run, empty_cwd, monkeypatch, capsys
):
    """Both formats through the command's entry point, in this process."""
    monkeypatch.chdir(empty_cwd)
    url = f"gs://{bucket_run}/run"
    for fmt in ("npz", "jax"):
        assert cli.run("export", [f"--workdir={url}", f"--format={fmt}"]) == 0
        written = [f"{url}/export/model.{fmt}"] + ([f"{url}/export/model.json"] * (fmt == "jax"))
        assert capsys.readouterr().out.split() == written
    objects = storage_server.objects(bucket_run, "run/export/")
    assert objects == ["run/export/model.jax", "run/export/model.json", "run/export/model.npz"]

    local = inference.load_run(local_run)
    images = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    expected = np.asarray(local.model(images))
    # The .npz: the run's parameters exactly, and back into a zeroed model, the same logits.
    arrays = read_npz(f"{url}/export/model.npz")
    assert sorted(arrays) == sorted(npz_arrays(local.model))
    fresh = nnx.clone(local.model)
    nnx.update(fresh, jax.tree.map(jnp.zeros_like, nnx.state(fresh, nnx.Param)))
    assert not np.allclose(np.asarray(fresh(images)), expected)
    load_npz(fresh, f"{url}/export/model.npz")
    np.testing.assert_allclose(np.asarray(fresh(images)), expected, atol=1e-6, rtol=1e-6)
    # The .jax artifact and its contract.
    exported = jax.export.deserialize(storage.read_bytes(f"{url}/export/model.jax"))
    np.testing.assert_allclose(np.asarray(exported.call(images)), expected, atol=1e-5, rtol=1e-5)
    contract = json.loads(storage.read_text(f"{url}/export/model.json"))
    assert contract["artifact"] == "model.jax" and contract["source"] == url
    assert contract["step"] == TRAINED_RUN["total_steps"]
    assert contract["input"]["shape"] == ["batch", 8, 8, 3]


# --- mistakes with bucket paths: one line, exit status 2 ----------------------------------------


def one_line_error(capsys, command, argv) -> str:
    assert cli.run(command, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bucket_mistakes_give_one_line(
    storage_server, bucket_run, local_run, digit_png, empty_cwd, monkeypatch, capsys
):
    monkeypatch.chdir(empty_cwd)
    images = f"gs://{bucket_run}/images"  # objects there, but not a run
    gone = "gs://no-such-bucket-for-vit-jax/run"
    err = one_line_error(capsys, "predict", ["--workdir", images, digit_png])
    assert f"--workdir {images}: no config.json" in err
    err = one_line_error(capsys, "predict", ["--workdir", f"gs://{bucket_run}/nothing", digit_png])
    assert "no such directory" in err
    err = one_line_error(capsys, "predict", ["--workdir", gone, digit_png])
    assert f"--workdir {gone}: the bucket 'no-such-bucket-for-vit-jax' does not exist" in err
    missing_image = f"gs://{bucket_run}/images/eight.png"
    err = one_line_error(capsys, "predict", ["--workdir", local_run, missing_image])
    assert f"{missing_image}: no such image file or folder" in err
    argv = ["--checkpoint", f"{gone}/m.npz", "--model", "ViT-Ti/4", digit_png]
    assert "does not exist" in one_line_error(capsys, "predict", argv)
    for kind in ("curves", "posemb"):
        err = one_line_error(capsys, "visualize", [kind, "--workdir", gone])
        assert "bucket 'no-such-bucket-for-vit-jax' does not exist" in err
    err = one_line_error(capsys, "visualize", ["curves", "--workdir", images])
    assert "no config.json, so not a training run's directory" in err
    out = "gs://no-such-bucket-for-vit-jax/pictures"
    err = one_line_error(capsys, "visualize", ["posemb", "--workdir", local_run, "--out", out])
    assert f"cannot write to {out}: the bucket" in err
    argv = ["--workdir", local_run, "--format", "npz", "--out", f"{out}/m.npz"]
    assert "the bucket 'no-such-bucket-for-vit-jax' does not exist" in one_line_error(
        capsys, "export", argv
    )
    err = one_line_error(capsys, "export", ["--workdir", images, "--format", "jax"])
    assert "no config.json" in err
    argv = [f"--init_from={gone}/m.npz", "--model=mu/4", f"--workdir=gs://{bucket_run}/sweep"]
    err = one_line_error(capsys, "transfer", argv)
    assert "--init_from" in err and "bucket 'no-such-bucket-for-vit-jax' does not exist" in err
    assert storage_server.objects(bucket_run, "sweep") == []


# --- transfer's own files in a bucket ----------------------------------------------------------


def test_transfer_tables_and_run_folders_in_a_bucket(
    storage_server, bucket, empty_cwd, monkeypatch
):
    monkeypatch.chdir(empty_cwd)
    sweep = f"gs://{bucket}/sweep"
    args = transfer.parser().parse_args(["--init_from=x.npz", "--model=mu/4", f"--workdir={sweep}"])
    assert transfer._workdir(args, "vtab/dtd/hparam", 0.01) == f"{sweep}/vtab_dtd_hparam/lr_0.01"
    assert transfer._workdir(args, "folder:/data/x", 0.003) == f"{sweep}/folder__data_x/lr_0.003"
    results = [
        transfer.TaskResult("cifar10", 0.003, 0.5, 0.25),
        transfer.TaskResult("vtab/dtd", 0.01, 0.75, 0.125),
    ]
    markdown = transfer.write_tables(results, sweep, "i21k-b16")
    assert storage_server.objects(bucket) == ["sweep/results.csv", "sweep/results.md"]
    assert storage.read_text(f"{sweep}/results.md") == markdown
    assert "| cifar10 | 0.003 | 50.00 | 25.00 | 99.00 |" in markdown
    rows = storage.read_text(f"{sweep}/results.csv").splitlines()
    assert rows[0] == "task,lr,val top-1 %,test top-1 %,paper (i21k-b16) %"
    assert rows[1:] == ["cifar10,0.003,50.0,25.0,99.0", "vtab/dtd,0.01,75.0,12.5,"]
    transfer.check_init_from(f"{sweep}/results.md")  # exists: no error
