"""Training checkpoints through orbax-checkpoint's `CheckpointManager`.

A checkpoint holds the train state (parameters, optimizer state, step) plus a small JSON
record (by default `{"step": step}`: the step is also the data position). Orbax writes into
a temporary directory (`<step>.orbax-checkpoint-tmp*`) and renames it when complete (after
writing a `commit_success.txt` marker), so an interrupted save never replaces the last good
checkpoint and only finished steps are listed; temporaries left by a killed run are removed
when the next run opens the directory. A failed save (disk full, permissions) raises
`CheckpointSaveError` naming the step and the path; the previous checkpoint stays. Restoring
takes abstract arrays with shardings, which lets a checkpoint written on one mesh load onto
another; a checkpoint of another model is refused with every mismatched key listed. A
listed step whose files cannot be read (a data file cut short or gone, an empty or missing
`_METADATA` or `manifest.ocdbt`) is `DamagedCheckpointError`: one line naming the step, the
newest intact step before it and how to continue from that one; nothing is deleted.
"""

from __future__ import annotations

import json
import os
import re
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


def _whole_array_writes_on_cpu() -> None:
    """In one process on CPU devices, orbax writes each replicated array whole, not split
    into a slice per replica: the slices share one host's memory and disk anyway, and each
    is a compiled program (four seconds of a tiny run's start on 8 CPU devices). Orbax keys
    the choice on the array type for the whole process. Accelerators and several processes
    keep its default, which shares the writing out among the replicas' hosts."""
    if jax.default_backend() == "cpu" and jax.process_count() == 1:
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class CheckpointSaveError(UserError):
    """A checkpoint could not be written; the previous complete checkpoint is kept."""


class NoRoomError(UserError):
    """The workdir's file system has no room for one checkpoint."""


class StateMismatchError(UserError, ValueError):
    """A checkpoint's arrays do not fit the state this config builds (all problems listed)."""


class DamagedCheckpointError(UserError):
    """A completely written checkpoint step cannot be read (its files are cut short, empty
    or gone); the message names the newest intact earlier step and how to continue from it."""

    def __init__(self, message: str, *, step: int, intact_step: int | None):
        super().__init__(message)
        self.step = step
        self.intact_step = intact_step


