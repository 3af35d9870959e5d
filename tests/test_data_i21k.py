"""ImageNet-21k from per-class tars: members streamed, fixed held-out slice, sharding, and
the index cache (processes racing to build it, broken files, tars in a bucket)."""

import io
import logging
import multiprocessing
import os
import tarfile
import warnings

import numpy as np
import pytest
from data_fixtures.images import write_i21k_tars

from vit_jax import data, storage
from vit_jax.data.sources import imagenet21k

COUNTS = {"n02000001": 7, "n01000001": 5, "n03000001": 6}  # Written out of sorted order.
PP = "decode|value_range(0, 255)|onehot({num_classes})"
INDEX = imagenet21k.INDEX_FILE


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


# The index cache: atomic replacement, broken files, buckets.


def index_arrays(index):
    return [index.tar_id, index.offset, index.size]


def write_many_member_tars(root, num_tars=4, members=1000):
    """Tars of many tiny members (the index does not look inside them): a scan that takes a
    moment, so that processes building the index at once overlap."""
    os.makedirs(root, exist_ok=True)
    for t in range(num_tars):
        with tarfile.open(os.path.join(root, f"n0{t}.tar"), "w") as tar:
            for i in range(members):
                info = tarfile.TarInfo(f"{t}_{i}.JPEG")
                info.size = 1 + (i % 7)
                tar.addfile(info, io.BytesIO(b"x" * info.size))


ROUNDS = 10  # Races, each over a fresh copy of the dataset folder (hard links to the tars).


def race(roots, out, barrier):
    """One racing process: builds each root's index when the other does, then reloads it
    from the cache while the other may be writing it; saves what it got and how often it
    scanned (twice for a root means it met a broken cache)."""
    scans, broken = [], []
    scan = imagenet21k._scan
    imagenet21k._scan = lambda root, tars: scans.append(root) or scan(root, tars)
    handler = logging.Handler()
    handler.emit = lambda record: broken.append(record.getMessage())
    imagenet21k._log.addHandler(handler)
    got = []
    for root in roots:
        imagenet21k.load_index.cache_clear()
        barrier.wait(timeout=60)  # Both processes start building at the same moment.
        got.append(index_arrays(imagenet21k.load_index(root)))
        for _ in range(10):
            imagenet21k.load_index.cache_clear()
            again = index_arrays(imagenet21k.load_index(root))
            assert all(np.array_equal(a, b) for a, b in zip(again, got[-1], strict=True))
    np.savez(out, *(a for g in got for a in g), scans=scans, broken=broken)


