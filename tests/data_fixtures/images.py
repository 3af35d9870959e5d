"""Writes tiny image files, folder datasets and fake ImageNet-21k tars into temp dirs."""

import io
import os
import tarfile

import numpy as np
from PIL import Image


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    """Encodes a uint8 HxWxC (or HxW) array; ``mode`` converts first (e.g. 'CMYK', 'LA')."""
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def pattern(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth RGB pattern (compresses well, decodes to something non-constant)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.1, 0.5, 3)
    img = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * (x + y))], -1)
    return ((img + 1) * 127.5).astype(np.uint8)


def write_folder(
    root: str, layout: dict[str, dict[str, int]], size: tuple[int, int] = (12, 10), fmt: str = "PNG"
) -> dict[str, list[str]]:
    """Writes ``root/<split>/<class>/img_<i>.<ext>``; returns the paths per split."""
    ext = "png" if fmt == "PNG" else "jpg"
    out: dict[str, list[str]] = {}
    seed = 0
    for split, classes in layout.items():
        for cls, count in classes.items():
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                path = os.path.join(folder, f"img_{i}.{ext}")
                with open(path, "wb") as f:
                    f.write(encode(pattern(size[0], size[1], seed), fmt))
                seed += 1
                out.setdefault(split, []).append(path)
    return out


def write_i21k_tars(root: str, counts: dict[str, int], size: tuple[int, int] = (9, 11)) -> None:
    """Fake per-class tars ``root/<wnid>.tar`` of JPEGs; pixel (0,0) red encodes nothing."""
    os.makedirs(root, exist_ok=True)
    seed = 0
    for wnid, count in counts.items():
        with tarfile.open(os.path.join(root, f"{wnid}.tar"), "w") as tar:
            for i in range(count):
                data = encode(pattern(size[0], size[1], seed), "JPEG")
                seed += 1
                info = tarfile.TarInfo(f"{wnid}_{i}.JPEG")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
