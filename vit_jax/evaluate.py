"""Evaluators run during training: classification on every eval set, and few-shot linear probes.

Classification sums counts over padded, masked batches, so every example counts exactly
once. The few-shot evaluator fits closed-form ridge regressions on frozen pre-logit features.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from vit_jax import data, fewshot, metrics
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
        totals = metrics.add_counts(totals, jax.device_get(counts))
    if totals is None:
        raise ValueError(f"eval set {eval_name!r} yielded no examples")
    return metrics.finalize(totals)


def features_and_labels(
    feature_step: Callable,
    params: dict,
    data_config: ml_collections.ConfigDict,
    eval_name: str,
    *,
    batch_size: int,
    image_sharding,
    max_examples: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logit features and integer labels of the real (unpadded) examples of a set."""
    features, labels = [], []
    seen = 0
    for batch in data.eval_batches(data_config, eval_name, global_batch_size=batch_size):
        image = data.to_global_batch({"image": batch["image"]}, image_sharding)
        out = np.asarray(jax.device_get(feature_step(params, image["image"])))
        keep = batch["mask"] > 0
        features.append(out[keep])
        labels.append(np.argmax(batch["labels"][keep], axis=-1))
        seen += int(keep.sum())
        if max_examples and seen >= max_examples:
            break
    return np.concatenate(features), np.concatenate(labels)


def fewshot_config(dataset: str, image_size: int) -> ml_collections.ConfigDict:
    """A data config whose `fewshot_train` eval set walks the train split without augmentation."""
    config = data.get_data_config(dataset, image_size=image_size)
    first_eval = next(iter(config.evals.values()))
    with config.unlocked():
        config.evals.fewshot_train = ml_collections.ConfigDict(
            dict(
                first_eval.to_dict(),
                split=config.train.split,
                name=config.train.name,
                source=config.train.source,
                data_dir=config.train.data_dir,
            )
        )
        config.evals.fewshot_test = first_eval
    return config


def fewshot_accuracies(
    feature_step: Callable,
    params: dict,
    fewshot_settings: ml_collections.ConfigDict,
    *,
    image_size: int,
    batch_size: int,
    image_sharding,
) -> dict[str, float]:
    """`{dataset}_{k}shot` accuracies for every configured dataset and shot count."""
    results = {}
    for dataset in fewshot_settings.datasets:
        config = fewshot_config(dataset, image_size)
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
    """Runs the configured evaluations on the current parameters and logs them."""

    def __init__(self, trainer, logger: MetricLogger, *, total_steps: int):
        self.trainer = trainer
        self.config = trainer.config
        self.logger = logger
        self.total_steps = total_steps
        self.sharding = jax.sharding.NamedSharding(
            trainer.mesh, jax.sharding.PartitionSpec(("data", "fsdp"))
        )
        self._eval_step = None
        self._feature_step = None

    def classification(self, step: int, params: dict) -> dict[str, float]:
        """Every eval set of `config.data.evals`; returns `{set}/{metric}` values."""
        self._eval_step = self._eval_step or self.trainer.make_eval_step()
        results = {}
        for name in self.config.data.evals:
            values = classification(
                self._eval_step,
                params,
                self.config.data,
                name,
                batch_size=self.config.eval_batch_size,
                batch_sharding=self.sharding,
            )
            self.logger.scalars(step, values, prefix=f"{name}/")
            named = {f"{name}/{k}": v for k, v in values.items()}
            if self.logger.is_main:
                print(format_line(step, self.total_steps, named), flush=True)
            results.update(named)
        return results

    def fewshot(self, step: int, params: dict) -> dict[str, float]:
        """Few-shot accuracies on `config.fewshot.datasets` (empty when none)."""
        if not self.config.fewshot.datasets:
            return {}
        self._feature_step = self._feature_step or self.trainer.make_feature_step()
        shots = fewshot_accuracies(
            self._feature_step,
            params,
            self.config.fewshot,
            image_size=self.config.data.image_size,
            batch_size=self.config.eval_batch_size,
            image_sharding=self.sharding,
        )
        self.logger.scalars(step, shots, prefix="fewshot/")
        return {f"fewshot/{k}": v for k, v in shots.items()}
