"""Writes a small folder dataset of natural 500x375 JPEG photos for benchmarks and tests.

The photos are crops and rescales of scikit-learn's bundled sample images (a temple in China
and a flower), so decoding costs what real photos cost, unlike noise or flat colours.
"""

import io
import os

import numpy as np


def write_photo_folder(
    root: str,
    num_images: int = 256,
    num_classes: int = 4,
    split: str = "train",
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
    seed: int = 0,
) -> list[str]:
    """Writes ``root/<split>/class_<k>/photo_<i>.jpg``; returns the paths."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sources = [Image.fromarray(img) for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        src = sources[i % len(sources)]
        scale = rng.uniform(0.45, 1.0)
        w, h = int(src.width * scale), int(src.height * scale)
        w, h = min(w, src.width), min(h, int(w * size[1] / size[0]), src.height)
        left = int(rng.integers(0, src.width - w + 1))
        top = int(rng.integers(0, src.height - h + 1))
        photo = src.crop((left, top, left + w, top + h)).resize(size, Image.BILINEAR)
        if rng.random() < 0.5:
            photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
        folder = os.path.join(root, split, f"class_{i % num_classes}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"photo_{i:05d}.jpg")
        buf = io.BytesIO()
        photo.save(buf, "JPEG", quality=quality)
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        paths.append(path)
    return paths
