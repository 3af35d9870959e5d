"""Label and key ops: one-hot/multi-hot targets, key selection, VTAB label derivations."""

from __future__ import annotations

from collections.abc import Sequence

from vit_jax.data._tf import tf
from vit_jax.data.registry import Features, OpFn, register


def _checked(labels: tf.Tensor, num_classes: int, key: str) -> tf.Tensor:
    """Fails the pipeline with a clear message if a label is outside [0, num_classes)."""
    labels = tf.cast(labels, tf.int64)
    ok = tf.reduce_all((labels >= 0) & (labels < num_classes))
    msg = (
        f"label out of range in feature '{key}': every label must be in [0, {num_classes}); "
        f"fix num_classes in the data config or the dataset's labels. Offending labels:"
    )
    check = tf.debugging.Assert(ok, [msg, labels], summarize=16)
    with tf.control_dependencies([check]):
        return tf.identity(labels)


@register("onehot")
def onehot(
    num_classes: int,
    multi: bool = False,
    smoothing: float = 0.0,
    key: str = "label",
    key_result: str = "labels",
) -> OpFn:
    """One-hot (or, with ``multi=True``, multi-hot over a label list) float32 targets.

    ``smoothing`` mixes in the uniform distribution: t * (1 - s) + s / num_classes.
    """
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")

    def fn(data: Features) -> Features:
        if key not in data:
            raise KeyError(f"onehot: feature '{key}' not found; have {sorted(data)}")
        labels = _checked(data[key], num_classes, key)
        if multi:
            hot = tf.reduce_sum(tf.one_hot(tf.reshape(labels, [-1]), num_classes), axis=0)
            hot = tf.minimum(hot, 1.0)
            hot = tf.ensure_shape(hot, [num_classes])
        else:
            hot = tf.one_hot(labels, num_classes)
        if smoothing:
            hot = hot * (1.0 - smoothing) + smoothing / num_classes
        data[key_result] = hot
        return data

    return fn


@register("keep")
def keep(*keys: str) -> OpFn:
    """Keeps only the named features."""

    def fn(data: Features) -> Features:
        missing = [k for k in keys if k not in data]
        if missing:
            raise KeyError(f"keep: features {missing} not found; have {sorted(data)}")
        return {k: data[k] for k in keys}

    return fn


@register("drop")
def drop(*keys: str) -> OpFn:
    """Removes the named features (missing ones are ignored)."""

    def fn(data: Features) -> Features:
        return {k: v for k, v in data.items() if k not in keys}

    return fn


@register("copy")
def copy(src: str, dst: str) -> OpFn:
    """Copies feature ``src`` to ``dst`` (e.g. a TFDS attribute used as the label)."""

    def fn(data: Features) -> Features:
        data[dst] = data[src]
        return data

    return fn


@register("bin_label")
def bin_label(key: str, factor: float, key_result: str = "label") -> OpFn:
    """Groups integer values into bins: floor(value / factor) (VTAB dSprites tasks)."""
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor!r}")

    def fn(data: Features) -> Features:
        value = tf.cast(data[key], tf.float32)
        data[key_result] = tf.cast(tf.math.floordiv(value, float(factor)), tf.int64)
        return data

    return fn


def _bucket(value: tf.Tensor, thresholds: Sequence[float]) -> tf.Tensor:
    """Index of the last threshold strictly below ``value``."""
    below = tf.cast(tf.constant(thresholds, tf.float32) < value, tf.int64)
    return tf.reduce_sum(below) - 1


@register("clevr_count_label")
def clevr_count_label() -> OpFn:
    """VTAB clevr/count_all: number of objects minus 3 (8 classes)."""

    def fn(data: Features) -> Features:
        data["label"] = tf.cast(tf.size(data["objects"]["size"]) - 3, tf.int64)
        return data

    return fn


@register("clevr_distance_label")
def clevr_distance_label() -> OpFn:
    """VTAB clevr/closest_object_distance: depth of the closest object in 6 bins."""

    def fn(data: Features) -> Features:
        depth = tf.reduce_min(tf.cast(data["objects"]["pixel_coords"][:, 2], tf.float32))
        data["label"] = _bucket(depth, [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])
        return data

    return fn


@register("kitti_distance_label")
def kitti_distance_label() -> OpFn:
    """VTAB kitti/closest_vehicle_distance: 3 distance bins plus 'no vehicle' (4 classes)."""

    def fn(data: Features) -> Features:
        objects = data["objects"]
        z = tf.cast(objects["location"][:, 2], tf.float32)
        vehicle = objects["type"] < 3  # Car, Van, Truck.
        z = tf.concat([tf.boolean_mask(z, vehicle), [1000.0]], axis=0)
        data["label"] = _bucket(tf.reduce_min(z), [-100.0, 8.0, 20.0, 999.0])
        return data

    return fn
