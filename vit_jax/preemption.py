"""Stop signals: SIGTERM (preemption) and SIGINT (Ctrl-C) end a run after a checkpoint.

The handler only records the signal; the train loop asks `stop_requested(step)` after each
step, saves a checkpoint at that step and raises `Preempted`, a `SystemExit` whose status is
128 + the signal number (143 for SIGTERM, 130 for SIGINT). A second Ctrl-C aborts at once.

Every process of a multi-process run must stop at the same step. JAX's preemption service
(started by `jax.distributed.initialize`, on by default) catches SIGTERM itself and makes
`reached_preemption_sync_point(step)` true on all processes at one agreed step; SIGINT is
handed to it as a SIGTERM. Without that service the processes agree through a cross-process
maximum of the flag after every step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preempted(SystemExit):
    """A stop signal ended the run after saving a checkpoint; exit status 128 + signal."""

    def __init__(self, signum: int, step: int | None, directory: str):
        self.signum = int(signum)
        self.step = step
        name = signal.Signals(signum).name
        saved = (
            f"saved the checkpoint of step {step} in {directory}"
            if step is not None
            else f"no checkpoint in {directory} yet"
        )
        self.message = (
            f"stopped by {name}: {saved}; run the same command again to resume "
            f"(exit status {128 + self.signum})"
        )
        super().__init__(128 + self.signum)

    def __str__(self) -> str:
        return self.message


def _preemption_sync_manager():
    """JAX's preemption sync manager when jax.distributed runs one, else None."""
    from jax._src import distributed  # the public helper raises instead of telling

    state = distributed.global_state
    return state.preemption_sync_manager if state.client is not None else None


class StopSignals:
    """Context manager: records SIGTERM/SIGINT while a run trains (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._sync = None
        self._multi = False

    def __enter__(self) -> StopSignals:
        self._multi = jax.process_count() > 1
        self._sync = _preemption_sync_manager() if self._multi else None
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        # With JAX's preemption service, its own SIGTERM handler must stay in place.
        names = [signal.SIGINT] if self._sync is not None else [signal.SIGTERM, signal.SIGINT]
        for signum in names:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        del frame
        if self.received is None:
            self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # twice: abort now
        print(
            f"received {signal.Signals(signum).name}: saving a checkpoint after this step, "
            "then stopping",
            file=sys.stderr,
            flush=True,
        )
        if self._sync is not None and signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

    def stop_requested(self, step: int) -> int | None:
        """The signal to stop for after `step` (the same on every process), else None."""
        if self._sync is not None:
            if multihost_utils.reached_preemption_sync_point(step):
                return self.received or signal.SIGTERM
            return None
        if self._multi:
            flags = multihost_utils.process_allgather(np.int32(self.received or 0))
            agreed = int(np.max(flags))
            return agreed or None
        return self.received
