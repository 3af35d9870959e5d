"""The one command harness: `python -m vit_jax <command> [flags] [--config.<field>=<value>]`.

Every command and tool runs through `run(name, argv)`, in this order:
1. the host-memory setting (`host_memory.keep_freed_host_memory`), before JAX or TensorFlow
   are imported, since a thread keeps the malloc arena it first allocated from, and
   TensorFlow's environment (`tensorflow_environment`): quiet, and without Keras;
2. the command's module is imported and its flags parsed (`--config.<field>=<value>`
   overrides split off for the commands that take a config);
3. the command's `before_jax(args)` hook where it has one (the planner's simulated device
   count, which JAX reads when it starts);
4. logging while the command runs: its progress messages on stderr, orbax's routine ones muted;
5. the command's `run(args, overrides)`. A `UserError` (a mistake the user can fix) is one
   `error:` line on stderr and exit status 2; `--verbose` shows the traceback instead.

A command module defines `parser()` and `run(args, overrides)`, and optionally
`TAKES_CONFIG = True` and `before_jax(args)`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence

from vit_jax import host_memory
from vit_jax.errors import UserError

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report it
COMMANDS = {
    "train": "vit_jax.commands.train",
    "transfer": "vit_jax.commands.transfer",
    "plan": "vit_jax.commands.plan",
    "predict": "vit_jax.commands.predict",
    "visualize": "vit_jax.commands.visualize",
    "export": "vit_jax.commands.export",
    "step_benchmark": "vit_jax.tools.step_benchmark",
    "input_benchmark": "vit_jax.tools.input_benchmark",
    "write_shards": "vit_jax.tools.write_shards",
}
PROG = "python -m vit_jax"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line and exit status 2, like a UserError."""

    def __init__(self, command: str, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(prog=f"{PROG} {command}", **kwargs)

    def error(self, message: str):
        self.exit(USER_ERROR_STATUS, f"error: {message} (see {self.prog} --help)\n")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(other arguments, config overrides as 'field=value') from the command line."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            field = arg[len("--config.") :]
            if "=" not in field and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                field, i = f"{field}={argv[i + 1]}", i + 1
            overrides.append(field)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def run(name: str, argv: Sequence[str] = ()) -> int:
    """Runs command `name` with its arguments; returns the exit status."""
    if name not in COMMANDS:
        print(f"error: no command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return USER_ERROR_STATUS
    tensorflow_environment()
    host_memory.keep_freed_host_memory()
    try:
        return _run(name, argv)
    except KeyboardInterrupt:  # Ctrl-C while importing or compiling: the loop has its own
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED_STATUS


def tensorflow_environment() -> None:
    """TensorFlow settings for a process of this package, unless the user set them: C++ logs
    from errors on (its start-up chatter is not the trainer's output), and no Keras.
    TensorFlow imports Keras eagerly unless `TF_USE_LEGACY_KERAS` asks for the separate
    `tf_keras` package; with that one absent nothing is loaded in its place. The commands use
    tf.data only, and Keras is 5 of TensorFlow's 13 s start-up on a 2-core machine."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if importlib.util.find_spec("tf_keras") is None:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def _run(name: str, argv: Sequence[str]) -> int:
    command = importlib.import_module(COMMANDS[name])
    rest, overrides = list(argv), []
    if getattr(command, "TAKES_CONFIG", False):
        rest, overrides = split_overrides(rest)
    args = command.parser().parse_intermixed_args(rest)
    try:
        if hasattr(command, "before_jax"):
            command.before_jax(args)
        with _progress_messages():
            status = command.run(args, overrides)
    except Exception as e:  # noqa: BLE001 - a mistake is one line, anything else raises
        message = str(e) if isinstance(e, UserError) else out_of_memory(e)
        if message is None or getattr(args, "verbose", False):
            raise
        print(f"error: {message}", file=sys.stderr)
        return USER_ERROR_STATUS
    return int(status or 0)


def out_of_memory(error: BaseException) -> str | None:
    """What to do about a program that needs more memory than a device has (XLA's
    RESOURCE_EXHAUSTED), in one line; None for any other error. The config asked for it
    (batch, image size, model), so it is the user's to change, not a crash to debug."""
    text = str(error)
    if type(error).__name__ != "JaxRuntimeError" or not (
        "RESOURCE_EXHAUSTED" in text or "Out of memory" in text
    ):
        return None
    asked = re.search(r"allocating (\d+) bytes", text)
    need = f" (one allocation of {int(asked[1]) / 2**30:.1f} GiB)" if asked else ""
    return (
        f"out of device memory{need}: what this command compiled does not fit this machine; "
        "lower the batch size (config.batch_size, config.eval_batch_size, --batch_size) or "
        "config.model.img_size, set config.model.remat=full, or ask `python -m vit_jax plan` "
        "with the same --config flags what fits"
    )


@contextlib.contextmanager
def _progress_messages() -> Iterator[None]:
    """While a command runs: the project's INFO messages (resumed from, initialised from)
    on stderr; orbax, which logs every file it reads or writes and each read-only option it
    adjusts through absl, only from ERROR on. The loggers are put back afterwards, so a
    command run from Python (a notebook, a test) leaves its caller's logging as it was."""
    absl, log = logging.getLogger("absl"), logging.getLogger("vit_jax")
    saved = (absl.level, log.level, log.propagate)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    absl.setLevel(logging.ERROR)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        absl.setLevel(saved[0])
        log.setLevel(saved[1])
        log.propagate = saved[2]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vit_jax <command> ...` and the `vit-jax` console command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"usage: {PROG} <command> [flags]   ({PROG} <command> --help)", "commands:"]
        lines += [f"  {name}" for name in COMMANDS]
        print("\n".join(lines), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else USER_ERROR_STATUS
    return run(argv[0], argv[1:])


def entry() -> None:
    """Console entry point."""
    sys.exit(main())
