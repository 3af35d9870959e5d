"""Event files written by vit_jax.tensorboard_events are read back by TensorBoard's own
reader (not by our code): scalars, hyper-parameters, and a resumed session's restart."""

import pytest
from tensorboard.backend.event_processing import event_accumulator

from vit_jax.tensorboard_events import EventWriter


def read(logdir: str) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(logdir, purge_orphaned_data=True)
    accumulator.Reload()
    return accumulator


def test_tensorboard_reads_the_scalars_and_hparams(tmp_path):
    writer = EventWriter(str(tmp_path))
    writer.hparams({"model.width": 96, "optim.name": "adamw", "seed": 0})
    for step in (1, 2, 3):
        writer.scalars(step, {"train/loss": 1.0 / step, "train/learning_rate": 0.1 * step})
    writer.close()
    accumulator = read(str(tmp_path))
    assert sorted(accumulator.Tags()["scalars"]) == ["train/learning_rate", "train/loss"]
    loss = accumulator.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1.0 / 3])
    assert "_hparams_/session_start_info" in accumulator.Tags()["tensors"]


def test_a_resumed_session_replaces_the_steps_it_replays(tmp_path):
    """Session 1 logged steps 1-5 but its last checkpoint was step 3; session 2 resumes
    there and logs 4-6: TensorBoard shows each step once, with session 2's values."""
    first = EventWriter(str(tmp_path), start_step=0)
    for step in range(1, 6):
        first.scalars(step, {"train/loss": 10.0 + step})
    first.close()
    second = EventWriter(str(tmp_path), start_step=3)
    for step in range(4, 7):
        second.scalars(step, {"train/loss": 20.0 + step})
    second.close()
    loss = read(str(tmp_path)).Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in loss] == [11.0, 12.0, 13.0, 24.0, 25.0, 26.0]
