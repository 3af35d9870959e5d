"""Checkpoints: orbax training checkpoints (`Checkpointer`) and public-layout `.npz` weights."""

from vit_jax.checkpoint.manager import Checkpointer, DamagedCheckpointError, abstract_like
from vit_jax.checkpoint.npz import (
    CheckpointError,
    CheckpointMismatchError,
    LoadReport,
    load_npz,
    npz_arrays,
    read_npz,
    save_npz,
)
from vit_jax.checkpoint.posemb import resize_posemb

__all__ = [
    "Checkpointer",
    "DamagedCheckpointError",
    "abstract_like",
    "CheckpointError",
    "CheckpointMismatchError",
    "LoadReport",
    "load_npz",
    "npz_arrays",
    "read_npz",
    "resize_posemb",
    "save_npz",
]
