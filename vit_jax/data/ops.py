"""Image preprocessing ops: decoding, cropping, resizing, flipping and value ranges.

Images are HxWxC tensors with values in [0, 255]; ops that resize return float32 (no rounding
back to uint8, which would cost time and precision), other ops keep the input dtype.
Random ops take a stateless seed (see ``registry.build_pp``).
"""

from __future__ import annotations

from collections.abc import Sequence

from vit_jax.data._tf import tf
from vit_jax.data.registry import Features, OpFn, register

_METHODS = (
    "bilinear",
    "nearest",
    "bicubic",
    "area",
    "lanczos3",
    "lanczos5",
    "gaussian",
    "mitchellcubic",
)


def _size2(size: int | Sequence[int], op: str) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"{op}: size must be a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _check_method(method: str) -> str:
    if method not in _METHODS:
        raise ValueError(f"unknown resize method {method!r}; use one of {_METHODS}")
    return method


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """Makes an already decoded image have ``channels`` channels (gray->RGB, drops alpha)."""
    c = image.shape[-1]
    if c == channels or channels == 0:
        return image
    if channels == 3 and c == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 3 and c == 4:
        return image[..., :3]
    if channels == 3 and c is None:
        image = tf.cond(
            tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image[..., :3]
        )
        return tf.ensure_shape(image, [None, None, 3])
    if channels == 1 and c == 3:
        return tf.cast(tf.round(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))), image.dtype)
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels")


def decode_image(data: tf.Tensor, channels: int = 3) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes to uint8; gray, CMYK and alpha images become RGB."""
    if data.dtype == tf.string:
        image = tf.io.decode_image(data, channels=channels, expand_animations=False)
        return tf.ensure_shape(image, [None, None, channels or None])
    return _to_channels(data, channels)


@register("decode")
def decode(channels: int = 3, key: str = "image") -> OpFn:
    """Decodes encoded image bytes; images that are already decoded get ``channels`` channels."""
    if channels not in (0, 1, 3):
        raise ValueError(f"channels must be 0 (as stored), 1 or 3, got {channels!r}")

    def fn(data: Features) -> Features:
        data[key] = decode_image(data[key], channels)
        return data

    return fn


def _sample_crop(
    shape: tf.Tensor, seed: tf.Tensor, area: tuple[float, float], ratio: tuple[float, float]
) -> tuple[tf.Tensor, tf.Tensor]:
    """Samples an Inception-style crop window: returns (begin [y, x], size [h, w])."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_size=shape,
        bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=area,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin[:2], size[:2]


def _crop_params(area_min: float, area_max: float, ratio_min: float, ratio_max: float):
    if not 0 < area_min <= area_max <= 100:
        raise ValueError(
            f"need 0 < area_min <= area_max <= 100 (percent), got {area_min}, {area_max}"
        )
    if not 0 < ratio_min <= ratio_max:
        raise ValueError(f"need 0 < ratio_min <= ratio_max, got {ratio_min}, {ratio_max}")
    return (area_min / 100, area_max / 100), (float(ratio_min), float(ratio_max))


