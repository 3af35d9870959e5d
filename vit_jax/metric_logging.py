"""Metrics out: TensorBoard events, a JSON-lines file, and readable progress lines.

Only process 0 writes files, through `vit_jax.storage` (a disk or a bucket); every process
may print. A resumed run keeps the rows of `metrics.jsonl` up to its checkpoint's step and
drops the later ones, which it is about to replay: each step is logged once. Progress lines
carry steps/s, images/s, the ETA and an MFU estimate from the compiled step's FLOP count.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from vit_jax import storage
from vit_jax.tensorboard_events import EventWriter

log = logging.getLogger("vit_jax")

# Dense peak FLOP/s per device for MFU estimates (bf16 for accelerators, measured f32 for CPU).
PEAK_FLOPS = {
    "TPU v2": 45e12,
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "cpu": 355e9,  # the f32 matrix-product peak measured on the 2-core reference machine
}


def peak_flops(device: jax.Device, override: float | None = None) -> float | None:
    """Best-known peak FLOP/s of one device, or the configured override."""
    if override:
        return override
    kind = getattr(device, "device_kind", "") or device.platform
    for name, flops in PEAK_FLOPS.items():
        if kind.lower().startswith(name.lower()):
            return flops
    return PEAK_FLOPS.get(device.platform)


class MetricLogger:
    """Writes scalars to TensorBoard and `metrics.jsonl`, and prints progress lines.

    `start_step` is the step the run resumes from: rows logged after it by an earlier,
    interrupted session are dropped. (A finished run is not logged again: `loop.run` returns
    its evaluation from `metrics.jsonl` before a logger is made.)
    """

    def __init__(self, workdir: str, *, is_main: bool, start_step: int = 0):
        self.is_main = is_main
        self.workdir = workdir
        self.jsonl_path = storage.join(workdir, "metrics.jsonl")
        self.events = None
        self._jsonl = None
        if is_main:
            self.events = EventWriter(storage.join(workdir, "tensorboard"), start_step=start_step)
            kept = rows_up_to(self.jsonl_path, start_step)
            self._jsonl = storage.AppendFile(self.jsonl_path, initial=kept.encode())

    def record_config(self, config) -> None:
        """Hyper-parameters to TensorBoard and the whole config to `config.json`."""
        if self.events is None:
            return
        flat = _flatten(config.to_dict())
        self.events.hparams(
            {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}
        )
        storage.write_text(
            storage.join(self.workdir, "config.json"), config.to_json_best_effort(indent=2)
        )

    def scalars(self, step: int, values: Mapping[str, Any], *, prefix: str = "") -> None:
        floats = {prefix + k: float(np.asarray(v)) for k, v in values.items()}
        if self.events is not None:
            self.events.scalars(step, floats)
        if self._jsonl is not None:
            record = {"step": step, **{k: _json_float(v) for k, v in floats.items()}}
            self._jsonl.write((json.dumps(record) + "\n").encode())

    def flush(self) -> None:
        """Everything logged so far on disk or in the bucket (called at each checkpoint)."""
        for file in (self.events, self._jsonl):
            if file is not None:
                file.flush()

    def close(self) -> None:
        for file in (self.events, self._jsonl):
            if file is not None:
                file.close()


def rows_up_to(path: str, step: int) -> str:
    """The complete rows of a `metrics.jsonl` whose step is at most `step` (a row cut short
    by a killed process is dropped too)."""
    if not storage.exists(path):
        return ""
    kept = []
    for line in storage.read_text(path).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    return "".join(kept)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


class Progress:
    """Throughput, ETA and MFU between two log points."""

    def __init__(
        self,
        *,
        total_steps: int,
        start_step: int,
        batch_size: int,
        flops_per_step: float | None,
        peak_flops_total: float | None,
    ):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.flops_per_step = flops_per_step
        self.peak = peak_flops_total
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._input_wait = 0.0

    def next_batch(self, batches: Iterator[Any], previous: Any = None) -> Any:
        """`next(batches)`, counting the wait as input wait when the device is idle.

        `previous` is the last step's output: while it is not ready the device is still
        computing and the host's wait overlaps that work. A wait is counted whole when the
        device is idle at its end, so the reported share is an upper bound.
        """
        start = time.perf_counter()
        batch = next(batches)
        leaves = jax.tree.leaves(previous)
        if not leaves or all(leaf.is_ready() for leaf in leaves if hasattr(leaf, "is_ready")):
            self._input_wait += time.perf_counter() - start
        return batch

    def update(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        steps_per_sec = (step - self._last_step) / elapsed
        self._last_step, self._last_time = step, now
        stats = {
            "steps_per_sec": steps_per_sec,
            "images_per_sec": steps_per_sec * self.batch_size,
            "eta_seconds": (self.total_steps - step) / max(steps_per_sec, 1e-9),
            # The share of wall time the device sat idle waiting for the next batch.
            "input_wait_share": min(self._input_wait / elapsed, 1.0),
        }
        self._input_wait = 0.0
        if self.flops_per_step and self.peak:
            stats["mfu"] = steps_per_sec * self.flops_per_step / self.peak
        return stats


def format_line(step: int, total: int, values: Mapping[str, float]) -> str:
    """A readable one-line summary, e.g. `step 500/1500 | loss 0.412 | 210 img/s | eta 1m20s`."""
    parts = [f"step {step}/{total}"]
    for key, value in values.items():
        if key == "eta_seconds":
            minutes, seconds = divmod(int(value), 60)
            parts.append(f"eta {minutes}m{seconds:02d}s")
        elif key == "images_per_sec":
            parts.append(f"{value:.0f} img/s")
        elif key == "mfu":
            parts.append(f"mfu {100 * value:.1f}%")
        else:
            parts.append(f"{key} {value:.4g}")
    return " | ".join(parts)
