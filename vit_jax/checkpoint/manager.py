"""Training checkpoints through orbax-checkpoint's `CheckpointManager`.

A checkpoint holds the train state (parameters, optimizer state, step) plus a small JSON
record (by default `{"step": step}`: the step is also the data position). Orbax writes into
a temporary directory (`<step>.orbax-checkpoint-tmp*`) and renames it when complete (after
writing a `commit_success.txt` marker), so an interrupted save never replaces the last good
checkpoint and only finished steps are listed; temporaries left by a killed run are removed
when the next run opens the directory. A failed save (disk full, permissions) raises
`CheckpointSaveError` naming the step and the path; the previous checkpoint stays. Restoring
takes abstract arrays with shardings, which lets a checkpoint written on one mesh load onto
another; a checkpoint of another model is refused with every mismatched key listed.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_manager import StepAlreadyExistsError

from vit_jax import storage
from vit_jax.errors import UserError

_MAX_LISTED = 20


class CheckpointSaveError(UserError):
    """A checkpoint could not be written; the previous complete checkpoint is kept."""


class NoRoomError(UserError):
    """The workdir's file system has no room for one checkpoint."""


class StateMismatchError(UserError, ValueError):
    """A checkpoint's arrays do not fit the state this config builds (all problems listed)."""


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
        read_only: bool = False,
    ):
        """`read_only` opens another run's checkpoints (to restore parameters) without
        creating or cleaning anything: a save in progress there is left alone."""
        if every_steps <= 0:
            raise ValueError(f"config.checkpoint.every_steps must be positive, got {every_steps}")
        self.directory = storage.absolute(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            max_to_keep=keep,
            keep_period=keep_every,
            enable_async_checkpointing=async_save,
            create=not read_only,
            cleanup_tmp_directories=not read_only,  # half-written saves of a killed run
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step of a save that may still be running

    def latest_step(self) -> int | None:
        """The newest completely written step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self, step: int, state: Any, record: dict | None = None, *, force: bool = False
    ) -> bool:
        """Starts saving (asynchronously); returns whether a save was due and started.

        `record` is stored as JSON next to the state (default `{"step": step}`). Raises
        CheckpointSaveError if this save or the previous asynchronous one failed.
        """
        record = {"step": step} if record is None else record
        if not force and not self._manager.should_save(step):
            return False
        self.wait()  # an error of the previous save is reported with its own step
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
        )
        try:
            started = self._manager.save(step, args=args, force=force)
        except StepAlreadyExistsError:
            raise
        except (OSError, ValueError, RuntimeError) as error:
            raise self._save_error(step, error) from error
        self._pending = step if started else None
        return started

    def _save_error(self, step: int | None, error: BaseException) -> CheckpointSaveError:
        try:
            self._manager.reload()  # the on-disk truth: a failed step is not listed
            kept = self._manager.latest_step()
        except Exception:  # noqa: BLE001 - the directory itself may be unreadable now
            kept = None
        kept_text = f"the checkpoint of step {kept} is kept" if kept is not None else "none kept"
        return CheckpointSaveError(
            f"could not save the checkpoint of step {step} to "
            f"{storage.join(self.directory, str(step))}: {_first_line(error)} ({kept_text}). "
            "Free disk space or fix the permissions (for a bucket: the credentials' write "
            "access), then run the same command again to resume."
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores onto the shardings in `abstract_state` (a tree of ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        check_fits(self._saved_arrays(step), abstract_state, f"{self.directory}/{step}")
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
        saved = self._saved_arrays(step)
        if saved is not None:
            saved = {k: v for k, v in saved.items() if k.startswith("params/")}
        check_fits(saved, {"params": abstract_params}, f"{self.directory}/{step}", INIT_HINT)
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

    def _saved_arrays(self, step: int) -> dict[str, tuple[int, ...]] | None:
        """Shapes of the state arrays saved at `step` by path, from the metadata only."""
        path = storage.join(self.directory, str(step), "state")
        try:
            metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
        except Exception:  # noqa: BLE001 - no readable metadata: orbax checks on restore
            return None
        tree = getattr(metadata, "tree", metadata)
        return {
            key_path(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(leaf, "shape")
        }

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk (CheckpointSaveError if not)."""
        try:
            self._manager.wait_until_finished()
        except (OSError, ValueError, RuntimeError) as error:
            step, self._pending = self._pending, None
            raise self._save_error(step, error) from error
        self._pending = None

    def close(self) -> None:
        self.wait()
        self._manager.close()


def key_path(path: tuple) -> str:
    """'params/blocks/0/mlp/kernel' for a pytree key path (dict keys, indices, attributes)."""
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


RESUME_HINT = (
    "Resume with the config that wrote it, or start in a new workdir with "
    "config.init_from.path pointing at it."
)
INIT_HINT = "Point config.init_from.path at a run of the same model and class count."


def check_fits(
    saved: dict[str, tuple[int, ...]] | None, abstract: Any, where: str, hint: str = RESUME_HINT
) -> None:
    """Raises StateMismatchError listing every missing, unexpected or mis-shaped array."""
    if saved is None:
        return
    expected = {
        key_path(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    missing = sorted(set(expected) - set(saved), key=_params_first)
    unexpected = sorted(set(saved) - set(expected), key=_params_first)
    shapes = [
        f"{k} expected {expected[k]} found {saved[k]}"
        for k in sorted(set(expected) & set(saved), key=_params_first)
        if expected[k] != saved[k]
    ]
    problems = [
        (f"{len(shapes)} with other shapes", shapes),
        (f"{len(missing)} missing", missing),
        (f"{len(unexpected)} unexpected", unexpected),
    ]
    problems = [(title, items) for title, items in problems if items]
    if not problems:
        return
    details = "; ".join(f"{title}: {_listed(items)}" for title, items in problems)
    raise StateMismatchError(
        f"the checkpoint in {where} does not match the train state this config builds (a "
        f"different model, class count, optimizer or clipping?): {details}. {hint}"
    )


def _params_first(key: str) -> tuple[bool, str]:
    return not key.startswith("params/"), key


def _listed(items: list[str]) -> str:
    more = f", and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def state_bytes(abstract_state: Any) -> int:
    """Bytes of all arrays in a (possibly abstract) state: the size of one checkpoint."""
    return sum(
        int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(abstract_state)
    )


def check_room(directory: str, abstract_state: Any, margin: float = 1.1) -> None:
    """Raises NoRoomError if `directory`'s file system cannot hold one more checkpoint.

    Buckets have no fixed size and are not checked here (`storage.check_writable` checks
    that one can be written).
    """
    if storage.is_remote(directory):
        return
    existing = directory
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing) or "."
    need = int(state_bytes(abstract_state) * margin)
    free = shutil.disk_usage(existing).free
    if free < need:
        raise NoRoomError(
            f"no room for a checkpoint in {directory}: one needs about {_mib(need)} "
            f"(parameters and optimizer state), the disk has {_mib(free)} free. Free some "
            "space or choose another --workdir."
        )


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:300]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings (for restore and AOT compilation)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
