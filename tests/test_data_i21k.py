"""ImageNet-21k from per-class tars: members streamed, fixed held-out slice, sharding."""

import os

import numpy as np
import pytest
from data_fixtures.images import write_i21k_tars

from vit_jax import data
from vit_jax.data.sources import imagenet21k

COUNTS = {"n02000001": 7, "n01000001": 5, "n03000001": 6}  # Written out of sorted order.
PP = "decode|value_range(0, 255)|onehot({num_classes})"


@pytest.fixture
def root(tmp_path):
    imagenet21k.load_index.cache_clear()
    write_i21k_tars(str(tmp_path), COUNTS)
    return str(tmp_path)


def config(root, heldout=6, **train):
    split = {"data_dir": root, "heldout_examples": heldout, "pp": PP}
    return data.get_data_config(
        "imagenet21k", train={**split, **train}, evals={"val": split, "test": split}
    )


def all_examples(cfg, name, process_index=0, process_count=1):
    out = []
    for b in data.eval_batches(
        cfg, name, global_batch_size=4, process_index=process_index, process_count=process_count
    ):
        for x, y, m in zip(b["image"], b["labels"], b["mask"], strict=True):
            if m:
                out.append((x.tobytes(), int(y.argmax())))
    return out


def test_classes_follow_sorted_wnids(root):
    cfg = config(root)
    assert cfg.multi_label and data.num_classes(cfg) == 3
    cfg.evals.val.split = "full"
    labels = [y for _, y in all_examples(cfg, "val")]
    assert sorted(np.bincount(labels).tolist()) == sorted(COUNTS.values())
    assert np.bincount(labels).tolist() == [5, 7, 6]  # n01..., n02..., n03...


def test_heldout_slices_are_fixed_and_disjoint(root):
    cfg = config(root)
    assert data.num_examples(cfg) == 12
    assert data.num_examples(cfg, "val") == 3 and data.num_examples(cfg, "test") == 3
    val, test = all_examples(cfg, "val"), all_examples(cfg, "test")
    cfg.evals.val.split = "train"
    train = all_examples(cfg, "val")
    keys = [set(k for k, _ in part) for part in (val, test, train)]
    assert len(keys[0] | keys[1] | keys[2]) == 18
    imagenet21k.load_index.cache_clear()  # Reloads from the cached index file.
    assert os.path.exists(os.path.join(root, imagenet21k.INDEX_FILE))
    assert all_examples(config(root), "val") == val


def test_train_is_deterministic_and_sharded(root):
    cfg = config(root, shuffle_buffer=32)
    a = next(data.train_batches(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1))
    b = next(data.train_batches(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1))
    np.testing.assert_array_equal(a["image"], b["image"])
    cfg.evals.val.split = "train"
    parts = [set(k for k, _ in all_examples(cfg, "val", i, 2)) for i in range(2)]
    assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == 12


def test_missing_folder_is_explained(tmp_path):
    imagenet21k.load_index.cache_clear()
    cfg = config(str(tmp_path / "nope"))
    with pytest.raises(data.DataError, match="per-class tars"):
        data.num_examples(cfg)
