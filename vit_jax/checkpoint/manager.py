"""Training checkpoints through orbax-checkpoint's `CheckpointManager`.

A checkpoint holds the train state (parameters, optimizer state, step) plus a small JSON
record (data position, config). Orbax writes into a temporary directory and renames it when
complete, so an interrupted save never replaces the last good checkpoint, and only finished
steps are listed. Restoring takes abstract arrays with shardings, which lets a checkpoint
written on one mesh load onto another.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves every `every_steps`, keeps the last `keep` (and every `keep_every`-th) steps."""

    def __init__(
        self,
        directory: str,
        *,
        every_steps: int,
        keep: int = 3,
        keep_every: int | None = None,
        async_save: bool = True,
    ):
        if every_steps <= 0:
            raise ValueError(f"config.checkpoint.every_steps must be positive, got {every_steps}")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            max_to_keep=keep,
            keep_period=keep_every,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest completely written step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, record: dict, *, force: bool = False) -> bool:
        """Starts saving (asynchronously); returns whether a save was due and started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores onto the shardings in `abstract_state` (a tree of ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except ValueError as error:
            raise ValueError(
                f"the checkpoint at step {step} in {self.directory} does not match the train "
                "state this config builds (a different model, optimizer or clipping?). Resume "
                "with the config that wrote it, or start in a new workdir with "
                f"config.init_from.path pointing at it. Details: {error}"
            ) from error
        return restored.state, dict(restored.record)

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the parameters of a checkpoint (e.g. another run's, to fine-tune from).

        The optimizer state of that run is not read, so it may differ from this run's.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        item = {"params": abstract_params}
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            )
        )
        try:
            return self._manager.restore(step, args=args).state["params"]
        except ValueError as error:
            raise ValueError(
                f"the parameters at step {step} in {self.directory} do not fit this model "
                f"(another architecture or class count?). Details: {error}"
            ) from error

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings (for restore and AOT compilation)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
