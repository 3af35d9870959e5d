"""Evaluators run during training: classification on every eval set, and few-shot linear probes.

Classification sums counts over padded, masked batches, so every example counts exactly
once. The few-shot evaluator fits closed-form ridge regressions on frozen pre-logit features.

Few-shot with several processes: each process reads its own part of a split, so features,
labels and masks are assembled into global arrays on the mesh (rows line up by
construction) and replicated, and every process gets every real example of all processes.
The gathered examples are then put in a canonical order (by a hash of the preprocessed image,
then the label), so the shots drawn, and the accuracies, do not depend on how many
processes read the data or in which order their batches interleave.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from vit_jax import data, eval_counts, fewshot, sharding
from vit_jax.metric_logging import MetricLogger, format_line


def classification(
    eval_step: Callable,
    params: dict,
    data_config: ml_collections.ConfigDict,
    eval_name: str,
    *,
    batch_size: int,
    batch_sharding: jax.sharding.NamedSharding,
) -> dict[str, float]:
    """Loss, top-1 and top-5 (precision@1 for multi-label data) over one eval set."""
    totals = None
    for batch in data.eval_batches(data_config, eval_name, global_batch_size=batch_size):
        counts = eval_step(params, data.to_global_batch(batch, batch_sharding))
        totals = eval_counts.add_counts(totals, jax.device_get(counts))
    if totals is None:
        raise ValueError(f"eval set {eval_name!r} yielded no examples")
    return eval_counts.finalize(totals)


_HASH_WEIGHTS: dict[int, np.ndarray] = {}


def example_keys(images: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each image's bytes, as ``(n, 2)`` uint32 words (JAX keeps 32 bits).

    The same preprocessed image gives the same key on any process, in any batch, which is
    what makes the few-shot sample independent of how the split was read. The hash is a
    linear form modulo 2**64 with fixed odd pseudo-random weights: exact integer arithmetic
    at memory speed.
    """
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    if flat.dtype.itemsize != 4:
        flat = flat.astype(np.float32)
    words = flat.view(np.uint32).astype(np.uint64)
    size = words.shape[1]
    if size not in _HASH_WEIGHTS:
        rng = np.random.default_rng(size)
        _HASH_WEIGHTS[size] = rng.integers(0, 2**63, size, dtype=np.uint64) * 2 + 1
    hashed = words @ _HASH_WEIGHTS[size]
    return np.stack([hashed >> np.uint64(32), hashed & np.uint64(0xFFFFFFFF)], 1).astype(np.uint32)


def _identity(tree):
    return tree


def gathered_examples(
    data_config: ml_collections.ConfigDict,
    eval_name: str,
    *,
    batch_size: int,
    image_sharding: jax.sharding.NamedSharding,
    feature_step: Callable | None = None,
    params: dict | None = None,
    max_examples: int | None = None,
) -> dict[str, np.ndarray]:
    """The real examples of ALL processes, the same arrays on every process.

    Returns ``labels`` (argmax of the one-hot labels), ``keys`` (see `example_keys`) and,
    with a ``feature_step``, ``features``, row for row, in canonical order (by key, then
    label). ``max_examples`` bounds the pass: whole global batches are read until at least
    that many real examples are in, and the first ``max_examples`` in canonical order (a
    pseudo-random subset of what was read) are kept. The stop test uses the global count,
    so all processes stop at the same batch. Sources that deal examples to processes
    round-robin (digits, folders, ImageNet-21k) then read the same examples for any process
    count; TFDS and JFT-like shards give each process a contiguous part, so a bounded pass
    reads another, equally arbitrary, subset (a pass over the whole split reads them all).
    """
    replicate = jax.jit(_identity, out_shardings=sharding.replicated(image_sharding.mesh))
    parts, seen = [], 0
    for batch in data.eval_batches(data_config, eval_name, global_batch_size=batch_size):
        local = {
            "labels": np.argmax(batch["labels"], axis=-1).astype(np.int32),
            "keys": example_keys(batch["image"]),
            "mask": batch["mask"],
        }
        arrays = data.to_global_batch(local, image_sharding)
        if feature_step is not None:
            image = data.to_global_batch({"image": batch["image"]}, image_sharding)["image"]
            arrays["features"] = feature_step(params, image)
        host = jax.device_get(replicate(arrays))
        keep = np.asarray(host.pop("mask")) > 0
        parts.append({k: np.asarray(v)[keep] for k, v in host.items()})
        seen += int(keep.sum())
        if max_examples and seen >= max_examples:
            break
    if not parts:
        raise ValueError(f"eval set {eval_name!r} yielded no examples")
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keys = out["keys"]
    order = np.lexsort((out["labels"], keys[:, 1], keys[:, 0]))[: max_examples or None]
    return {k: v[order] for k, v in out.items()}


