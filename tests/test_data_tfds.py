"""TFDS sources: presets under tfds.testing.mock_data, and a tiny real dataset for splits."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_fixtures import tiny_tfds

from vit_jax import data

SMALL = {"image_size": 32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds"))
    return tiny_tfds.build(root), root


def tiny_config(tiny, **train):
    name, root = tiny
    pp = "decode|value_range(0, 255)|onehot({num_classes})"
    return data.get_data_config(
        f"tfds:{name}",
        image_size=8,
        train={"data_dir": root, "pp": pp, **train},
        evals={"test": {"data_dir": root, "pp": pp}},
    )


def example_ids(batches):
    ids = []
    for b in batches:
        mask = b.get("mask", np.ones(len(b["image"])))
        ids.extend(int(x[0, 0, 0]) for x, m in zip(b["image"], mask, strict=True) if m)
    return ids


def direct_ids(tiny, split):
    name, root = tiny
    ds = tfds.builder(name, data_dir=root).as_dataset(split=split)
    return sorted(int(x["image"][0, 0, 0]) for x in ds.as_numpy_iterator())


def test_imagenet2012_preset_under_mock_data():
    cfg = data.get_data_config("imagenet2012", **SMALL)
    assert set(cfg.evals) == {"minival", "val", "real", "v2"}
    with tfds.testing.mock_data(num_examples=6):
        assert data.num_classes(cfg) == 1000
        batch = next(
            data.train_batches(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
        )
        assert batch["image"].shape == (4, 32, 32, 3)
        assert -1 <= batch["image"].min() and batch["image"].max() <= 1
        np.testing.assert_array_equal(batch["labels"].sum(-1), 1)
        batches = list(
            data.eval_batches(cfg, "val", global_batch_size=4, process_index=0, process_count=1)
        )
    assert [b["mask"].sum() for b in batches] == [4, 2]


def test_real_labels_are_multi_hot_under_mock_data():
    cfg = data.get_data_config("imagenet2012", **SMALL)
    with tfds.testing.mock_data(num_examples=5):
        batches = list(
            data.eval_batches(cfg, "real", global_batch_size=8, process_index=0, process_count=1)
        )
    (batch,) = batches
    assert batch["labels"].shape == (8, 1000)
    assert set(np.unique(batch["labels"])) <= {0.0, 1.0}
    real = batch["mask"] == 1
    assert real.sum() >= 1 and (batch["labels"][real].sum(-1) >= 1).all()
    assert batch["labels"][real].sum(-1).max() > 1  # Several valid labels per image.


def test_cifar10_and_generic_tfds_under_mock_data():
    with tfds.testing.mock_data(num_examples=4):
        cfg = data.get_data_config("cifar10", **SMALL)
        batch = next(
            data.train_batches(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)
        )
        assert batch["labels"].shape == (2, 10)
        generic = data.get_data_config("tfds:mnist", image_size=8)
        assert generic.num_classes is None and data.num_classes(generic) == 10
        batch = next(
            data.eval_batches(
                generic, "test", global_batch_size=4, process_index=0, process_count=1
            )
        )
        assert batch["image"].shape == (4, 8, 8, 3) and batch["labels"].shape == (4, 10)


def test_tiny_dataset_counts_classes_and_slices(tiny):
    cfg = tiny_config(tiny, split="train[:25%]+train[50%:]")
    assert data.num_classes(cfg) == tiny_tfds.NUM_CLASSES
    assert data.num_examples(cfg) == 15 and data.num_examples(cfg, "test") == 7
    cfg.evals.test.split = "train[:25%]+train[50%:]"
    ids = example_ids(
        data.eval_batches(cfg, "test", global_batch_size=4, process_index=0, process_count=1)
    )
    assert sorted(ids) == direct_ids(tiny, "train[:25%]+train[50%:]") and len(ids) == 15


def test_tiny_eval_multihost_disjoint_complete_lockstep(tiny):
    cfg = tiny_config(tiny)
    ids, lengths = [], []
    for i in range(3):
        batches = list(
            data.eval_batches(cfg, "test", global_batch_size=6, process_index=i, process_count=3)
        )
        lengths.append(len(batches))
        ids.extend(example_ids(batches))
    assert len(set(lengths)) == 1
    assert sorted(ids) == list(range(100, 107))


def test_tiny_train_multihost_disjoint_and_resumable(tiny):
    cfg = tiny_config(tiny, shuffle_buffer=64)
    parts = []
    for i in range(2):
        it = data.train_batches(cfg, global_batch_size=20, seed=0, process_index=i, process_count=2)
        first = next(it)
        parts.append(set(example_ids([first])))
        again = next(
            data.train_batches(
                cfg, global_batch_size=20, seed=0, start_step=1, process_index=i, process_count=2
            )
        )
        np.testing.assert_array_equal(next(it)["image"], again["image"])
    assert not parts[0] & parts[1] and parts[0] | parts[1] == set(range(20))


def test_manual_download_missing_says_what_to_do(tmp_path):
    cfg = data.get_data_config("imagenet2012", train={"data_dir": str(tmp_path)})
    with pytest.raises(data.DataError, match="manual download.*tfds build imagenet2012"):
        next(data.train_batches(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1))


def test_unprepared_dataset_and_unknown_name(tmp_path):
    cfg = data.get_data_config("cifar10", train={"data_dir": str(tmp_path)})
    with pytest.raises(data.DataError, match="not prepared.*tfds build cifar10"):
        next(data.train_batches(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1))
    cfg = data.get_data_config("tfds:no_such_dataset_xyz")
    with pytest.raises(data.DataError, match="unknown TFDS dataset"):
        data.num_classes(cfg)
