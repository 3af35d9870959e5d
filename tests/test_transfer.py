"""Fine-tuning from an .npz (another class count and resolution) on a user's image folder,
and the transfer sweep: lr chosen on validation, VTAB retrained on 800+200, tables written."""

import csv
import json
import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.data_fixtures.images import write_folder
from tests.helpers import TINY_MODEL, tiny_overrides
from vit_jax import cli, storage

ARCH = [o for o in TINY_MODEL if "img_size" not in o]
SHORT = ["total_steps=3", "schedule.warmup_steps=1", "batch_size=16", "eval_batch_size=16"]
SHORT += ["log_every_steps=1", "eval_every_steps=3", "checkpoint.every_steps=3"]


@pytest.fixture(scope="module")
def pretrained(trained_run, tmp_path_factory):
    """The session's tiny class-token ViT-mu/4 trained on digits at 8 px (10 classes;
    tests/conftest.py), exported as a public .npz."""
    path = str(tmp_path_factory.mktemp("pretrain") / "pretrained.npz")
    assert cli.run("export", ["--workdir", trained_run, "--format", "npz", "--out", path]) == 0
    return path


def test_finetune_on_an_image_folder_from_an_npz(pretrained, tmp_path, monkeypatch, caplog):
    """The README's worked example: a user's folder, another class count and resolution (the
    command in this process, from the folder's parent)."""
    root = tmp_path / "flowers"
    write_folder(str(root), {"": {"iris": 10, "rose": 10, "tulip": 10}}, size=(20, 20))
    args = [
        "--config=vit:mu/4,folder:" + str(root) + ",finetune_short",
        f"--workdir={tmp_path / 'run'}",
        f"--config.init_from.path={pretrained}",
        "--config.model.img_size=16",  # pre-trained at 8 px: the position embedding resizes
        "--config.model.pool_type=tok",  # as pre-trained
        *(f"--config.{o}" for o in tiny_overrides(total_steps=4, **{"model.img_size": None})),
        "--config.schedule.base_lr=0.01",
    ]
    monkeypatch.chdir(tmp_path)
    log = logging.getLogger("vit_jax")  # the progress messages, which do not propagate
    log.addHandler(caplog.handler)
    try:
        assert cli.run("train", args) == 0
    finally:
        log.removeHandler(caplog.handler)
    assert "initialised from" in caplog.text and "head replaced" in caplog.text, caplog.text
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["recipe"] == "finetune_short" and saved["optim"]["name"] == "sgd"
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any("val/top1" in r for r in records)


@pytest.mark.slow
def test_transfer_sweep_in_a_bucket_selects_on_validation_and_writes_the_tables(
    pretrained, storage_server, bucket, tmp_path, monkeypatch
):
    """--init_from and --workdir as gs:// URLs: the run folders, checkpoints and tables are
    objects in the bucket, and nothing appears in the current directory (no `gs:` folder).
    The lr is chosen on validation; VTAB's is trained again on train800+val200. Flowers, as
    a plain task and as a VTAB task: the same class count, so the same compiled programs."""
    monkeypatch.chdir(tmp_path)
    init_from = f"gs://{bucket}/pretrained.npz"
    storage.write_bytes(init_from, open(pretrained, "rb").read())
    sweep = f"gs://{bucket}/sweep"
    argv = [f"--init_from={init_from}", "--model=mu/4", f"--workdir={sweep}"]
    argv += ["--tasks=oxford_flowers102,vtab/oxford_flowers102", "--lrs=0.003,0.03"]
    argv += ["--recipe=finetune_short"]
    argv += [f"--config.{o}" for o in [*ARCH, "model.img_size=8", "model.pool_type=tok", *SHORT]]
    argv += ["--config.checkpoint.async_save=false"]  # orbax's async writer and mock_data clash
    with tfds.testing.mock_data(num_examples=64):
        assert cli.run("transfer", argv) == 0
    assert os.listdir(tmp_path) == []
    objects = storage_server.objects(bucket, "sweep/")
    run = "sweep/oxford_flowers102/lr_0.03/"
    assert {"sweep/results.csv", "sweep/results.md", f"{run}config.json"} <= set(objects)
    assert any(name.startswith(f"{run}checkpoints/3/") for name in objects), objects
    rows = list(csv.DictReader(storage.read_text(f"{sweep}/results.csv").splitlines()))
    assert [r["task"] for r in rows] == ["oxford_flowers102", "vtab/oxford_flowers102"]

    def last_val(folder: str) -> float:
        text = storage.read_text(f"{sweep}/{folder}/metrics.jsonl")
        return [r["val/top1"] for r in map(json.loads, text.splitlines()) if "val/top1" in r][-1]

    # The chosen lr is the one with the best validation accuracy among the runs.
    for row, select in zip(
        rows, ["oxford_flowers102", "vtab_oxford_flowers102_hparam"], strict=True
    ):
        vals = {lr: last_val(f"{select}/lr_{lr}") for lr in ("0.003", "0.03")}
        assert float(row["lr"]) == float(max(vals, key=vals.get))
        assert np.isclose(float(row["val top-1 %"]), 100 * max(vals.values()), atol=0.01)
    final = f"sweep/vtab_oxford_flowers102/lr_{float(rows[1]['lr']):g}/metrics.jsonl"
    assert final in objects
    assert "| oxford_flowers102 |" in storage.read_text(f"{sweep}/results.md")


def test_sweep_checks_every_config_before_training(pretrained, tmp_path, capsys):
    argv = [f"--init_from={pretrained}", "--model=mu/4", f"--workdir={tmp_path}"]
    assert cli.run("transfer", [*argv, "--tasks=cifar10,cifar11"]) == 2
    assert "unknown data preset 'cifar11'" in capsys.readouterr().err
    assert cli.run("transfer", [*argv, "--tasks=digits"]) == 2  # no val split: lr chosen on what?
    assert "digits has no 'val' split" in capsys.readouterr().err
    assert cli.run("transfer", [*argv, "--lrs=fast"]) == 2
    capsys.readouterr()
    flexi = [*argv, "--tasks=cifar10", "--config.model.patch_sizes=4,8"]
    assert cli.run("transfer", flexi) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.model.patch_sizes=(4, 8): transfer selects" in err
    assert cli.run("transfer", [*argv, "--tasks=paper", "--dry_run"]) == 0
    assert "oxford_flowers102: lrs" in capsys.readouterr().out
    assert not os.listdir(tmp_path)  # nothing trained, nothing written
