"""Output paths of export, visualize and the transfer sweep are checked before any work:
a missing or unwritable parent, a parent that is a file, a folder where a file is wanted.
One line, exit status 2, nothing written."""

import os

import pytest

from vit_jax import cli, storage
from vit_jax.errors import UserError


@pytest.fixture
def a_file(tmp_path) -> str:
    path = tmp_path / "a_file"
    path.write_text("x")
    return str(path)


def test_check_output_says_what_is_wrong_with_each_path(tmp_path, a_file):
    storage.check_output(str(tmp_path / "new" / "deeper" / "x.npz"), "--out")  # created
    assert os.path.isdir(tmp_path / "new" / "deeper")
    cases = [
        (f"{a_file}/x.npz", {}, f"{a_file} is a file, not a folder"),
        (str(tmp_path), {}, "is a folder; give a file name"),
        (a_file, {"folder": True}, "is a file; give a folder"),
        ("/proc/nope/x.npz", {}, "cannot write there"),
    ]
    if os.geteuid() != 0:  # root writes anywhere a plain folder allows
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o500)
        cases.append((str(read_only / "x.npz"), {}, "Permission denied"))
    for path, options, message in cases:
        with pytest.raises(UserError, match=message):
            storage.check_output(path, "--out", **options)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["export", "--format=npz", "--out={a_file}/x.npz"], "is a file, not a folder"),
        (["export", "--format=jax", "--out=/proc/nope/x.jax"], "cannot write there"),
        (["export", "--format=npz", "--out={tmp}"], "is a folder; give a file name"),
        (["visualize", "posemb", "--out=/proc/nope/pictures"], "cannot write there"),
        (["visualize", "posemb", "--out={a_file}"], "is a file; give a folder"),
    ],
)
def test_commands_refuse_an_output_path_in_one_line(
    command, message, trained_run, tmp_path, a_file, capsys
):
    argv = [a.format(a_file=a_file, tmp=tmp_path) for a in command]
    before = sorted(os.listdir(trained_run))
    assert cli.run(argv[0], [*argv[1:], f"--workdir={trained_run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and err.count("\n") == 1 and message in err, err
    assert sorted(os.listdir(trained_run)) == before  # nothing written into the run


def image_folder(root) -> str:
    """root/{train,val,test}/{a,b}/*.png: the smallest folder dataset with a val split."""
    import numpy as np
    from PIL import Image

    for split in ("train", "val", "test"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = np.full((8, 8, 3), 40 * i + (label == "b") * 100, np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return str(root)


def test_the_transfer_sweep_checks_its_workdir_before_training(
    trained_run, tmp_path, a_file, capsys
):
    argv = [
        f"--init_from={trained_run}",
        "--model=mu/4",
        f"--workdir={a_file}",
        f"--tasks=folder:{image_folder(tmp_path / 'images')}",
        "--lrs=0.01",
    ]
    assert cli.run("transfer", argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: --workdir {a_file} is a file; give a folder\n"
