"""Bad inputs a user meets: image folders without images (the dry run), unreadable image
files (predict, the folder source's skipped files) and a finished run started again."""

import json
import logging
import os
import shutil
import warnings

import pytest
from data_fixtures.images import encode, pattern, write_folder
from helpers import RESUME_RUN, tiny_flags

from vit_jax import cli, data, inference
from vit_jax.checkpoint import save_npz
from vit_jax.data.sources import folder
from vit_jax.errors import UserError
from vit_jax.models import create_model

PP = "decode|resize(8)|value_range(0, 1)|onehot({num_classes})"


def dry_run(root, tmp_path, capsys) -> tuple[int, str, str]:
    argv = [f"--config=vit:mu/4,folder:{root},small", f"--workdir={tmp_path / 'run'}"]
    status = cli.run("train", [*argv, "--dry_run"])
    out, err = capsys.readouterr()
    return status, out, err.strip()


def test_the_dry_run_lists_a_folders_classes_and_image_files_per_split(tmp_path, capsys):
    root = tmp_path / "images"
    write_folder(str(root), {"train": {"cat": 3, "dog": 2}, "test": {"cat": 1, "dog": 2}})
    status, out, err = dry_run(root, tmp_path, capsys)
    assert status == 0, err
    assert f"image folder {root}: 2 classes (cat, dog); image files counted by name" in out
    assert "  test: 3 image files in 2 class folders" in out
    assert "  train: 5 image files in 2 class folders" in out


def test_a_folder_is_described_by_file_names_alone(tmp_path, monkeypatch):
    write_folder(str(tmp_path), {"x": {"b": 1, "a": 2}})
    (tmp_path / "x" / "a" / "broken.jpg").write_bytes(b"counted by its name, never opened")

    def opened(path):
        raise AssertionError(f"{path} was opened")

    monkeypatch.setattr(folder, "check_image_file", opened)
    monkeypatch.setattr(folder.storage, "open_file", opened)
    listing = folder.describe(str(tmp_path / "x"))
    assert listing.classes == ("a", "b") and listing.files == {folder.ALL: {"a": 3, "b": 1}}


@pytest.mark.parametrize(
    "layout, empty, expected",
    [
        ({"train": {"cat": 2}, "test": {"cat": 1}}, "train/eel", "class folder '{root}/train/eel' "
         "has no .jpg/.jpeg/.png images; add images or remove the folder"),
        ({"train": {"cat": 2}, "test": {"cat": 1}}, "val", "split folder '{root}/val' has no "
         "class folders, so no images; put its images in {root}/val/<class>/"),
        ({}, "cat", "the class folders under '{root}' (cat, dog) are all empty"),
    ],
)  # fmt: skip
def test_the_dry_run_refuses_a_folder_without_images_in_one_line(
    tmp_path, capsys, layout, empty, expected
):
    root = tmp_path / "images"
    write_folder(str(root), layout)
    os.makedirs(root / empty)
    if not layout:  # class folders only, every one of them empty
        os.makedirs(root / "dog")
    status, _, err = dry_run(root, tmp_path, capsys)
    assert status == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: " + expected.format(root=root)), err


def test_a_percent_split_of_a_small_folder_that_selects_nothing_is_refused_first(tmp_path, capsys):
    """4 images: `all[:90%]` takes all of them and `all[90%:]` none. The dry run and the real
    run refuse that before anything is compiled, in one line naming the field."""
    root = tmp_path / "images"
    write_folder(str(root), {"": {"cat": 2, "dog": 2}})
    status, _, err = dry_run(root, tmp_path, capsys)
    expected = f"error: config.data.evals.val.split='all[90%:]' selects no readable image of {root}"
    assert status == 2 and err.startswith(expected) and len(err.splitlines()) == 1
    workdir = tmp_path / "run"
    flags = ["--config", f"vit:mu/4,folder:{root},small", f"--workdir={workdir}"]
    assert cli.run("train", flags) == 2
    assert capsys.readouterr().err.startswith(expected)
    assert not workdir.exists()


def test_a_decoding_error_names_the_file_not_a_buffer(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_bytes(b"some text, not an image")
    with pytest.raises(UserError) as error:
        inference.read_image(str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: not a readable image (") and "BytesIO" not in message


def test_predict_on_a_folder_predicts_the_readable_files_and_names_each_bad_one(tmp_path, capsys):
    model = create_model("ViT-mu/4", num_classes=3, img_size=8, head_zero_init=False, seed=1)
    save_npz(model, tmp_path / "m.npz")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"good_{i}.png").write_bytes(encode(pattern(8, 8, i)))
    (images / "bad_text.jpg").write_bytes(b"not an image")
    (images / "bad_cut.png").write_bytes(encode(pattern(8, 8, 5))[:40])
    argv = ["--checkpoint", str(tmp_path / "m.npz"), "--model", "ViT-mu/4", "--img_size", "8"]
    status = cli.run("predict", [*argv, "--quiet", "--json", "--batch_size", "2", str(images)])
    out, err = capsys.readouterr()
    assert status == 2
    assert [os.path.basename(r["file"]) for r in json.loads(out)] == [
        "good_0.png",
        "good_1.png",
        "good_2.png",
    ]
    lines = err.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [
        str(images / "bad_cut.png"),
        str(images / "bad_text.jpg"),
    ]
    assert all(line.startswith("error: ") and "not a readable image" in line for line in lines)
    assert "BytesIO" not in err


def test_skipped_folder_images_are_named_once_in_one_logged_line(tmp_path, caplog):
    write_folder(str(tmp_path), {"x": {"a": 6, "b": 5}})
    root = tmp_path / "x"
    bad = root / "a" / "cut.png"
    bad.write_bytes(encode(pattern(8, 8, 9))[:40])
    cfg = data.get_data_config(
        f"folder:{root}", image_size=8, train={"pp": PP}, evals={"val": {"pp": PP}}
    )
    assert cfg.train.split == "all[:90%]" and cfg.evals.val.split == "all[90%:]"  # one scan
    with warnings.catch_warnings(record=True) as python_warnings, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        next(data.train_batches(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1))
        list(data.eval_batches(cfg, "val", global_batch_size=2, process_index=0, process_count=1))
    assert not python_warnings  # a warning would print a line of Python source too
    skipped = [r.getMessage() for r in caplog.records if "bad image" in r.getMessage()]
    assert skipped == [
        f"skipped 1 bad image file(s) in {root}: {bad} (truncated PNG (no IEND chunk))"
    ]


def test_a_finished_run_started_again_says_so_and_logs_nothing_more(straight_run, tmp_path, capsys):
    workdir = str(tmp_path / "finished")
    shutil.copytree(straight_run, workdir)
    metrics = os.path.join(workdir, "metrics.jsonl")
    before = open(metrics).read()
    rows = [json.loads(line) for line in before.splitlines()]
    last = {k: v for r in rows if r["step"] == 6 for k, v in r.items() if "/" in k}
    last = {k: v for k, v in last.items() if not k.startswith("train/")}
    assert {"test/top1", "test_ema/top1"} <= set(last)  # the run keeps a weight EMA
    assert cli.run("train", [*tiny_flags(**RESUME_RUN), f"--workdir={workdir}"]) == 0
    out, err = capsys.readouterr()
    assert open(metrics).read() == before
    assert f"the run in {workdir} is complete: its last checkpoint is step 6 of 6" in err
    assert "test/top1" not in err
    (line,) = out.splitlines()
    assert line.startswith("final evaluation: ")
    for key in ("test/top1", "test/loss", "test_ema/top1"):
        assert f"{key} {last[key]:.4f}" in line
