"""`python -m vit_jax train --config=vit:<model>,<dataset>,<recipe> --workdir=<dir>`.

Flags -> `config_loader.load_config` (named config or file, typed `--config.<field>=<value>`
overrides, derived fields rebuilt) -> `validate` (before anything compiles) -> `loop.run`.
`--dry_run` prints the resolved config, the run's sizes and (for an image folder) its
classes and files per split, and exits. Multi-process runs pass
--coordinator_address/--num_processes/--process_id, or rely on the cluster's environment
(TPU pods, SLURM) with --distributed.
"""

from __future__ import annotations

import argparse

from vit_jax import cli, config_loader, distill, sharding, validate
from vit_jax.errors import UserError

TAKES_CONFIG = True


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        "train",
        description="Train and evaluate a Vision Transformer. Any config field is set with "
        "--config.<field>=<value> (e.g. --config.model.dtype=bfloat16).",
        epilog="Recipes: small (the demo), pretrain, plain_baseline, finetune, finetune_short, "
        "distill. "
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


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    config = config_loader.load_config(args.config, overrides)
    validate.check_config(config)
    validate.check_folder_splits(config)  # before anything is created or compiled
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
    distill.check_teacher(config)  # a teacher that cannot be used: before the workdir exists
    problems = validate.check_machine(config, args.workdir, jax.device_count(), create=True)
    if problems:
        raise UserError("; ".join(problems))
    validate.run_summary(config, jax.device_count())  # the schedule against the data's size
    from vit_jax import loop

    results = loop.run(config, args.workdir)
    if jax.process_index() == 0 and results:
        print("final evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return 0


def dry_run_report(config, args: argparse.Namespace, overrides: list[str], local: int) -> str:
    """The resolved config, the mesh and sizes, and what would not fit this machine."""
    warnings = []
    devices = args.devices or local
    # A dry run is one process: it lays the mesh over as many slices as the DCN fields ask.
    slices = 1
    for field in sharding.DCN_AXES:
        slices *= max(config.mesh.get(field, 1), 1)
    if not args.devices:
        try:
            sharding.mesh_shape(config.mesh, devices, slices)
        except UserError as e:
            fixed = 1
            for value in config.mesh.values():
                fixed *= value if value != -1 else 1
            warnings.append(f"{e}; shown for {fixed} devices (set --devices to choose)")
            devices = fixed
    warnings += validate.check_machine(config, args.workdir, devices, create=False, slices=slices)
    data_lines = validate.folder_listings(config)  # an image folder without images: refused
    teacher_lines, teacher_warnings = distill.dry_run_lines(config)  # an unusable one: refused
    warnings += teacher_warnings
    summary = validate.run_summary(config, devices, slices)
    lines = [f"config {args.config} with {len(overrides)} override(s):"]
    for field in config_loader.leaf_paths(config):
        lines.append(f"  {field} = {_shown(config, field)}")
    mesh = " ".join(f"{k}={v}" for k, v in summary["mesh"].items())
    dcn = " ".join(f"{k}={v}" for k, v in summary["dcn"].items())
    ici = " ".join(f"{k}={v}" for k, v in summary["ici"].items())
    per_slice = summary["devices"] // summary["slices"]
    lines += [
        f"run on {summary['devices']} device(s), mesh {mesh}:",
        f"  layout {summary['slices']} slice(s) (DCN {dcn}) x {per_slice} device(s) per slice "
        f"(ICI {ici}); data = dcn_data x data, fsdp = dcn_fsdp x fsdp",
        f"  batch {summary['batch_size']}: {summary['batch_per_device']:g} per device",
        f"  micro-batch {summary['micro_batch']}: {summary['micro_batch_per_device']:g} per "
        f"device, {summary['grad_accum_steps']} accumulation step(s) per step",
        "  " + _steps_line(config, summary),
        *data_lines,
    ]
    if config.model.get("num_registers"):
        lines.append("  " + _registers_line(config.model))
    if config.model.get("patch_sizes"):
        lines.append("  " + _flexi_line(config.model))
    if config.get("ema_decay"):
        lines.append(
            f"  weight EMA: decay {config.ema_decay:g} (min(decay, (1 + step) / (10 + step))), "
            "float32, sharded like the parameters; evaluated as <eval>_ema"
        )
    lines += [f"  {line}" for line in teacher_lines]
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


def _registers_line(model) -> str:
    """The token sequence of a ViT with register tokens: what each image costs in tokens."""
    patches = (model.img_size // model.patch_size) ** 2
    cls_count = int(model.get("pool_type") == "tok")
    total = patches + cls_count + model.num_registers
    cls_text = " + 1 class token" if cls_count else ""
    return (
        f"model: {model.num_registers} register token(s){cls_text} + {patches} patch tokens "
        f"= {total} tokens per image; the registers are dropped before pooling"
    )


def _flexi_line(model) -> str:
    """A FlexiViT's sizes: what each step may run at, and where the parameters' shapes are."""
    own, size = model.patch_size, model.img_size
    sizes = ", ".join(f"{p} ({(size // p) ** 2} tokens)" for p in model.patch_sizes)
    return (
        f"FlexiViT: patch sizes {sizes}, one drawn per train step from (seed, step); "
        f"parameters at patch size {own} ({own}x{own} kernel, {size // own}x{size // own} "
        "position grid), resized to each size; evaluated at each as <eval>_p<size> "
        f"(e.g. test_p{model.patch_sizes[0]}/top1), few-shot at {own}"
    )


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