def features_and_labels(
    feature_step: Callable,
    params: dict,
    data_config: ml_collections.ConfigDict,
    eval_name: str,
    *,
    batch_size: int,
    image_sharding: jax.sharding.NamedSharding,
    max_examples: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logit features and integer labels of every process's real examples of a set."""
    examples = gathered_examples(
        data_config,
        eval_name,
        batch_size=batch_size,
        image_sharding=image_sharding,
        feature_step=feature_step,
        params=params,
        max_examples=max_examples,
    )
    return examples["features"], examples["labels"]


# Fields of the train split that say where its examples are; the rest (pp, caching,
# shuffling, label masking) is the eval set's, so the pass is deterministic.
_EVAL_FIELDS = ("pp", "cache", "shuffle_buffer", "mask_empty_labels")


def fewshot_config(
    dataset: str, image_size: int, data_dir: str | None = None
) -> ml_collections.ConfigDict:
    """A data config whose `fewshot_train` eval set walks the train split without augmentation.

    ``data_dir`` (the run's `config.data.data_dir`) is where splits without a directory of
    their own are looked up, as for the training data.
    """
    overrides = {"image_size": image_size}
    if data_dir:
        overrides["data_dir"] = data_dir
    config = data.get_data_config(dataset, **overrides)
    first_eval = next(iter(config.evals.values()))
    train = {k: v for k, v in config.train.to_dict().items() if k not in _EVAL_FIELDS}
    with config.unlocked():
        config.evals.fewshot_train = ml_collections.ConfigDict({**first_eval.to_dict(), **train})
        config.evals.fewshot_test = first_eval
    return config


def fewshot_train_labels(
    fewshot_settings: ml_collections.ConfigDict,
    dataset: str,
    *,
    image_size: int,
    batch_size: int,
    image_sharding: jax.sharding.NamedSharding,
    data_dir: str | None = None,
) -> np.ndarray:
    """The labels of the examples a few-shot evaluation of `dataset` draws its shots from."""
    examples = gathered_examples(
        fewshot_config(dataset, image_size, data_dir),
        "fewshot_train",
        batch_size=batch_size,
        image_sharding=image_sharding,
        max_examples=fewshot_settings.max_train_examples,
    )
    return examples["labels"]


def check_fewshot(
    fewshot_settings: ml_collections.ConfigDict,
    *,
    image_size: int,
    batch_size: int,
    image_sharding: jax.sharding.NamedSharding,
    data_dir: str | None = None,
) -> None:
    """Raises `fewshot.NotEnoughShotsError` when a class of a few-shot dataset is short.

    Reads the same bounded pass as the evaluation (labels only), so a run is refused before
    training instead of failing at its first few-shot evaluation.
    """
    for dataset in fewshot_settings.datasets:
        labels = fewshot_train_labels(
            fewshot_settings,
            dataset,
            image_size=image_size,
            batch_size=batch_size,
            image_sharding=image_sharding,
            data_dir=data_dir,
        )
        config = fewshot_config(dataset, image_size, data_dir)
        fewshot.check_shots(
            labels,
            data.num_classes(config),
            tuple(fewshot_settings.shots),
            dataset=dataset,
            split=config.evals.fewshot_train.split,
            max_examples=fewshot_settings.max_train_examples,
        )


def fewshot_accuracies(
    feature_step: Callable,
    params: dict,
    fewshot_settings: ml_collections.ConfigDict,
    *,
    image_size: int,
    batch_size: int,
    image_sharding: jax.sharding.NamedSharding,
    data_dir: str | None = None,
) -> dict[str, float]:
    """`{dataset}_{k}shot` accuracies for every configured dataset and shot count."""
    results = {}
    for dataset in fewshot_settings.datasets:
        config = fewshot_config(dataset, image_size, data_dir)
        common = dict(batch_size=batch_size, image_sharding=image_sharding)
        train_x, train_y = features_and_labels(
            feature_step,
            params,
            config,
            "fewshot_train",
            max_examples=fewshot_settings.max_train_examples,
            **common,
        )
        test_x, test_y = features_and_labels(feature_step, params, config, "fewshot_test", **common)
        accuracies = fewshot.fewshot_accuracy(
            train_x, train_y, test_x, test_y, tuple(fewshot_settings.shots)
        )
        for shots, accuracy in accuracies.items():
            results[f"{dataset.replace('/', '_')}_{shots}shot"] = accuracy
    return results


class Evaluator:
    """Runs the configured evaluations on the current parameters and logs them.

    Construction checks the few-shot datasets (`check_fewshot`), so a run whose shots
    cannot be drawn is refused before its first training step. Every call returns a new
    dict that the evaluator keeps no reference to: callers may merge or mutate it.
    """

    def __init__(self, builder, logger: MetricLogger, *, total_steps: int):
        self.builder = builder
        self.config = builder.config
        self.logger = logger
        self.total_steps = total_steps
        self.sharding = sharding.batch_sharding(builder.mesh)
        self._eval_steps: dict[int | None, Callable] = {}  # by patch size (FlexiViT)
        self._feature_step = None
        if self.config.fewshot.datasets:
            check_fewshot(self.config.fewshot, **self._fewshot_args())

    def _fewshot_args(self) -> dict:
        return dict(
            image_size=self.config.data.image_size,
            batch_size=self.config.eval_batch_size,
            image_sharding=self.sharding,
            data_dir=self.config.data.get("data_dir"),
        )

    def classification(self, step: int, params: dict, suffix: str = "") -> dict[str, float]:
        """Every eval set of `config.data.evals`; returns `{set}{suffix}/{metric}` values (a
        new dict). `suffix` names other parameters of the same model (`_ema`). A FlexiViT
        is evaluated at each of its patch sizes P as `{set}_pP{suffix}/{metric}`
        (`test_p8/top1`, `test_p8_ema/top1`)."""
        results = {}
        for patch_size in self.builder.patch_sizes or (None,):
            if patch_size not in self._eval_steps:
                self._eval_steps[patch_size] = self.builder.make_eval_step(patch_size)
            size = "" if patch_size is None else f"_p{patch_size}"
            for name in self.config.data.evals:
                values = classification(
                    self._eval_steps[patch_size],
                    params,
                    self.config.data,
                    name,
                    batch_size=self.config.eval_batch_size,
                    batch_sharding=self.sharding,
                )
                prefix = f"{name}{size}{suffix}/"
                self.logger.scalars(step, values, prefix=prefix)
                named = {f"{prefix}{k}": v for k, v in values.items()}
                if self.logger.is_main:
                    print(format_line(step, self.total_steps, named), flush=True)
                results.update(named)
        return results

    def fewshot(self, step: int, params: dict, suffix: str = "") -> dict[str, float]:
        """Few-shot accuracies on `config.fewshot.datasets` as `fewshot{suffix}/...` (a new
        dict, empty when none); a FlexiViT's at its own patch size, config.model.patch_size."""
        if not self.config.fewshot.datasets:
            return {}
        self._feature_step = self._feature_step or self.builder.make_feature_step()
        shots = fewshot_accuracies(
            self._feature_step, params, self.config.fewshot, **self._fewshot_args()
        )
        self.logger.scalars(step, shots, prefix=f"fewshot{suffix}/")
        return {f"fewshot{suffix}/{k}": v for k, v in shots.items()}

    def parameter_sets(self, state: dict) -> list[tuple[dict, str]]:
        """(parameters, suffix) to evaluate: the model's own, and its EMA (`_ema`) if kept."""
        sets = [(state["params"], "")]
        if "ema_params" in state:
            sets.append((state["ema_params"], "_ema"))
        return sets
