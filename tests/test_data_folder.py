"""Image-folder datasets: any split names, format conversion, bad files, multi-host, and
folders in a bucket."""

import os

import numpy as np
import pytest
from data_fixtures.images import encode, pattern, write_folder

from vit_jax import data, storage
from vit_jax.data.sources import folder

PP = "decode|resize(8)|value_range(0, 1)|onehot({num_classes})"


def folder_config(root, split="train", on_bad_image="skip"):
    return data.get_data_config(
        f"folder:{root}",
        image_size=8,
        train={"split": split, "pp": PP, "on_bad_image": on_bad_image},
        evals={
            s: {"pp": PP, "on_bad_image": on_bad_image}
            for s in sorted(os.listdir(root))
            if s != "train"
        },
    )


@pytest.fixture
def root(tmp_path):
    folder.scan_split.cache_clear()
    folder.class_names.cache_clear()
    write_folder(
        str(tmp_path),
        {"train": {"cat": 5, "dog": 4, "eel": 3}, "holdout_2024": {"cat": 2, "dog": 3}},
    )
    return str(tmp_path)


def test_preset_finds_splits_and_classes(root):
    cfg = data.get_data_config(f"folder:{root}")
    assert cfg.train.source == "folder" and cfg.train.split == "train"
    assert list(cfg.evals) == ["holdout_2024"]
    assert cfg.num_classes is None and data.num_classes(cfg) == 3
    assert data.num_examples(cfg) == 12 and data.num_examples(cfg, "holdout_2024") == 5


