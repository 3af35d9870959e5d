"""vit_jax.fewshot on scikit-learn digits and against numpy.linalg.lstsq; the few-shot evaluator's
gathering, canonical order, refusal of short classes, data_dir and result dicts."""

import os

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.helpers import tiny_config, tiny_flags, with_changes
from vit_jax import cli, data, evaluate, fewshot, sharding
from vit_jax.errors import UserError


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm].astype(np.float32), y[perm]
    return x[:1000], y[:1000], x[1000:], y[1000:]


def test_digits_fewshot_accuracy(digits):
    acc = fewshot.fewshot_accuracy(*digits, shots=(1, 5, 10, 25))
    assert set(acc) == {1, 5, 10, 25}
    assert acc[10] > 0.7  # chance is 0.1
    assert acc[1] > 0.3
    assert acc[1] < acc[5] < acc[10]
    # Deterministic given the seed; another seed draws other shots.
    assert fewshot.fewshot_accuracy(*digits, shots=(1,)) == {1: acc[1]}
    assert fewshot.fewshot_accuracy(*digits, shots=(1,), seed=1)[1] != acc[1]


@pytest.mark.parametrize("n,d", [(12, 30), (40, 7)])  # dual (n < d) and primal (n >= d)
def test_ridge_matches_lstsq_on_augmented_system(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)) * 3 + 1
    y = 2.0 * np.eye(4)[rng.integers(0, 4, n)] - 1.0
    lam = 2.5
    w, b = fewshot.fit_ridge(x, y, lam)
    # [X 1; sqrt(lam) I 0] [w; b] = [Y; 0] : ridge with an unregularized bias.
    a = np.block([[x, np.ones((n, 1))], [np.sqrt(lam) * np.eye(d), np.zeros((d, 1))]])
    rhs = np.vstack([y, np.zeros((d, 4))])
    sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
    np.testing.assert_allclose(w, sol[:d], atol=1e-4)
    np.testing.assert_allclose(b, sol[d], atol=1e-4)


def test_sample_shots_nested_and_balanced():
    labels = np.repeat(np.arange(3), 10)
    one, five = fewshot.sample_shots(labels, 1), fewshot.sample_shots(labels, 5)
    assert np.bincount(labels[five]).tolist() == [5, 5, 5]
    assert set(one) <= set(five)
    with pytest.raises(ValueError, match="only 10"):
        fewshot.sample_shots(labels, 11)


# --- the evaluator: gathering, order, refusal, data_dir, results ------------------------


def test_check_shots_names_the_dataset_the_class_and_its_count():
    labels = np.array([0] * 6 + [1] * 2 + [2] * 5 + [3] * 3)  # class 4 never read
    fewshot.check_shots(labels, 4, (1, 2), dataset="d")  # enough of each of 0..3
    with pytest.raises(fewshot.NotEnoughShotsError) as raised:
        fewshot.check_shots(labels, 5, (1, 5), dataset="vtab/dtd", max_examples=16)
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and "\n" not in message
    assert message.startswith("few-shot dataset 'vtab/dtd': class 4 (and 2 other classes) has 0 ")
    assert "the 16 examples read from split 'train' (config.fewshot.max_train_examples=16)" in (
        message
    )
    assert "fewer than the 5 shots asked; raise config.fewshot.max_train_examples" in message
    # The whole split was read: more examples cannot help, only fewer shots.
    with pytest.raises(fewshot.NotEnoughShotsError, match="class 1 has 2 example") as whole:
        fewshot.check_shots(labels, 4, (3,), dataset="d", max_examples=100)
    assert "split 'train' (16 examples)" in str(whole.value)
    assert "max_train_examples" not in str(whole.value)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})


def image_features(mesh):
    """A stand-in feature step: the flattened image, replicated like the real one."""
    return jax.jit(
        lambda params, images: images.reshape(len(images), -1),
        out_shardings=sharding.replicated(mesh),
    )


def batch_sharding(mesh):
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))


