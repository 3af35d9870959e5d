"""A tiny TFDS dataset built offline in a temp dir: real split sizes, slicing and even splits."""

import sys

import numpy as np
import tensorflow_datasets as tfds

# TFDS resolves a builder's code path through importlib_resources for classes in packages,
# which is not installed here; a top-level module name takes the plain-file path instead.
sys.modules.setdefault("tiny_tfds", sys.modules[__name__])

NUM_CLASSES = 3
SPLIT_SIZES = {"train": 20, "test": 7}


class TinyImages(tfds.core.GeneratorBasedBuilder):
    """8x8 RGB images whose pixel (0, 0, 0) stores the example id; label = id % 3."""

    __module__ = "tiny_tfds"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {name: self._generate_examples(name, n) for name, n in SPLIT_SIZES.items()}

    def _generate_examples(self, name, n):
        offset = 0 if name == "train" else 100
        for i in range(n):
            image = np.full((8, 8, 3), 7, np.uint8)
            image[0, 0, 0] = offset + i
            yield f"{name}_{i}", {"image": image, "label": i % NUM_CLASSES}


def build(data_dir: str) -> str:
    """Prepares the dataset under ``data_dir``; returns its TFDS name."""
    tfds.disable_progress_bar()
    TinyImages(data_dir=data_dir).download_and_prepare()
    return TinyImages.name
