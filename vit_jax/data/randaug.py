"""RandAugment (Cubuk et al., 2019) in plain TensorFlow with stateless randomness.

Each of ``num_layers`` layers picks one of the ops below uniformly and applies it at the given
``magnitude`` (0..10, as in the paper); signed ops get a random sign. Geometric ops use
``tf.raw_ops.ImageProjectiveTransformV3`` (core TF, no tensorflow_addons). Works on uint8
RGB images; float inputs in [0, 255] are rounded to uint8 first.
"""

from __future__ import annotations

import math

from vit_jax.data._tf import tf
from vit_jax.data.registry import Features, OpFn, register

_FILL = 128  # Grey for pixels that geometric ops move in from outside the image.


def _blend(a: tf.Tensor, b: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """a + factor * (b - a), on float images, clipped to [0, 255]."""
    return tf.clip_by_value(a + factor * (b - a), 0.0, 255.0)


def _gray(img: tf.Tensor) -> tf.Tensor:
    return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(img))


def _transform(img: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """Applies a projective transform (8 params mapping output->input coords)."""
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=img[None],
        transforms=tf.reshape(tf.cast(matrix, tf.float32), [1, 8]),
        output_shape=tf.shape(img)[:2],
        fill_value=tf.constant(_FILL, tf.float32),
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )
    return out[0]


def _rotate(img, m):
    angle = m * (30.0 * math.pi / 180.0)
    h = tf.cast(tf.shape(img)[0], tf.float32)
    w = tf.cast(tf.shape(img)[1], tf.float32)
    c, s = tf.cos(angle), tf.sin(angle)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # Rotation about the centre: input = R^-1 (output - centre) + centre.
    return _transform(img, [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy, 0.0, 0.0])


def _shear_x(img, m):
    return _transform(img, [1.0, m * 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def _shear_y(img, m):
    return _transform(img, [1.0, 0.0, 0.0, m * 0.3, 1.0, 0.0, 0.0, 0.0])


def _translate_x(img, m):
    dx = m * 0.45 * tf.cast(tf.shape(img)[1], tf.float32)
    return _transform(img, [1.0, 0.0, -dx, 0.0, 1.0, 0.0, 0.0, 0.0])


def _translate_y(img, m):
    dy = m * 0.45 * tf.cast(tf.shape(img)[0], tf.float32)
    return _transform(img, [1.0, 0.0, 0.0, 0.0, 1.0, -dy, 0.0, 0.0])


def _auto_contrast(img, m):
    del m
    lo = tf.reduce_min(img, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(img, axis=[0, 1], keepdims=True)
    scaled = (img - lo) * (255.0 / tf.maximum(hi - lo, 1e-3))
    return tf.where(hi > lo, scaled, img)


def _equalize(img, m):
    del m
    x = tf.cast(img, tf.int32)
    flat = tf.reshape(tf.transpose(x, [2, 0, 1]), [3, -1])  # [C, H*W]
    hist = tf.math.bincount(flat + tf.range(3)[:, None] * 256, minlength=768, maxlength=768)
    hist = tf.reshape(hist, [3, 256])
    # Size of the last non-empty bin per channel.
    last = tf.reduce_max(tf.where(hist > 0, tf.range(256)[None], -1), axis=1)
    last_count = tf.gather(hist, last, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - last_count) // 255
    safe = tf.maximum(step, 1)[:, None]
    lut = tf.clip_by_value((tf.cumsum(hist, axis=1) - hist + safe // 2) // safe, 0, 255)
    mapped = tf.gather(lut, flat, batch_dims=1)
    mapped = tf.where(step[:, None] > 0, mapped, flat)
    out = tf.transpose(tf.reshape(mapped, [3, tf.shape(x)[0], tf.shape(x)[1]]), [1, 2, 0])
    return tf.cast(out, tf.float32)


def _invert(img, m):
    del m
    return 255.0 - img


def _posterize(img, m):
    shift = tf.cast(tf.round(tf.abs(m) * 4.0), tf.int32)  # Keep 8..4 bits.
    x = tf.cast(img, tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.float32)


def _solarize(img, m):
    threshold = 256.0 - tf.abs(m) * 256.0
    return tf.where(img >= threshold, 255.0 - img, img)


def _solarize_add(img, m):
    return tf.where(img < 128.0, tf.minimum(img + tf.abs(m) * 110.0, 255.0), img)


def _color(img, m):
    return _blend(_gray(img), img, 1.0 + 0.9 * m)


def _contrast(img, m):
    mean = tf.reduce_mean(tf.image.rgb_to_grayscale(img))
    return _blend(tf.fill(tf.shape(img), mean), img, 1.0 + 0.9 * m)


def _brightness(img, m):
    return _blend(tf.zeros_like(img), img, 1.0 + 0.9 * m)


def _sharpness(img, m):
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(img[None], kernel, [1, 1, 1, 1], "SAME")[0]
    # Keep the border unchanged, like PIL's ImageFilter.SMOOTH-based sharpness.
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    inner = tf.pad(tf.ones([h - 2, w - 2, 3], tf.bool), [[1, 1], [1, 1], [0, 0]])
    smooth = tf.where(inner, smooth, img)
    return _blend(smooth, img, 1.0 + 0.9 * m)


# (function, signed): signed ops use +/- magnitude at random.
_OPS = (
    (_auto_contrast, False),
    (_equalize, False),
    (_invert, False),
    (_rotate, True),
    (_posterize, False),
    (_solarize, False),
    (_solarize_add, False),
    (_color, True),
    (_contrast, True),
    (_brightness, True),
    (_sharpness, True),
    (_shear_x, True),
    (_shear_y, True),
    (_translate_x, True),
    (_translate_y, True),
)
OP_NAMES = tuple(f.__name__.lstrip("_") for f, _ in _OPS)


def apply_op(img: tf.Tensor, index: int | tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    """Applies op number ``index`` with signed magnitude in [-1, 1] to a float RGB image."""
    branches = [lambda f=f: f(img, magnitude) for f, _ in _OPS]
    out = tf.switch_case(tf.cast(index, tf.int32), branches)
    return tf.ensure_shape(out, img.shape)


@register("randaug", random=True)
def randaug(num_layers: int = 2, magnitude: float = 10, key: str = "image") -> OpFn:
    """RandAugment with ``num_layers`` random ops at ``magnitude`` (0..10); returns uint8."""
    if not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}")
    if not 0 <= magnitude <= 10:
        raise ValueError(f"magnitude must be in [0, 10], got {magnitude!r}")
    level = magnitude / 10.0
    signed = tf.constant([s for _, s in _OPS])

    def fn(data: Features, seed: tf.Tensor) -> Features:
        img = data[key]
        if img.dtype != tf.uint8:
            img = tf.cast(tf.clip_by_value(tf.round(tf.cast(img, tf.float32)), 0, 255), tf.uint8)
        img = tf.cast(img, tf.float32)
        img = tf.ensure_shape(img, [None, None, 3])
        seeds = tf.random.experimental.stateless_split(seed, num=max(num_layers, 1))
        for i in range(num_layers):
            idx = tf.random.stateless_uniform([], seeds[i], 0, len(_OPS), tf.int32)
            flip = tf.random.stateless_uniform([], seeds[i] + 1, 0, 2, tf.int32)
            sign = tf.where(tf.gather(signed, idx) & (flip == 1), -1.0, 1.0)
            img = apply_op(img, idx, sign * level)
        data[key] = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
        return data

    return fn
