"""Class names travel with the run: the trainer saves them in `class_names.json` when it
starts, and predict and export name classes from there after the data is gone. A run
trained before that still reads them from the data, with a one-line note."""

import json
import os
import shutil

import numpy as np
import pytest
from helpers import ROOT, tiny_config

from vit_jax import cli
from vit_jax.data.sources import folder

IMAGE = os.path.join(ROOT, "docs", "images", "digits", "digit_7.png")
CLASSES = ("brick", "moss")


def write_pngs(root: str) -> None:
    """`root/<split>/<class>/<i>.png`, 8x8 pictures of two colours."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        for index, name in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, name))
            for i in range(count):
                pixels = rng.integers(0, 60, (8, 8, 3)) + 150 * index
                Image.fromarray(pixels.astype(np.uint8)).save(
                    os.path.join(root, split, name, f"{i}.png")
                )


def forget_folders() -> None:
    for cached in (folder.scan_split, folder.class_names, folder.has_class_layout):
        cached.cache_clear()


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> str:
    """A tiny run trained on the relative `folder:imgs`, whose folder is then deleted."""
    from vit_jax import loop

    base = tmp_path_factory.mktemp("class_names")
    workdir = str(base / "run")
    before = os.getcwd()
    os.chdir(base)
    try:
        write_pngs("imgs")
        config = tiny_config(
            dataset="folder:imgs",
            batch_size=8,
            eval_batch_size=8,
            total_steps=2,
            eval_every_steps=2,
            **{"checkpoint.every_steps": 2, "checkpoint.async_save": False},
        )
        loop.run(config, workdir)
        # A copy as a run trained before the names were saved, while the data is there.
        shutil.copytree(workdir, str(base / "old_run"))
        os.remove(str(base / "old_run" / "class_names.json"))
        shutil.rmtree("imgs")
    finally:
        os.chdir(before)
        forget_folders()
    return workdir


def test_the_run_saves_its_class_names(folder_run):
    saved = json.load(open(os.path.join(folder_run, "class_names.json")))
    assert saved == list(CLASSES)


def test_predict_names_classes_without_the_data(folder_run, capsys):
    capsys.readouterr()
    assert cli.run("predict", [f"--workdir={folder_run}", IMAGE, "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert {top["label"] for top in results[0]["top"]} == set(CLASSES)
    assert "note:" not in captured.err


def test_the_export_contract_carries_the_class_names(folder_run, tmp_path, capsys):
    out = str(tmp_path / "model.jax")
    assert cli.run("export", [f"--workdir={folder_run}", "--format=jax", f"--out={out}"]) == 0
    contract = json.load(open(str(tmp_path / "model.json")))
    assert contract["class_names"] == list(CLASSES)
    assert "note:" not in capsys.readouterr().err


def test_a_run_without_saved_names_reads_them_from_the_data_with_a_note(
    folder_run, tmp_path, monkeypatch, capsys
):
    old_run = os.path.join(os.path.dirname(folder_run), "old_run")
    monkeypatch.chdir(os.path.dirname(folder_run))
    write_pngs("imgs")  # the data where the run's relative `folder:imgs` finds it
    try:
        capsys.readouterr()
        assert cli.run("predict", [f"--workdir={old_run}", IMAGE, "--quiet", "--json"]) == 0
        captured = capsys.readouterr()
    finally:
        shutil.rmtree("imgs")
        forget_folders()
    assert {top["label"] for top in json.loads(captured.out)[0]["top"]} == set(CLASSES)
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "class_names.json" in notes[0]
    assert "read from the data" in notes[0]


def test_without_saved_names_or_data_indices_are_shown_with_a_note(folder_run, capsys):
    old_run = os.path.join(os.path.dirname(folder_run), "old_run")
    capsys.readouterr()
    assert cli.run("predict", [f"--workdir={old_run}", IMAGE, "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    assert {top["label"] for top in json.loads(captured.out)[0]["top"]} == {0, 1}
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "indices are shown" in notes[0]
