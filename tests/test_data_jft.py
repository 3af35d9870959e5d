"""JFT-like multi-label shards: the writer (folder and CSV input), the sharded reader, and
shards in a bucket."""

import contextlib
import json
import os

import numpy as np
import pytest
from data_fixtures.images import encode, pattern, write_folder

from vit_jax import cli, data, storage
from vit_jax.data._tf import tf
from vit_jax.data.sources import jft
from vit_jax.tools import write_shards

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


def test_cli_from_folder(tmp_path, capsys):
    jft.load_metadata.cache_clear()
    write_folder(str(tmp_path / "src"), {"x": {"a": 3, "b": 2}})
    args = ["--input", str(tmp_path / "src/x"), "--output", str(tmp_path / "out")]
    assert cli.run("write_shards", [*args, "--num_shards", "2", "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["num_examples"] == 5
    meta = jft.load_metadata(str(tmp_path / "out"), "val")
    assert meta["class_names"] == ["a", "b"] and meta["num_classes"] == 2


def test_writer_rejects_bad_labels_and_reader_missing_metadata(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        write_shards.write_shards([("x.png", [5])], str(tmp_path), 1, num_classes=3)
    with pytest.raises(data.DataError, match="write_shards"):
        data.num_classes(jft_config(str(tmp_path / "empty")))


# Seeded epoch order and cheap resume (generated shards: record i has id str(i)).

SHARD = 20  # Records per shard.


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """24 shards of 20 tiny records; record i lies in shard i // 20."""
    root = str(tmp_path_factory.mktemp("synthetic"))
    write_shards.write_synthetic(root, 24 * SHARD, 24, num_classes=5)
    jft.load_metadata.cache_clear()
    return root


def synthetic_config(root, window=16, cycle_length=4):
    s = {"data_dir": root, "split": "train", "pp": PP, "shuffle_buffer": window}
    s["cycle_length"] = cycle_length
    return data.get_data_config("jft", image_size=8, train=s, evals={"val": s})


def record_ids(cfg, process_index, process_count, *, epoch=0, count=None, seed=0):
    """Ids of the records one process's epochs stream yields from ``epoch`` on."""
    records = jft.open_split(cfg.train, process_index, process_count)
    ds = records.epochs(seed, epoch, 0).take(count or records.num_examples)
    return [int(tf_example_id(r)) for r in ds.as_numpy_iterator()], records.num_examples


def tf_example_id(serialized: bytes) -> bytes:
    from vit_jax.data._tf import tf

    example = tf.train.Example.FromString(serialized)
    return example.features.feature["image/id"].bytes_list.value[0]


def batches_from(cfg, step, count, process_index=0, process_count=1):
    it = data.train_batches(
        cfg,
        global_batch_size=8 * process_count,
        seed=3,
        start_step=step,
        process_index=process_index,
        process_count=process_count,
    )
    return [next(it) for _ in range(count)]


def test_resume_is_bit_identical_deep_and_across_epochs(synthetic):
    cfg = synthetic_config(synthetic)
    # 480 records: an epoch is 60 batches of 8; run three epochs uninterrupted.
    full = batches_from(cfg, 0, 150)
    for step in (37, 58, 60, 71, 133):  # Deep, at and across epoch boundaries.
        for got, want in zip(batches_from(cfg, step, 3), full[step : step + 3], strict=True):
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["labels"], want["labels"])
    flat = lambda bs: np.concatenate([b["image"] for b in bs])  # noqa: E731
    assert not np.array_equal(flat(full[:60]), flat(full[60:120]))  # Epochs differ.


@pytest.fixture
def count_reads(monkeypatch):
    """``with count_reads() as counter:`` counts the records that the shard readers of the
    datasets built in the block hand out, those read only to be skipped included."""

    @contextlib.contextmanager
    def counting():
        counter = tf.Variable(0, dtype=tf.int64, trainable=False)
        read = jft._records

        def counted(files):
            def count(record):
                with tf.control_dependencies([counter.assign_add(1)]):
                    return tf.identity(record)

            return read(files).map(count)

        with monkeypatch.context() as patch:
            patch.setattr(jft, "_records", counted)
            yield counter

    return counting


def test_resume_reads_at_most_one_round(synthetic, count_reads):
    cfg = synthetic_config(synthetic)
    # Two processes own 12 files (240 records) each; a round is 4 files (80 records).
    round_records = jft.CYCLE_LENGTH * SHARD
    reads = {}
    for step in (0, 3, 27, 29, 60 * 7 + 28):  # Start, early, deep (224 of 240), epoch 14.
        with count_reads() as counter:
            batches_from(cfg, step, 1, process_index=1, process_count=2)
            reads[step] = int(counter.numpy())
    # Slack of a few windows (16 records) for what the prefetching reads ahead meanwhile.
    assert all(0 < n <= round_records + 3 * 16 for n in reads.values()), reads
    # The old way (fixed file order, shuffle buffer, skip by reading) reads up to the position.
    with count_reads() as counter:
        legacy = jft.open_split(cfg.train, 1, 2, epoch_order=False)
        data.train_dataset(
            cfg,
            global_batch_size=16,
            seed=3,
            start_step=27,
            process_index=1,
            process_count=2,
            records=legacy,
        ).take(1).get_single_element()
        assert int(counter.numpy()) >= 27 * 8


def test_resume_with_cycle_length_one_reads_at_most_one_shard(synthetic, count_reads):
    cfg = synthetic_config(synthetic, cycle_length=1)
    for step in (3, 29, 60 * 7 + 28):
        with count_reads() as counter:
            batches_from(cfg, step, 1, process_index=1, process_count=2)
            assert 0 < int(counter.numpy()) <= SHARD + 3 * 16


def test_epochs_visit_files_in_new_orders(synthetic):
    cfg = synthetic_config(synthetic)
    first, n = record_ids(cfg, 0, 1, epoch=0)
    second, _ = record_ids(cfg, 0, 1, epoch=1)
    assert sorted(first) == sorted(second) == list(range(n))  # Each record once per epoch.

    def file_visits(ids):  # Files in the order of their first record.
        return list(dict.fromkeys(i // SHARD for i in ids))

    assert file_visits(first) != file_visits(second)
    # Records interleave across several files: the first 16 come from more than one file.
    assert len({i // SHARD for i in first[:16]}) > 1


@pytest.mark.parametrize("count", [2, 5])
def test_processes_read_disjoint_files(synthetic, count):
    seen = []
    for i in range(count):
        ids, n = record_ids(synthetic_config(synthetic), i, count)
        assert len(ids) == n == len(set(ids))
        files = {r // SHARD for r in ids}
        assert files == set(range(i, 24, count))  # Whole files, process i owns i, i + P, ...
        seen.extend(ids)
    assert sorted(seen) == list(range(24 * SHARD))


def test_shuffle_window_fits_the_byte_budget(synthetic, monkeypatch):
    cfg = synthetic_config(synthetic, window=1000)
    meta = jft.load_metadata(synthetic, "train")
    per_record = sum(s["num_bytes"] for s in meta["shards"]) / meta["num_examples"]
    assert jft.shuffle_window(cfg.train, synthetic, meta) == 1000
    monkeypatch.setattr(jft, "SHUFFLE_BYTES", int(per_record * 50))
    assert jft.shuffle_window(cfg.train, synthetic, meta) in (49, 50)


# Shards in a bucket: metadata, listing and sizes go through vit_jax.storage. The records are
# read by tf.data (TensorFlow's own GCS client), which cannot reach the test server.


def upload_tree(local, url):
    """Copies every file under a local folder to the same relative names under ``url``."""
    for folder_path, _, names in os.walk(local):
        for name in names:
            path = os.path.join(folder_path, name)
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(url, os.path.relpath(path, local)), f.read())


def test_writer_to_a_bucket_matches_local(csv_shards, tmp_path, storage_server, bucket):
    out, meta = csv_shards
    url = f"gs://{bucket}/shards"
    examples = write_shards.read_csv(str(tmp_path / "labels.csv"))
    assert write_shards.write_shards(examples, url, num_shards=4, num_classes=7) == meta
    names = sorted(os.listdir(out))
    assert storage_server.objects(bucket) == [f"shards/{n}" for n in names]
    for name in names:  # The same bytes as written locally.
        with open(os.path.join(out, name), "rb") as f:
            assert storage.read_bytes(f"{url}/{name}") == f.read(), name


def test_cli_reads_a_folder_in_a_bucket_and_writes_to_one(tmp_path, storage_server, bucket):
    write_folder(str(tmp_path / "src"), {"x": {"a": 3, "b": 2}})
    upload_tree(str(tmp_path / "src/x"), f"gs://{bucket}/src")
    url = f"gs://{bucket}/out"
    args = ["--input", f"gs://{bucket}/src", "--output", url, "--num_shards", "2"]
    assert cli.run("write_shards", [*args, "--split", "val"]) == 0
    assert [n for n in storage_server.objects(bucket) if n.startswith("out/")] == [
        "out/val-00000-of-00002.tfrecord",
        "out/val-00001-of-00002.tfrecord",
        "out/val.json",
    ]
    jft.load_metadata.cache_clear()
    meta = jft.load_metadata(url, "val")
    assert meta["class_names"] == ["a", "b"] and meta["num_examples"] == 5
    # The records came from the bucket's images: one shard downloaded and parsed here.
    local = str(tmp_path / "shard.tfrecord")
    with open(local, "wb") as f:
        f.write(storage.read_bytes(f"{url}/val-00000-of-00002.tfrecord"))
    records = list(tf.data.TFRecordDataset(local).map(jft.parse_record).as_numpy_iterator())
    assert len(records) == meta["shards"][0]["num_examples"] == 3
    pngs = {storage.read_bytes(p) for p in storage.walk_files(f"gs://{bucket}/src")}
    assert all(r["image"] in pngs for r in records)


def test_split_in_a_bucket_is_opened_from_its_metadata(csv_shards, bucket):
    out, _ = csv_shards
    url = f"gs://{bucket}/jft"
    upload_tree(out, url)
    jft.load_metadata.cache_clear()
    cfg = jft_config(url)
    assert data.num_classes(cfg) == 7 and data.num_examples(cfg) == 10
    records = jft.open_split(cfg.train, 1, 2)  # Listing, sizes, epochs; no record is read.
    assert records.num_examples == 5 and records.max_examples == 5
    assert records.epochs is not None
    cfg.train.split = "train[2:7]"
    assert data.num_examples(cfg) == 5
    with pytest.raises(data.DataError, match=r"splits found: \['train'\]"):
        jft.load_metadata(url, "validation")


def test_missing_shard_and_sizes_in_a_bucket(csv_shards, bucket, storage_server):
    out, meta = csv_shards
    url = f"gs://{bucket}/jft"
    for shard in meta["shards"]:
        del shard["num_bytes"]  # Shard sizes then come from the bucket's listing.
    storage.write_text(f"{url}/train.json", json.dumps(meta))
    for shard in meta["shards"][1:]:
        with open(os.path.join(out, shard["file"]), "rb") as f:
            storage.write_bytes(f"{url}/{shard['file']}", f.read())
    jft.load_metadata.cache_clear()
    cfg = jft_config(url)
    with pytest.raises(data.DataError, match="missing.*train-00000-of-00004"):
        jft.open_split(cfg.train, 0, 1)
    with open(os.path.join(out, meta["shards"][0]["file"]), "rb") as f:
        storage.write_bytes(f"{url}/{meta['shards'][0]['file']}", f.read())
    total = sum(os.path.getsize(os.path.join(out, s["file"])) for s in meta["shards"])
    assert jft._record_bytes(url, meta) == total / 10
    assert jft.open_split(cfg.train, 0, 1).num_examples == 10


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"split": "train"}'])
def test_invalid_metadata_is_explained(tmp_path, content):
    jft.load_metadata.cache_clear()
    (tmp_path / "train.json").write_text(content)
    with pytest.raises(data.DataError, match="not valid JFT-like metadata.*write_shards"):
        data.num_classes(jft_config(str(tmp_path)))
