"""TensorBoard event files written through `vit_jax.storage`, on a disk or in a bucket.

`tf.summary` writes `gs://` through TensorFlow's own GCS client, whose endpoint cannot be
pointed at a test server, so a bucket workdir's TensorBoard logs would go untested. The
format is small: TFRecord framing (length, masked CRC-32C, data, masked CRC-32C) around
serialized `Event` protos; TensorBoard's own protos and record framing build it here.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.record_writer import RecordWriter

from vit_jax import storage


class EventWriter:
    """Scalars and hyper-parameters into a new events file in `logdir` for this session.

    The file opens with a restart marker at `start_step + 1`: TensorBoard drops the events
    an earlier session logged from that step on, so steps replayed after a resume from a
    checkpoint show once.
    """

    def __init__(self, logdir: str, *, start_step: int = 0):
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.v2"
        self.path = storage.join(logdir, name)
        self._file = storage.AppendFile(self.path)
        self._records = RecordWriter(self._file)
        self._write(event_pb2.Event(file_version="brain.Event:2"))
        restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._write(event_pb2.Event(step=start_step + 1, session_log=restart))

    def _write(self, event: event_pb2.Event) -> None:
        event.wall_time = event.wall_time or time.time()
        self._records.write(event.SerializeToString())

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        summary = summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()
            ]
        )
        self._write(event_pb2.Event(step=step, summary=summary))

    def hparams(self, values: Mapping[str, Any]) -> None:
        """Hyper-parameters for TensorBoard's HParams tab (bool, int, float or str values)."""
        self._write(event_pb2.Event(summary=hparams_summary.hparams_pb(dict(values))))

    def flush(self, *, force: bool = True) -> None:
        self._file.flush(force=force)

    def close(self) -> None:
        self._file.close()