def test_gathered_examples_are_aligned_and_in_an_order_that_ignores_arrival(mesh, monkeypatch):
    config = evaluate.fewshot_config("digits", 8)
    common = dict(
        batch_size=64,
        image_sharding=batch_sharding(mesh),
        feature_step=image_features(mesh),
        params={},
        max_examples=300,
    )
    first = evaluate.gathered_examples(config, "fewshot_train", **common)
    assert len(first["labels"]) == 300 and first["features"].shape == (300, 8 * 8 * 3)
    # Each row's features are its own image: the key of the features is the row's key.
    images = first["features"].reshape(-1, 8, 8, 3)
    np.testing.assert_array_equal(evaluate.example_keys(images), first["keys"])
    assert np.bincount(first["labels"], minlength=10).min() >= 10  # a mix of every class

    # Other processes' rows arrive in another order: within every batch, rows are shuffled.
    original = evaluate.data.eval_batches
    rng = np.random.default_rng(0)

    def shuffled(*args, **kwargs):
        for batch in original(*args, **kwargs):
            perm = rng.permutation(len(batch["mask"]))
            yield {k: v[perm] for k, v in batch.items()}

    monkeypatch.setattr(evaluate.data, "eval_batches", shuffled)
    again = evaluate.gathered_examples(config, "fewshot_train", **common)
    for key in ("labels", "keys", "features"):
        np.testing.assert_array_equal(again[key], first[key])


@pytest.fixture(scope="module")
def tiny_tfds_root(tmp_path_factory):
    from data_fixtures import tiny_tfds

    root = str(tmp_path_factory.mktemp("tfds"))
    return tiny_tfds.build(root), root


class FakeTrainer:
    """What the Evaluator uses of a StepBuilder, with images as features."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh

    def make_feature_step(self):
        return image_features(self.mesh)


class Logged:
    def __init__(self):
        self.rows = []

    def scalars(self, step, values, *, prefix=""):
        self.rows.append((step, {prefix + k: v for k, v in values.items()}))


def test_fewshot_datasets_are_read_from_config_data_data_dir(tiny_tfds_root, mesh):
    name, root = tiny_tfds_root  # 3 classes of 7, 7 and 6 train examples; 7 test examples
    assert evaluate.fewshot_config(f"tfds:{name}", 8, root).data_dir == root
    config = tiny_config(
        "eval_batch_size=16",
        f"fewshot.datasets=tfds:{name}",
        "fewshot.shots=1,5",
        f"data.data_dir={root}",
    )
    logged = Logged()
    evaluator = evaluate.Evaluator(FakeTrainer(config, mesh), logged, total_steps=1)
    first = evaluator.fewshot(1, {})
    assert set(first) == {f"fewshot/tfds:{name}_1shot", f"fewshot/tfds:{name}_5shot"}
    assert logged.rows == [(1, first)]
    # A fresh dict each call: merging into the returned one changes nothing later on.
    first["test/top1"] = 0.5
    second = evaluator.fewshot(2, {})
    assert second is not first and "test/top1" not in second
    assert logged.rows[1] == (2, second)

    # Without the data_dir the dataset is looked up in the default directory: not there.
    with pytest.raises(data.DataError, match=name):
        evaluate.Evaluator(
            FakeTrainer(tiny_config(f"fewshot.datasets=tfds:{name}"), mesh),
            Logged(),
            total_steps=1,
        )
    # 7 shots: the constructor refuses the run, naming the short class of the whole split.
    with pytest.raises(fewshot.NotEnoughShotsError, match="class 2 has 6 example"):
        evaluate.Evaluator(
            FakeTrainer(with_changes(config, **{"fewshot.shots": (1, 7)}), mesh),
            Logged(),
            total_steps=1,
        )


def test_a_short_class_refuses_the_run_before_training(tmp_path, monkeypatch, capsys, mesh):

    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "run"
    args = [
        f"--workdir={workdir}",
        *tiny_flags(
            **{
                "model.depth": 1,  # cheaper to compile
                "optim.name": "sgd",
                "eval_batch_size": 64,
                "total_steps": 2,
                "schedule.warmup_steps": 1,
                "fewshot.datasets": "digits",
                "fewshot.shots": (1, 5),
                "fewshot.max_train_examples": 20,
            }
        ),
    ]
    assert cli.run("train", args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    labels = evaluate.fewshot_train_labels(
        tiny_config("fewshot.max_train_examples=20").fewshot,
        "digits",
        image_size=8,
        batch_size=64,
        image_sharding=batch_sharding(mesh),
    )
    counts = np.bincount(labels, minlength=10)
    worst = int(np.argmin(counts))
    assert len(labels) == 20 and counts[worst] < 5
    assert len(errors) == 1 and errors[0].startswith(
        f"error: few-shot dataset 'digits': class {worst} "
    ), errors
    assert f"has {counts[worst]} example(s) in the 20 examples read" in errors[0]
    # Refused before the first step: nothing trained, logged or saved.
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
    metrics = workdir / "metrics.jsonl"
    assert not metrics.exists() or "train/loss" not in metrics.read_text()
