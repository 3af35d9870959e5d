"""The digits preset end to end: batches, determinism, resuming, multi-host, eval padding."""

import itertools

import numpy as np
import pytest

from vit_jax import data
from vit_jax.data.sources import digits


def take(it, n):
    return list(itertools.islice(it, n))


def test_digits_splits_are_fixed_and_disjoint():
    train_x, train_y = digits.load_split("train")
    test_x, test_y = digits.load_split("test")
    assert len(train_y) + len(test_y) == 1797
    assert 340 <= len(test_y) <= 370
    assert set(np.unique(test_y)) == set(range(10))
    assert train_x.dtype == np.uint8 and train_x.shape[1:] == (8, 8, 1)
    train_set = {x.tobytes() for x in train_x}
    # The test split is not a copy of training images (a few duplicates exist in the data).
    assert sum(x.tobytes() in train_set for x in test_x) < 10


def test_the_file_reads_as_scikit_learns_load_digits():
    """The images and labels, read from scikit-learn's file without importing it, are what
    `sklearn.datasets.load_digits` gives, in its order."""
    from sklearn.datasets import load_digits

    reference = load_digits()
    pixels, target = digits._read_file()
    np.testing.assert_array_equal(pixels.reshape(-1, 8, 8), reference.images)
    np.testing.assert_array_equal(target, reference.target)
    images, labels = digits.load_split("test")
    first_seven = np.flatnonzero(reference.target == 7)[4]  # the 5th 7 is the first test 7
    np.testing.assert_array_equal(
        images[np.flatnonzero(labels == 7)[0], :, :, 0],
        np.round(reference.images[first_seven] * 255.0 / 16.0).astype(np.uint8),
    )


