"""CLI: `python -m vit_jax.commands.train --config=vit:<model>,<dataset>,<recipe> --workdir=<dir>`.

Flags -> `config_loader.load_config` (named config or file, typed `--config.<field>=<value>`
overrides, derived fields rebuilt) -> `validate` (before anything compiles) -> `loop.run`.
`--dry_run` prints the resolved config and the run's sizes and exits. Mistakes the user can
fix print one line on stderr and exit with status 2 (`--verbose` shows the traceback).
Multi-process runs pass --coordinator_address/--num_processes/--process_id, or rely on the
cluster's environment (TPU pods, SLURM) with --distributed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from vit_jax import config_loader, host_memory, validate  # noqa: E402
from vit_jax.errors import UserError  # noqa: E402

USER_ERROR_STATUS = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vit_jax.commands.train",
        description="Train and evaluate a Vision Transformer. Any config field is set with "
        "--config.<field>=<value> (e.g. --config.model.dtype=bfloat16).",
        allow_abbrev=False,
        epilog="Recipes: small (the demo), pretrain, plain_baseline, finetune, finetune_short. "
        "Datasets: digits, cifar10, cifar100, imagenet2012, imagenet21k, jft, oxford_iiit_pet, "
        "oxford_flowers102, vtab/<task>, tfds:<name>, folder:<root>. --dry_run prints every "
        "field of the resolved config.",
    )
    p.add_argument(
        "--config",
        default=config_loader.DEFAULT_SPEC,
        help="named config or file, with arguments: vit, vit:B/16,cifar10,finetune, "
        "configs/vit.py:H/14,imagenet21k,pretrain (default: vit, the digits demo)",
    )
    p.add_argument("--workdir", required=True, help="checkpoints, logs and metrics go here")
    p.add_argument("--dry_run", action="store_true", help="print the resolved run and exit")
    p.add_argument(
        "--devices", type=int, help="with --dry_run: resolve the mesh for this many devices"
    )
    p.add_argument("--verbose", action="store_true", help="tracebacks for every error")
    p.add_argument("--distributed", action="store_true", help="jax.distributed from the env")
    p.add_argument("--coordinator_address", help="host:port of process 0 (multi-process)")
    p.add_argument("--num_processes", type=int, help="number of processes (multi-process)")
    p.add_argument("--process_id", type=int, help="this process's index (multi-process)")
    p.add_argument("--local_device_count", type=int, help="simulated CPU devices per process")
    return p


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
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


def main(argv: list[str] | None = None) -> int:
    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser().parse_args(rest)
    host_memory.keep_freed_host_memory()  # before JAX starts its threads
    try:
        return run(args, overrides)
    except UserError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_STATUS


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    config = config_loader.load_config(args.config, overrides)
    validate.check_config(config)
    import jax

    if args.local_device_count:
        jax.config.update("jax_num_cpu_devices", args.local_device_count)
    if args.dry_run:
        print(dry_run_report(config, args, overrides, jax.device_count()))
        return 0
    if args.coordinator_address or args.distributed:
        # Cross-process collectives for CPU devices; accelerators use their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    problems = validate.check_machine(config, args.workdir, jax.device_count(), create=True)
    if problems:
        raise UserError("; ".join(problems))
    validate.run_summary(config, jax.device_count())  # the schedule against the data's size
    _show_progress_messages()
    from vit_jax import loop

    results = loop.run(config, args.workdir)
    if jax.process_index() == 0:
        print("final evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return 0


def _show_progress_messages() -> None:
    """The trainer's INFO messages (resumed from, initialised from) on stderr; orbax, which
    logs every file it writes through absl, only from WARNING on."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    log = logging.getLogger("vit_jax")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def dry_run_report(config, args: argparse.Namespace, overrides: list[str], local: int) -> str:
    """The resolved config, the mesh and sizes, and what would not fit this machine."""
    warnings = []
    devices = args.devices or local
    if not args.devices:
        try:
            validate.mesh_shape(config.mesh, devices)
        except UserError as e:
            fixed = 1
            for value in config.mesh.values():
                fixed *= value if value != -1 else 1
            warnings.append(f"{e}; shown for {fixed} devices (set --devices to choose)")
            devices = fixed
    warnings += validate.check_machine(config, args.workdir, devices, create=False)
    summary = validate.run_summary(config, devices)
    lines = [f"config {args.config} with {len(overrides)} override(s):"]
    for field in config_loader.leaf_paths(config):
        lines.append(f"  {field} = {_shown(config, field)}")
    mesh = " ".join(f"{k}={v}" for k, v in summary["mesh"].items())
    lines += [
        f"run on {summary['devices']} device(s), mesh {mesh}:",
        f"  batch {summary['batch_size']}: {summary['batch_per_device']:g} per device",
        f"  micro-batch {summary['micro_batch']}: {summary['micro_batch_per_device']:g} per "
        f"device, {summary['grad_accum_steps']} accumulation step(s) per step",
        "  " + _steps_line(config, summary),
    ]
    if args.distributed or args.coordinator_address:
        lines.append("  multi-process: jax.distributed is not started in a dry run")
    lines += [f"warning: {w}" for w in warnings]
    lines.append("dry run: nothing was compiled, allocated or written")
    return "\n".join(lines)


def _shown(config, field: str) -> str:
    value = config
    for part in field.split("."):
        value = value[part]
    return value if isinstance(value, str) else repr(value)


def _steps_line(config, summary: dict) -> str:
    steps, epochs, examples = summary["total_steps"], summary["epochs"], summary["train_examples"]
    if steps and epochs:
        return f"steps {steps} = {epochs:.2f} epochs of {examples} train examples"
    if steps:
        return f"steps {steps} (train split size unknown here: epochs unknown)"
    return (
        f"steps: {config.num_epochs:g} epochs; the count follows from the train split's size, "
        "unknown here (the data is not on this machine)"
    )


def entry() -> None:
    """Console entry point (`vit-jax-train`)."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