def test_eval_labels_follow_sorted_class_names(root):
    cfg = folder_config(root)
    batches = list(
        data.eval_batches(
            cfg, "holdout_2024", global_batch_size=4, process_index=0, process_count=1
        )
    )
    labels = np.concatenate([b["labels"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 5 and len(batches) == 2
    counts = labels[mask == 1].sum(0)
    np.testing.assert_array_equal(counts, [2, 3, 0])  # cat=0, dog=1, eel=2 (absent here).


def test_train_batches_and_slicing(root):
    cfg = folder_config(root)
    batch = next(
        data.train_batches(cfg, global_batch_size=6, seed=0, process_index=0, process_count=1)
    )
    assert batch["image"].shape == (6, 8, 8, 3) and batch["labels"].shape == (6, 3)
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    cfg.train.split = "train[:50%]"
    assert data.num_examples(cfg) == 6


def test_gray_cmyk_alpha_images_become_rgb(tmp_path):
    folder.scan_split.cache_clear()
    cls = tmp_path / "train" / "a"
    cls.mkdir(parents=True)
    img = pattern(9, 7, 0)
    for name, fmt, mode in [
        ("g.png", "PNG", "L"),
        ("c.jpg", "JPEG", "CMYK"),
        ("a.png", "PNG", "RGBA"),
        ("p.png", "PNG", "P"),
    ]:
        (cls / name).write_bytes(encode(img, fmt, mode))
    evals = {"train": {"split": "train", "pp": "decode|onehot(1)"}}
    cfg = data.get_data_config(f"folder:{tmp_path}", evals=evals)
    (batch,) = data.eval_batches(
        cfg, "train", global_batch_size=4, process_index=0, process_count=1
    )
    assert batch["image"].shape == (4, 9, 7, 3) and batch["mask"].sum() == 4


def write_bad_files(root):
    cls = os.path.join(root, "train", "cat")
    good = encode(pattern(10, 10, 1), "JPEG")
    paths = {
        "empty.jpg": b"",
        "text.jpg": b"hello, not an image",
        "cut.jpg": good[: len(good) // 2],
        "cut.png": encode(pattern(10, 10, 2))[:40],
    }
    for name, payload in paths.items():
        with open(os.path.join(cls, name), "wb") as f:
            f.write(payload)
    return sorted(paths)


def test_bad_files_are_counted_skipped_and_named_once(root, caplog):
    bad = write_bad_files(root)
    cfg = folder_config(root)
    with caplog.at_level("WARNING", logger="vit_jax"):
        batches = data.train_batches(
            cfg, global_batch_size=12, seed=0, process_index=0, process_count=1
        )
        batch = next(batches)
        list(
            data.eval_batches(
                cfg, "holdout_2024", global_batch_size=4, process_index=0, process_count=1
            )
        )
        next(
            data.train_batches(cfg, global_batch_size=12, seed=1, process_index=0, process_count=1)
        )
    record = [r for r in caplog.records if "bad image" in r.getMessage()]
    assert len(record) == 1
    message = record[0].getMessage()
    assert message.startswith(f"skipped 4 bad image file(s) in {root}/train: ")
    assert all(name in message for name in bad)
    assert batch["image"].shape[0] == 12 and data.num_examples(cfg) == 12


def test_bad_files_raise_when_asked(root):
    write_bad_files(root)
    cfg = folder_config(root, on_bad_image="error")
    with pytest.raises(data.DataError, match="empty.jpg"):
        next(data.train_batches(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1))


def test_check_image_file_reasons(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"")
    assert folder.check_image_file(str(path)) == "empty file"
    path.write_bytes(encode(pattern(5, 5, 0)))
    assert folder.check_image_file(str(path)) is None


def test_multihost_parts_disjoint_and_complete(root):
    cfg = folder_config(root)
    cfg.train.pp = "decode|value_range(0, 255)|onehot(3)"
    cfg.train.shuffle_buffer = 1
    parts = []
    for i in range(3):
        batch = next(
            data.train_batches(cfg, global_batch_size=12, seed=0, process_index=i, process_count=3)
        )
        parts.append({x.tobytes() for x in batch["image"]})
    assert all(len(p) == 4 for p in parts)
    assert len(parts[0] | parts[1] | parts[2]) == 12


def test_missing_folder_and_split_errors(tmp_path, root):
    with pytest.raises(data.DataError, match="does not exist"):
        data.get_data_config(f"folder:{tmp_path}/nope")
    cfg = folder_config(root, split="validation")
    with pytest.raises(data.DataError, match="holdout_2024"):
        data.num_examples(cfg)


def test_top_level_data_dir_moves_a_dataset_with_one_field(root, tmp_path_factory):
    cfg = data.get_data_config(f"folder:{root}")
    elsewhere = str(tmp_path_factory.mktemp("moved"))
    os.rename(root, os.path.join(elsewhere, "copy"))
    with cfg.unlocked():
        cfg.train.data_dir = None
        for split in cfg.evals.values():
            split.data_dir = None
        cfg.data_dir = os.path.join(elsewhere, "copy")
    assert data.num_examples(cfg) == 12 and data.num_examples(cfg, "holdout_2024") == 5
    batch = next(data.train_batches(cfg, global_batch_size=4, seed=0))
    assert batch["image"].shape[0] == 4


# Folders in a bucket: listing and checks go through vit_jax.storage (images are read by TF).


def upload_tree(local, url):
    """Copies every file under a local folder to the same relative names under ``url``."""
    for folder_path, _, names in os.walk(local):
        for name in names:
            path = os.path.join(folder_path, name)
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(url, os.path.relpath(path, local)), f.read())


def clear_caches():
    for cached in (folder.scan_split, folder.class_names, folder.has_class_layout):
        cached.cache_clear()


def test_folder_in_a_bucket(root, storage_server, bucket):
    bad = write_bad_files(root)
    url = f"gs://{bucket}/images"
    upload_tree(root, url)
    assert len(storage_server.objects(bucket, "images/")) == 12 + 5 + 4
    clear_caches()
    cfg = data.get_data_config(f"folder:{url}")
    assert cfg.train.data_dir == url and list(cfg.evals) == ["holdout_2024"]
    assert data.num_classes(cfg) == 3
    assert data.num_examples(cfg) == 12 and data.num_examples(cfg, "holdout_2024") == 5
    found = folder.scan_split(url, "train")
    local = folder.scan_split(root, "train")
    assert found.paths == tuple(p.replace(root, url) for p in local.paths)
    assert found.labels == local.labels
    assert [(os.path.basename(p), r) for p, r in found.bad] == [
        (os.path.basename(p), r) for p, r in local.bad
    ]
    assert sorted(os.path.basename(p) for p, _ in found.bad) == bad
    with pytest.raises(data.DataError, match="does not exist"):
        data.get_data_config(f"folder:gs://{bucket}/nothing-here")


def test_class_folders_in_a_bucket(tmp_path, bucket):
    write_folder(str(tmp_path), {"x": {"b": 2, "a": 3}})
    url = f"gs://{bucket}/flat"
    upload_tree(str(tmp_path / "x"), url)
    clear_caches()
    assert folder.split_names(url) == [folder.ALL]
    assert folder.class_names(url) == ("a", "b")
    found = folder.scan_split(url, folder.ALL)
    assert sorted(found.labels) == [0, 0, 0, 1, 1] and not found.bad
    assert all(p.startswith(url + "/") for p in found.paths)