# How a caller continues from another step: a train config field or a command's flag.
RESUME_STEP = "--config.checkpoint.resume_step={step}"
STEP_FLAG = "--step {step}"
# Status codes of tensorstore's read errors that mean the files are not what was written.
_READ_FAILURES = re.compile(r"\b(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|UNKNOWN|FAILED_PRECONDITION)\b")
_UNREADABLE_INDEX = (
    "its array metadata cannot be read (a data file under state/ is cut short or gone)"
)
_ARRAY = re.compile(r'Error reading "([^"]+)" in OCDBT')
_FILE = re.compile(r'local file "([^"]+)"|file "([^"]+)"')


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
        _whole_array_writes_on_cpu()
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

    def restore(
        self, abstract_state: Any, step: int | None = None, *, continue_with: str = RESUME_STEP
    ) -> tuple[Any, dict]:
        """Restores onto the shardings in `abstract_state` (a tree of ShapeDtypeStructs).

        DamagedCheckpointError if the step's files cannot be read (`continue_with`, with
        `{step}`, tells how to pick the intact earlier step); StateMismatchError if they are
        another state's."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        check_fits(self._readable_arrays(step, continue_with), abstract_state, self._where(step))
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as error:  # noqa: BLE001 - sorted into damaged files or another state
            raise self._restore_error(step, error, continue_with, RESUME_HINT) from None
        return restored.state, dict(restored.record)

    def restore_params(
        self,
        abstract_params: Any,
        step: int | None = None,
        *,
        continue_with: str = STEP_FLAG,
        which: str = "params",
    ) -> Any:
        """Only the parameters of a checkpoint (e.g. another run's, to fine-tune from):
        `which` is "params", or "ema_params" for their moving average where the run kept one
        (`parameter_sets`). The optimizer state of that run is not read, so it may differ
        from this run's."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        saved = self._readable_arrays(step, continue_with)
        saved = {k: v for k, v in saved.items() if k.startswith(f"{which}/")}
        check_fits(saved, {which: abstract_params}, self._where(step), INIT_HINT)
        item = {which: abstract_params}
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            )
        )
        try:
            return self._manager.restore(step, args=args).state[which]
        except Exception as error:  # noqa: BLE001 - sorted into damaged files or another model
            raise self._restore_error(step, error, continue_with, INIT_HINT) from None

    def parameter_sets(self, step: int, continue_with: str = STEP_FLAG) -> tuple[str, ...]:
        """The parameter trees saved at `step`: ("params",), or ("params", "ema_params") for
        a run that kept an EMA (config.ema_decay)."""
        saved = self._readable_arrays(step, continue_with)
        return tuple(
            k for k in ("params", "ema_params") if any(p.startswith(f"{k}/") for p in saved)
        )

    def set_aside_after(self, step: int, target: str) -> list[int]:
        """Moves the steps after `step` into the folder `target` (nothing is deleted), so a
        run resumed from `step` saves its later steps afresh; returns the steps moved."""
        later = sorted(s for s in self.all_steps() if s > step)
        if later and jax.process_index() == 0:
            for moved in later:
                source = storage.join(self.directory, str(moved))
                destination = storage.join(target, str(moved))
                copy = 1
                while storage.exists(destination):
                    destination, copy = storage.join(target, f"{moved}.{copy}"), copy + 1
                _move_tree(source, destination)
        if later:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("vit_jax set aside checkpoints")
            self._manager.reload()
        return later

    # --- damaged steps -----------------------------------------------------------------------

    def _where(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def damage(self, step: int) -> str | None:
        """Why `step` cannot be read ('state/_METADATA is empty', ...), or None where its
        files look whole (its index files and array metadata; the arrays are checked when
        read)."""
        reason = self._file_damage(step)
        if reason is None and self._saved_arrays(step) is None:
            reason = _UNREADABLE_INDEX
        return reason

    def _file_damage(self, step: int) -> str | None:
        """`damage` from the index files alone."""
        state = storage.join(self.directory, str(step), "state")
        try:
            metadata_path = storage.join(state, "_METADATA")
            if not storage.is_file(metadata_path):
                return "state/_METADATA is missing"
            text = storage.read_text(metadata_path)
            if not text.strip():
                return "state/_METADATA is empty"
            try:
                metadata = json.loads(text)
            except ValueError:
                return "state/_METADATA is cut short or not JSON"
            if isinstance(metadata, dict) and metadata.get("use_ocdbt", True):
                manifest = storage.join(state, "manifest.ocdbt")
                if not storage.is_file(manifest):
                    return "state/manifest.ocdbt is missing"
                if storage.size(manifest) == 0:
                    return "state/manifest.ocdbt is empty"
        except OSError as error:
            return f"its files cannot be read ({_first_line(error)})"
        return None

    def intact_before(self, step: int) -> int | None:
        """The newest step before `step` whose files look whole, or None."""
        for earlier in sorted((s for s in self.all_steps() if s < step), reverse=True):
            if self.damage(earlier) is None:
                return earlier
        return None

    def damaged_error(
        self, step: int, reason: str, continue_with: str | None
    ) -> DamagedCheckpointError:
        """One line: the damaged step, why, the intact earlier step and how to use it."""
        intact = self.intact_before(step)
        where = self._where(step)
        if intact is None:
            then = "no earlier step is intact: train again in a new workdir (nothing was deleted)"
        elif continue_with is None:
            then = (
                f"step {intact} is intact: move {where} out of the run to start from it "
                "(nothing was deleted)"
            )
        else:
            how = continue_with.format(step=intact)
            then = f"step {intact} is intact: continue from it with {how} (nothing was deleted)"
        return DamagedCheckpointError(
            f"the checkpoint of step {step} in {where} cannot be read: {reason}; {then}",
            step=step,
            intact_step=intact,
        )

    def _readable_arrays(self, step: int, continue_with: str | None) -> dict:
        """`_saved_arrays(step)`, or DamagedCheckpointError where the step is not whole."""
        reason = self._file_damage(step)
        saved = None if reason is not None else self._saved_arrays(step)
        if saved is None:
            raise self.damaged_error(step, reason or _UNREADABLE_INDEX, continue_with)
        return saved

    def _restore_error(
        self, step: int, error: BaseException, continue_with: str | None, hint: str
    ) -> UserError:
        """A failed orbax restore as one line: damaged files, or another state."""
        text = " ".join(f"{type(e).__name__}: {e}" for e in _chain(error))
        if isinstance(error, OSError) or _READ_FAILURES.search(text):
            return self.damaged_error(step, _read_reason(text, self._where(step)), continue_with)
        return StateMismatchError(
            f"the checkpoint in {self._where(step)} does not match the train state this "
            f"config builds (a different model, optimizer or clipping?): "
            f"{_first_line(error)}. {hint}"
        )

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
        """Waits for a save in flight and closes; closing again does nothing."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
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


def _move_tree(source: str, destination: str) -> None:
    """Moves a folder (a rename on disk; a copy, then a delete, in a bucket)."""
    if not storage.is_remote(source):
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        shutil.move(source, destination)
        return
    prefix = source.rstrip("/") + "/"
    files = list(storage.walk_files(source))
    for name in files:
        storage.write_bytes(destination + "/" + name[len(prefix) :], storage.read_bytes(name))
    for name in files:
        storage.remove(name)


def _chain(error: BaseException) -> list[BaseException]:
    """The error and its causes (orbax wraps tensorstore's message in its own)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _read_reason(text: str, step_dir: str) -> str:
    """'a data file under state/ (params.head.kernel) is cut short (OUT_OF_RANGE)' from a
    tensorstore read error: the file, or the array whose data could not be read."""
    if "OUT_OF_RANGE" in text:
        what = "is cut short"
    elif "NOT_FOUND" in text or "No such file" in text:
        what = "is missing"
    else:
        what = "cannot be read"
    code = _READ_FAILURES.search(text)
    code_text = f" ({code.group(1)})" if code else ""
    array = _ARRAY.search(text)
    names = [a or b for a, b in _FILE.findall(text)]
    names = [n for n in names if not n.rstrip("/").endswith("/state")]
    if names:
        name = names[-1]
        prefix = step_dir.rstrip("/") + "/"
        name = name[len(prefix) :] if name.startswith(prefix) else name
        return f"{name} {what}{code_text}"
    holding = f" (holding {array.group(1).split('/')[0]})" if array else ""
    return f"a data file under state/{holding} {what}{code_text}"


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:300]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings (for restore and AOT compilation)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