def test_train_batches_shapes_and_ranges():
    cfg = data.get_data_config("digits")
    batch = next(
        data.train_batches(cfg, global_batch_size=16, seed=0, process_index=0, process_count=1)
    )
    assert set(batch) == {"image", "labels"}
    assert batch["image"].shape == (16, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["labels"].shape == (16, 10) and batch["labels"].dtype == np.float32
    assert -1.0 <= batch["image"].min() < 0 < batch["image"].max() <= 1.0
    np.testing.assert_array_equal(batch["labels"].sum(-1), 1.0)


def test_image_size_override_rebuilds_pp():
    cfg = data.get_data_config("digits", image_size=24)
    batch = next(
        data.train_batches(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1)
    )
    assert batch["image"].shape == (8, 24, 24, 3)
    cfg.image_size = 12
    batch = next(
        data.eval_batches(cfg, "test", global_batch_size=8, process_index=0, process_count=1)
    )
    assert batch["image"].shape == (8, 12, 12, 3)


def test_same_seed_same_batches_other_seed_differs():
    cfg = data.get_data_config("digits")
    kw = dict(global_batch_size=32, process_index=0, process_count=1)
    a = take(data.train_batches(cfg, seed=1, **kw), 3)
    b = take(data.train_batches(cfg, seed=1, **kw), 3)
    c = take(data.train_batches(cfg, seed=2, **kw), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["labels"], y["labels"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("start_step", [7, 45, 100])  # within, at and past epoch boundaries
def test_resume_from_step_is_bit_identical(start_step):
    cfg = data.get_data_config("digits")
    kw = dict(global_batch_size=32, seed=3, process_index=0, process_count=1)
    fresh = take(data.train_batches(cfg, **kw), start_step + 3)
    resumed = take(data.train_batches(cfg, start_step=start_step, **kw), 3)
    for x, y in zip(fresh[start_step:], resumed, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["labels"], y["labels"])


def test_epochs_cover_training_set_and_reshuffle():
    cfg = data.get_data_config("digits", train={"pp": "decode|value_range(0, 255)|onehot(10)"})
    n = data.num_examples(cfg)
    batches = take(
        data.train_batches(cfg, global_batch_size=n, seed=0, process_index=0, process_count=1), 2
    )
    train_x, _ = digits.load_split("train")
    want = sorted(x.tobytes() for x in train_x)
    for b in batches:
        got = sorted(np.round(x[..., :1]).astype(np.uint8).tobytes() for x in b["image"])
        assert got == want  # Each epoch is a permutation of the training set.
    assert not np.array_equal(batches[0]["image"], batches[1]["image"])


def test_multihost_train_parts_are_disjoint_and_complete():
    cfg = data.get_data_config(
        "digits", train={"pp": "decode|value_range(0, 255)|onehot(10)", "shuffle_buffer": 1}
    )
    n = data.num_examples(cfg)
    seen = []
    for i in range(3):
        local = n // 3
        batch = next(
            data.train_batches(
                cfg, global_batch_size=3 * local, seed=0, process_index=i, process_count=3
            )
        )
        assert batch["image"].shape[0] == local
        seen.append({x.tobytes() for x in batch["image"]})
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


def test_eval_sees_every_example_once_with_padding():
    cfg = data.get_data_config("digits", evals={"test": {"pp": "decode|onehot(10)"}})
    n = data.num_examples(cfg, "test")
    batches = list(
        data.eval_batches(cfg, "test", global_batch_size=64, process_index=0, process_count=1)
    )
    assert len(batches) == -(-n // 64)
    assert all(b["image"].shape[0] == 64 and b["mask"].shape == (64,) for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == n and mask[:n].all() and not mask[n:].any()
    last = batches[-1]
    assert not last["image"][last["mask"] == 0].any()
    images = np.concatenate([b["image"] for b in batches])[:n, ..., 0].astype(np.uint8)
    test_x, test_y = digits.load_split("test")
    np.testing.assert_array_equal(images, test_x[..., 0])
    labels = np.concatenate([b["labels"] for b in batches])[:n].argmax(-1)
    np.testing.assert_array_equal(labels, test_y)


def test_multihost_eval_lockstep_and_complete():
    cfg = data.get_data_config("digits", evals={"test": {"pp": "decode|onehot(10)"}})
    n = data.num_examples(cfg, "test")
    seen, counts = [], []
    for i in range(4):
        batches = list(
            data.eval_batches(cfg, "test", global_batch_size=40, process_index=i, process_count=4)
        )
        counts.append(len(batches))
        for b in batches:
            seen.extend(
                x[..., 0].tobytes() for x, m in zip(b["image"], b["mask"], strict=True) if m
            )
    assert len(set(counts)) == 1  # Every process yields the same number of batches.
    test_x, _ = digits.load_split("test")
    assert len(seen) == n
    assert sorted(seen) == sorted(x[..., 0].astype(np.float32).tobytes() for x in test_x)


def test_batch_size_must_divide_over_processes():
    cfg = data.get_data_config("digits")
    with pytest.raises(ValueError, match="multiple of process_count"):
        next(
            data.train_batches(cfg, global_batch_size=10, seed=0, process_index=0, process_count=3)
        )


def test_num_classes_and_examples():
    cfg = data.get_data_config("digits")
    assert data.num_classes(cfg) == 10
    assert data.num_examples(cfg) + data.num_examples(cfg, "test") == 1797
    cfg.train.split = "train[:10%]"
    assert data.num_examples(cfg) == round(0.1 * (1797 - data.num_examples(cfg, "test")))
    with pytest.raises(KeyError, match="unknown split"):
        data.num_examples(cfg, "nope")


def test_label_outside_class_range_fails_with_clear_message():
    cfg = data.get_data_config("digits", num_classes=5)
    with pytest.raises(data.DataError, match="dataset 'digits'.*label out of range.*num_classes"):
        for _ in data.eval_batches(
            cfg, "test", global_batch_size=64, process_index=0, process_count=1
        ):
            pass


def test_bad_pp_in_config_names_the_op():
    cfg = data.get_data_config("digits", train={"pp": "decode|sharpen(2)|onehot(10)"})
    with pytest.raises(data.PPError, match="unknown pp op 'sharpen'.*flip_lr"):
        data.train_batches(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1)
