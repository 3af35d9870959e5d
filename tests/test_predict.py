"""Prediction from a trained run or a released .npz: probabilities, preprocessing, the CLI."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from data_fixtures import tiny_tfds
from data_fixtures.images import write_folder
from flax import nnx
from helpers import TRAINED_RUN, as_in_readme, readme_commands
from PIL import Image

from vit_jax import cli, data, inference
from vit_jax.checkpoint import save_npz
from vit_jax.commands import predict
from vit_jax.data.sources import digits
from vit_jax.models import create_model

NUM_HELDOUT = 60

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(trained_run):
    """The shared tiny ViT trained on digits (tests/conftest.py); prediction only reads it."""
    return trained_run


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """The first held-out (test split) digits as 8x8 grayscale PNG files, and their labels."""
    folder = tmp_path_factory.mktemp("heldout")
    images, labels = digits.load_split("test")
    paths = []
    for i in range(NUM_HELDOUT):
        path = str(folder / f"digit_{i:03d}.png")
        Image.fromarray(images[i, :, :, 0]).save(path)
        paths.append(path)
    return paths, labels[:NUM_HELDOUT]


def test_load_run_restores_the_run_with_its_names_and_eval_preprocessing(run_dir, heldout):
    loaded = inference.load_run(run_dir)
    assert loaded.step == TRAINED_RUN["total_steps"] and loaded.num_classes == 10
    assert loaded.class_names == tuple(str(i) for i in range(10))
    assert loaded.pp == "decode(3)|resize(8)|value_range(-1, 1)"  # onehot(...) left out
    # A PNG file goes through the same ops as the run's evaluation: identical pixels.
    paths, _ = heldout
    batch = next(
        data.eval_batches(
            loaded.config.data, "test", global_batch_size=8, process_index=0, process_count=1
        )
    )
    files = inference.load_images(loaded, paths[:8])
    np.testing.assert_array_equal(files, batch["image"])


def test_probabilities_sum_to_at_most_one_and_match_a_direct_forward(run_dir, heldout):
    loaded = inference.load_run(run_dir)
    paths, _ = heldout
    results = predict.predict(loaded, paths[:10], top_k=4, batch_size=3)
    assert [r["file"] for r in results] == paths[:10]
    # The direct forward pass: the ten images at once through the model, jitted (op by op,
    # every operation would be a compile of its own).
    images = np.stack([loaded.preprocess(inference.read_image(path)) for path in paths[:10]])
    direct = np.asarray(nnx.jit(lambda model, x: model(x))(loaded.model, images))
    for entry, logits in zip(results, direct, strict=True):
        probs = [t["prob"] for t in entry["top"]]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True)
        assert 0.0 < sum(probs) <= 1.0 + 1e-6
        expected = np.asarray(jax.nn.softmax(logits))
        for t in entry["top"]:
            np.testing.assert_allclose(t["prob"], expected[int(t["label"])], rtol=1e-5)
        assert int(entry["top"][0]["label"]) == int(np.argmax(logits))


def test_digits_model_predicts_heldout_pngs_better_than_chance(run_dir, heldout):
    paths, labels = heldout
    results = predict.predict(inference.load_run(run_dir), paths, top_k=1)  # batches of 32
    predicted = np.array([int(r["top"][0]["label"]) for r in results])
    accuracy = float(np.mean(predicted == labels))
    assert accuracy > 0.3, accuracy  # chance is 0.1


def test_cli_json_expands_folders_and_is_well_formed(run_dir, heldout, tmp_path, capsys):
    paths, _ = heldout
    nested = tmp_path / "photos" / "more"
    nested.mkdir(parents=True)
    for i, path in enumerate(paths[:3]):
        target = (nested if i == 2 else tmp_path / "photos") / f"img{i}.png"
        target.write_bytes(open(path, "rb").read())
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    argv = ["--workdir", run_dir, "--json", "--top_k", "3", "--batch_size", "3"]
    assert cli.run("predict", [*argv, str(tmp_path / "photos"), paths[5]]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [os.path.basename(r["file"]) for r in results] == [
        "img0.png",
        "img1.png",
        "img2.png",
        os.path.basename(paths[5]),
    ]
    for entry in results:
        assert set(entry) == {"file", "top"} and len(entry["top"]) == 3
        assert all(t["label"] in [str(i) for i in range(10)] for t in entry["top"])
    assert "4/4 images" in captured.err  # the progress bar


def test_cli_text_output_names_classes(run_dir, heldout, capsys):
    paths, _ = heldout
    assert cli.run("predict", ["--workdir", run_dir, "--quiet", paths[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == paths[0] and len(lines) == 6
    prob, label = lines[1].split()
    assert 0.0 < float(prob) <= 1.0 and label in [str(i) for i in range(10)]


@pytest.mark.slow
def test_released_npz_with_labels_file(tmp_path, heldout, capsys):
    # The model's shapes filled with random values (nothing compiled to initialise it).
    abstract = nnx.eval_shape(lambda: create_model("ViT-mu/4", num_classes=3, img_size=8))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(x.dtype), params)
    model = nnx.merge(graphdef, params, rest)
    save_npz(model, tmp_path / "m.npz")
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    paths, _ = heldout
    argv = ["--checkpoint", str(tmp_path / "m.npz"), "--model", "ViT-mu/4", "--img_size", "8"]
    assert (
        cli.run("predict", [*argv, "--labels", str(tmp_path / "labels.txt"), "--json", paths[0]])
        == 0
    )
    (entry,) = json.loads(capsys.readouterr().out)
    loaded = inference.load_npz_model(str(tmp_path / "m.npz"), "ViT-mu/4", img_size=8)
    assert loaded.num_classes == 3 and loaded.class_names is None  # the count from the head
    image = loaded.preprocess(inference.read_image(paths[0]))
    expected = np.asarray(jax.nn.softmax(nnx.jit(lambda m, x: m(x))(model, image[None])))[0]
    assert len(set(np.round(expected, 4))) == 3  # no ties: the order is the probabilities'
    names = ["cat", "dog", "bird"]
    assert [t["label"] for t in entry["top"]] == [names[i] for i in np.argsort(-expected)]
    np.testing.assert_allclose([t["prob"] for t in entry["top"]], np.sort(expected)[::-1], 1e-5)
    # The size alone names the ViT, as in `--config=vit:mu/4` and `transfer --model`.
    short = [*argv[:2], "--model", "mu/4", *argv[4:]]
    assert (
        cli.run("predict", [*short, "--labels", str(tmp_path / "labels.txt"), "--json", paths[0]])
        == 0
    )
    assert json.loads(capsys.readouterr().out) == [entry]


def one_line_error(capsys, argv) -> str:
    assert cli.run("predict", argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_user_mistakes_give_one_line(run_dir, heldout, tmp_path, capsys):
    paths, _ = heldout
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert "no config.json" in one_line_error(capsys, ["--workdir", str(empty), paths[0]])
    (empty / "config.json").write_text(open(os.path.join(run_dir, "config.json")).read())
    assert "no checkpoints yet" in one_line_error(capsys, ["--workdir", str(empty), paths[0]])
    (empty / "checkpoints").mkdir()
    assert "no complete checkpoint" in one_line_error(capsys, ["--workdir", str(empty), paths[0]])
    missing = str(tmp_path / "nope.jpg")
    assert missing in one_line_error(capsys, ["--workdir", run_dir, missing])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    err = one_line_error(capsys, ["--workdir", run_dir, "--quiet", str(broken)])
    assert str(broken) in err and "not a readable image" in err
    assert "--model" in one_line_error(capsys, ["--checkpoint", str(broken), paths[0]])
    assert "either --workdir" in one_line_error(capsys, [paths[0]])
    assert "--step 7: " in one_line_error(capsys, ["--workdir", run_dir, "--step", "7", paths[0]])
    with pytest.raises(SystemExit) as exit_info:  # argparse's own mistakes: one line too
        cli.run("predict", ["--workdir", run_dir, "--top_k", "x", paths[0]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: argument --top_k") and len(err.splitlines()) == 1


def test_class_names_come_from_the_dataset(tmp_path):
    assert inference.class_names(data.get_data_config("digits")) == tuple("0123456789")
    write_folder(str(tmp_path / "f"), {"train": {"cat": 1, "dog": 1}, "val": {"emu": 1}})
    folder = data.get_data_config(f"folder:{tmp_path / 'f'}")
    assert inference.class_names(folder) == ("cat", "dog", "emu")
    tfds_config = data.get_data_config(f"tfds:{tiny_tfds.build(str(tmp_path / 'tfds'))}")
    tfds_config.data_dir = str(tmp_path / "tfds")
    assert inference.class_names(tfds_config) == ("0", "1", "2")
    assert inference.class_names(data.get_data_config("jft")) is None


def test_a_jpeg_goes_through_the_folder_eval_preprocessing(tmp_path):
    root = tmp_path / "photos"
    layout = {"train": {"a": 1, "b": 1}, "val": {"b": 1}}
    paths = write_folder(str(root), layout, size=(40, 30), fmt="JPEG")
    config = data.get_data_config(f"folder:{root}", image_size=16)
    spec = inference.eval_pp(config, 2)
    assert spec == "decode|resize_small(18)|central_crop(16)|value_range(-1, 1)"
    loaded = inference.LoadedModel(None, None, None, pp=spec, image_size=16)
    batch = next(
        data.eval_batches(config, "val", global_batch_size=1, process_index=0, process_count=1)
    )
    image = loaded.preprocess(inference.read_image(paths["val"][0]))
    np.testing.assert_array_equal(image, batch["image"][0])


def test_a_run_whose_dataset_is_gone_still_loads(run_dir, heldout, tmp_path):
    """Trained (before class names were saved with the run) on a folder that was moved
    away: the class count comes from the checkpoint, and labels are class indices."""
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    (moved / "class_names.json").unlink()
    config = json.loads((moved / "config.json").read_text())
    config["data"]["num_classes"] = None
    config["data"]["train"].update(source="folder", data_dir=str(tmp_path / "gone"))
    (moved / "config.json").write_text(json.dumps(config))
    loaded = inference.load_run(str(moved))
    assert loaded.num_classes == 10 and loaded.class_names is None
    results = predict.predict(loaded, heldout[0][:2], top_k=2)
    assert [type(t["label"]) for r in results for t in r["top"]] == [int] * 4


def test_readme_predict_commands_run(run_dir, heldout, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the README's image paths are relative to the repository
    commands = readme_commands("predict")
    assert len(commands) == 3
    for args in commands:
        assert (
            cli.run("predict", as_in_readme(args, run_dir, **{"new_photo.jpg": heldout[0][0]})) == 0
        )
        assert capsys.readouterr().out