def test_processes_building_the_index_at_once_agree(tmp_path):
    first = str(tmp_path / "i21k_0")
    write_many_member_tars(first)
    roots = [first]
    for k in range(1, ROUNDS):
        roots.append(str(tmp_path / f"i21k_{k}"))
        os.mkdir(roots[-1])
        for name in os.listdir(first):
            os.link(os.path.join(first, name), os.path.join(roots[-1], name))
    # Forked (not fresh) interpreters: they start at once instead of importing TensorFlow
    # for many seconds each, and run only numpy and file code.
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    outs = [str(tmp_path / f"out{i}.npz") for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # JAX: fork; the children use none.
        racers = [context.Process(target=race, args=(roots, out, barrier)) for out in outs]
        for racer in racers:
            racer.start()
    for racer in racers:
        racer.join(timeout=120)
        assert racer.exitcode == 0
    results = [np.load(out) for out in outs]
    for result in results:
        assert result["broken"].tolist() == []  # Never saw a half-written cache.
    scans = [result["scans"].tolist() for result in results]
    assert all(len(set(s)) == len(s) for s in scans)  # No process scanned a root twice.
    assert set(scans[0]) | set(scans[1]) == set(roots)
    imagenet21k.load_index.cache_clear()
    want = index_arrays(imagenet21k.load_index(first))
    assert len(want[0]) == 4 * 1000
    for result in results:  # Every root's index, as each process got it.
        got = [result[f"arr_{i}"] for i in range(3 * ROUNDS)]
        assert all(np.array_equal(a, want[i % 3]) for i, a in enumerate(got))
    tars = imagenet21k._tars(first)
    fresh = imagenet21k._scan(first, list(tars))
    for root in roots:  # The cache files are valid and complete.
        with open(os.path.join(root, INDEX), "rb") as f:
            cached = imagenet21k._decode_index(f.read(), tars)
        assert all(np.array_equal(a, b) for a, b in zip(cached, fresh, strict=True))
        assert sorted(os.listdir(root)) == sorted([*tars, INDEX])  # No temporary files left.


def valid_cache(root):
    imagenet21k.load_index.cache_clear()
    want = index_arrays(imagenet21k.load_index(root))
    with open(os.path.join(root, INDEX), "rb") as f:
        return want, f.read()


def inconsistent_cache(root, content):
    """A readable index whose members lie outside their tars."""
    tars = imagenet21k._tars(root)
    tar_id, offset, size = imagenet21k._decode_index(content, tars)
    return imagenet21k._encode_index(tars, (tar_id, offset + 10**9, size))


@pytest.mark.parametrize(
    "damage",
    [
        lambda root, content: b"",
        lambda root, content: b"not an index at all",
        lambda root, content: content[: len(content) // 2],
        lambda root, content: content[:-40],
        inconsistent_cache,
    ],
    ids=["empty", "garbage", "half", "cut_end", "inconsistent"],
)
def test_broken_cache_is_rebuilt(root, damage, caplog):
    want, content = valid_cache(root)
    with open(os.path.join(root, INDEX), "wb") as f:
        f.write(damage(root, content))
    imagenet21k.load_index.cache_clear()
    with caplog.at_level(logging.WARNING, logger=imagenet21k.__name__):
        got = index_arrays(imagenet21k.load_index(root))
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert "broken" in caplog.text and INDEX in caplog.text
    with open(os.path.join(root, INDEX), "rb") as f:  # Rewritten whole.
        cached = imagenet21k._decode_index(f.read(), imagenet21k._tars(root))
    order = np.argsort(imagenet21k.splits.deterministic_order(len(want[0])))
    assert all(np.array_equal(a[order], b) for a, b in zip(want, cached, strict=True))


def test_cache_of_other_tars_is_replaced(root):
    valid_cache(root)
    write_i21k_tars(root, {"n00000001": 2})  # A new first class.
    imagenet21k.load_index.cache_clear()
    index = imagenet21k.load_index(root)
    assert len(index.tars) == 4 and len(index.offset) == 20
    assert np.bincount(index.tar_id).tolist() == [2, 5, 7, 6]
    tars = imagenet21k._tars(root)
    with open(os.path.join(root, INDEX), "rb") as f:
        cached = imagenet21k._decode_index(f.read(), tars)
    assert cached is not None and len(cached[0]) == 20


def test_read_only_folder_is_scanned_without_a_cache(root, monkeypatch, caplog):
    def refuse(path, content):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(storage, "write_bytes", refuse)
    with caplog.at_level(logging.WARNING, logger=imagenet21k.__name__):
        assert data.num_examples(config(root)) == 12
    assert "cannot write" in caplog.text
    assert not os.path.exists(os.path.join(root, INDEX))


def upload(local_root, url):
    for name in sorted(os.listdir(local_root)):
        with open(os.path.join(local_root, name), "rb") as f:
            storage.write_bytes(storage.join(url, name), f.read())


def test_index_of_tars_in_a_bucket(root, storage_server, bucket, monkeypatch):
    local = index_arrays(imagenet21k.load_index(root))
    os.remove(os.path.join(root, INDEX))
    url = f"gs://{bucket}/i21k"
    upload(root, url)
    imagenet21k.load_index.cache_clear()
    index = imagenet21k.load_index(url)
    assert index.tars == tuple(f"{url}/{w}.tar" for w in sorted(COUNTS))
    assert index.tar_sizes == tuple(
        os.path.getsize(os.path.join(root, w + ".tar")) for w in sorted(COUNTS)
    )
    assert all(np.array_equal(a, b) for a, b in zip(index_arrays(index), local, strict=True))
    assert f"i21k/{INDEX}" in storage_server.objects(bucket)
    # Loaded again from the bucket's cache, without scanning; sizes through the data API.
    imagenet21k.load_index.cache_clear()
    monkeypatch.setattr(imagenet21k, "_scan", None)
    cfg = config(url)
    assert data.num_classes(cfg) == 3 and data.num_examples(cfg) == 12
    assert data.num_examples(cfg, "val") == 3
    imagenet21k.load_index.cache_clear()
    with pytest.raises(data.DataError, match="per-class tars"):
        data.num_examples(config(f"gs://{bucket}/nothing-here"))
