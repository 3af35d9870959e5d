"""JFT-like multi-label shards: the writer (folder and CSV input) and the sharded reader."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from data_fixtures.images import encode, pattern, write_folder

from vit_jax import data
from vit_jax.data import write_shards
from vit_jax.data.sources import jft

PP = "decode|value_range(0, 255)|onehot({num_classes}, multi=True)"


def jft_config(root, split="train"):
    s = {"data_dir": root, "split": split, "pp": PP}
    return data.get_data_config("jft", image_size=8, train=s, evals={"val": s})


@pytest.fixture
def csv_shards(tmp_path):
    jft.load_metadata.cache_clear()
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    rows = []
    for i in range(10):
        (img_dir / f"{i}.png").write_bytes(encode(pattern(8, 8, i)))
        rows.append(f"img/{i}.png,{i % 5} {(i * 3) % 7}" if i % 4 else f"img/{i}.png,{i % 5}")
    (tmp_path / "labels.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    out = tmp_path / "shards"
    meta = write_shards.write_shards(
        write_shards.read_csv(str(tmp_path / "labels.csv")), str(out), num_shards=4, num_classes=7
    )
    return str(out), meta


def test_writer_metadata(csv_shards):
    out, meta = csv_shards
    assert meta["num_classes"] == 7 and meta["num_examples"] == 10
    assert [s["num_examples"] for s in meta["shards"]] == [3, 3, 2, 2]
    with open(os.path.join(out, "train.json")) as f:
        assert json.load(f) == meta
    assert all(os.path.exists(os.path.join(out, s["file"])) for s in meta["shards"])


def test_reader_gives_multi_hot_labels(csv_shards):
    out, _ = csv_shards
    cfg = jft_config(out)
    assert data.num_classes(cfg) == 7 and data.num_examples(cfg) == 10
    batches = list(
        data.eval_batches(cfg, "val", global_batch_size=4, process_index=0, process_count=1)
    )
    labels = np.concatenate([b["labels"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 10 and labels.shape == (12, 7)
    per_image = labels[mask == 1].sum(-1)
    assert set(per_image.tolist()) == {1.0, 2.0}
    batch = next(
        data.train_batches(cfg, global_batch_size=5, seed=0, process_index=0, process_count=1)
    )
    assert batch["labels"].shape == (5, 7) and batch["labels"].max() == 1


@pytest.mark.parametrize("count", [2, 3, 5])  # Fewer and more processes than shard files.
def test_hosts_read_disjoint_parts(csv_shards, count):
    out, _ = csv_shards
    cfg = jft_config(out)
    seen, lengths = [], []
    for i in range(count):
        batches = list(
            data.eval_batches(
                cfg, "val", global_batch_size=count, process_index=i, process_count=count
            )
        )
        lengths.append(len(batches))
        seen.extend(
            x.tobytes() for b in batches for x, m in zip(b["image"], b["mask"], strict=True) if m
        )
    assert len(set(lengths)) == 1
    assert len(seen) == 10 and len(set(seen)) == 10


def test_sliced_split(csv_shards):
    out, _ = csv_shards
    cfg = jft_config(out, split="train[2:7]")
    assert data.num_examples(cfg) == 5
    (batch,) = data.eval_batches(cfg, "val", global_batch_size=8, process_index=0, process_count=1)
    assert batch["mask"].sum() == 5


def test_cli_from_folder(tmp_path):
    jft.load_metadata.cache_clear()
    write_folder(str(tmp_path / "src"), {"x": {"a": 3, "b": 2}})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vit_jax.data.write_shards",
            "--input",
            str(tmp_path / "src/x"),
            "--output",
            str(tmp_path / "out"),
            "--num_shards",
            "2",
            "--split",
            "val",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.getcwd(),
    )
    assert json.loads(result.stdout.strip().splitlines()[-1])["num_examples"] == 5
    meta = jft.load_metadata(str(tmp_path / "out"), "val")
    assert meta["class_names"] == ["a", "b"] and meta["num_classes"] == 2


def test_writer_rejects_bad_labels_and_reader_missing_metadata(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        write_shards.write_shards([("x.png", [5])], str(tmp_path), 1, num_classes=3)
    with pytest.raises(data.DataError, match="write_shards"):
        data.num_classes(jft_config(str(tmp_path / "empty")))