@register("decode_jpeg_and_inception_crop", random=True)
def decode_jpeg_and_inception_crop(
    size: int | Sequence[int] | None = None,
    area_min: float = 5,
    area_max: float = 100,
    ratio_min: float = 3 / 4,
    ratio_max: float = 4 / 3,
    method: str = "bilinear",
    antialias: bool = False,
    key: str = "image",
) -> OpFn:
    """Inception crop that decodes only the crop window of a JPEG (other formats: full decode).

    ``area_min``/``area_max`` are percentages of the image area; ``size`` resizes the crop.
    """
    area, ratio = _crop_params(area_min, area_max, ratio_min, ratio_max)
    hw = _size2(size, "decode_jpeg_and_inception_crop") if size is not None else None
    method = _check_method(method)

    def jpeg(data: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        begin, crop = _sample_crop(tf.io.extract_jpeg_shape(data), seed, area, ratio)
        window = tf.concat([begin, crop], axis=0)
        return tf.image.decode_and_crop_jpeg(data, window, channels=3)

    def other(data: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        image = decode_image(data, 3)
        begin, crop = _sample_crop(tf.shape(image), seed, area, ratio)
        return tf.slice(image, tf.concat([begin, [0]], 0), tf.concat([crop, [3]], 0))

    def fn(data: Features, seed: tf.Tensor) -> Features:
        raw = data[key]
        if raw.dtype == tf.string:
            image = tf.cond(tf.io.is_jpeg(raw), lambda: jpeg(raw, seed), lambda: other(raw, seed))
            image = tf.ensure_shape(image, [None, None, 3])
        else:
            image = _inception_crop_image(_to_channels(raw, 3), seed, area, ratio)
        if hw is not None:
            image = tf.image.resize(image, hw, method=method, antialias=antialias)
        data[key] = image
        return data

    return fn


def _inception_crop_image(image: tf.Tensor, seed: tf.Tensor, area, ratio) -> tf.Tensor:
    begin, crop = _sample_crop(tf.shape(image), seed, area, ratio)
    channels = tf.shape(image)[-1:]
    out = tf.slice(image, tf.concat([begin, [0]], 0), tf.concat([crop, channels], 0))
    return tf.ensure_shape(out, [None, None, image.shape[-1]])


@register("inception_crop", random=True)
def inception_crop(
    size: int | Sequence[int] | None = None,
    area_min: float = 5,
    area_max: float = 100,
    ratio_min: float = 3 / 4,
    ratio_max: float = 4 / 3,
    method: str = "bilinear",
    antialias: bool = False,
    key: str = "image",
) -> OpFn:
    """Random crop of ``area_min``..``area_max`` percent of the area, resized to ``size``."""
    area, ratio = _crop_params(area_min, area_max, ratio_min, ratio_max)
    hw = _size2(size, "inception_crop") if size is not None else None
    method = _check_method(method)

    def fn(data: Features, seed: tf.Tensor) -> Features:
        image = _inception_crop_image(data[key], seed, area, ratio)
        if hw is not None:
            image = tf.image.resize(image, hw, method=method, antialias=antialias)
        data[key] = image
        return data

    return fn


@register("random_crop", random=True)
def random_crop(
    size: int | Sequence[int], pad: int = 0, pad_mode: str = "constant", key: str = "image"
) -> OpFn:
    """Pads each side by ``pad`` pixels, then crops a random ``size`` window (translation)."""
    h, w = _size2(size, "random_crop")
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    if pad_mode.upper() not in ("CONSTANT", "REFLECT", "SYMMETRIC"):
        raise ValueError(f"pad_mode must be constant, reflect or symmetric, got {pad_mode!r}")

    def fn(data: Features, seed: tf.Tensor) -> Features:
        image = data[key]
        if pad:
            image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode=pad_mode.upper())
        c = tf.shape(image)[-1:]
        data[key] = tf.image.stateless_random_crop(image, tf.concat([[h, w], c], 0), seed)
        if image.shape[-1] is not None:
            data[key] = tf.ensure_shape(data[key], [h, w, image.shape[-1]])
        return data

    return fn


@register("resize")
def resize(
    size: int | Sequence[int], method: str = "bilinear", antialias: bool = False, key: str = "image"
) -> OpFn:
    """Resizes to exactly ``size`` (ignores the aspect ratio); returns float32."""
    hw = _size2(size, "resize")
    method = _check_method(method)

    def fn(data: Features) -> Features:
        image = tf.image.resize(data[key], hw, method=method, antialias=antialias)
        data[key] = tf.cast(image, tf.float32)
        return data

    return fn


@register("resize_small")
def resize_small(
    smaller_size: int, method: str = "bilinear", antialias: bool = True, key: str = "image"
) -> OpFn:
    """Resizes so the smaller side is ``smaller_size``, keeping the aspect ratio."""
    if not isinstance(smaller_size, int) or smaller_size <= 0:
        raise ValueError(f"smaller_size must be a positive int, got {smaller_size!r}")
    method = _check_method(method)

    def fn(data: Features) -> Features:
        image = data[key]
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = smaller_size / tf.reduce_min(shape)
        new = tf.cast(tf.round(shape * scale), tf.int32)
        new = tf.maximum(new, smaller_size)  # Rounding must not undershoot the short side.
        data[key] = tf.cast(
            tf.image.resize(image, new, method=method, antialias=antialias), tf.float32
        )
        return data

    return fn


@register("central_crop")
def central_crop(size: int | Sequence[int], key: str = "image") -> OpFn:
    """Crops the central ``size`` window."""
    h, w = _size2(size, "central_crop")

    def fn(data: Features) -> Features:
        image = data[key]
        shape = tf.shape(image)
        top = (shape[0] - h) // 2
        left = (shape[1] - w) // 2
        image = image[top : top + h, left : left + w]
        data[key] = tf.ensure_shape(image, [h, w, image.shape[-1]])
        return data

    return fn


@register("flip_lr", random=True)
def flip_lr(key: str = "image") -> OpFn:
    """Flips left-right with probability 1/2."""

    def fn(data: Features, seed: tf.Tensor) -> Features:
        data[key] = tf.image.stateless_random_flip_left_right(data[key], seed)
        return data

    return fn


@register("value_range")
def value_range(
    vmin: float = -1,
    vmax: float = 1,
    in_min: float = 0,
    in_max: float = 255,
    clip_values: bool = False,
    key: str = "image",
) -> OpFn:
    """Maps values linearly from [in_min, in_max] to [vmin, vmax] as float32."""
    if in_max == in_min:
        raise ValueError("in_min and in_max must differ")
    scale = (vmax - vmin) / (in_max - in_min)

    def fn(data: Features) -> Features:
        image = tf.cast(data[key], tf.float32) * scale + (vmin - in_min * scale)
        if clip_values:
            image = tf.clip_by_value(image, min(vmin, vmax), max(vmin, vmax))
        data[key] = image
        return data

    return fn


@register("vgg_value_range")
def vgg_value_range(
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    key: str = "image",
) -> OpFn:
    """Standardises [0, 255] RGB with per-channel ImageNet mean and std (given in [0, 1])."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each (std > 0), got {mean}, {std}")
    m = tf.constant([255.0 * v for v in mean])
    s = tf.constant([255.0 * v for v in std])

    def fn(data: Features) -> Features:
        data[key] = (tf.cast(data[key], tf.float32) - m) / s
        return data

    return fn
