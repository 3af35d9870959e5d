"""Small helpers shared by the tests: config changes, README commands."""

import os
import re
import shlex
import socket

import ml_collections


def with_changes(config: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    """Sets dotted fields (`"optim.name": "sgd"` via `**{...}`) on an unlocked view."""
    with config.unlocked():
        for key, value in changes.items():
            target = config
            *parents, leaf = key.split(".")
            for parent in parents:
                target = target[parent]
            target[leaf] = value
    return config


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(devices: int | None = None, *, optimised: bool = False) -> dict[str, str]:
    """The environment of a command a test starts: this session's, with the repository on
    the path and XLA's flags kept (tests/conftest.py: LLVM optimisation off) except the
    simulated device count, which is `devices` (None: the process's own, one CPU device or
    its `--local_device_count`). `optimised`: LLVM optimisation at level 1, for commands
    that train for hundreds of steps, where running the program costs more than compiling
    it. On the demo's model level 1 runs a step faster than the default level 2 and compiles
    in a fraction of its time (the scanned model's initialisation: 2 s against 13 s)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    if optimised:
        flags = re.sub(r"--xla_backend_optimization_level=\S+", "", flags)
        flags += " --xla_backend_optimization_level=1"
    if devices is not None:
        flags += f" --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = flags.strip()
    return env


def shell_commands(text: str) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, split at `&&`."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


def readme_commands(command: str) -> list[list[str]]:
    """The arguments of every `python3 -m vit_jax <command> ...` in README.md."""
    commands = shell_commands(open(os.path.join(ROOT, "README.md")).read())
    prefix = ["python3", "-m", "vit_jax", command]
    return [words[4:] for words in map(shlex.split, commands) if words[:4] == prefix]


def as_in_readme(args: list[str], run_dir: str, **more: str) -> list[str]:
    """README arguments pointed at the test's run (and other replacements)."""
    swaps = {"workdir/digits": run_dir, "workdir/my_images": run_dir, **more}
    for old, new in swaps.items():
        args = [a.replace(old, new) for a in args]
    return args


def free_port() -> int:
    """A TCP port free on localhost (for a multi-process coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_MODEL = (
    "model.width=32",
    "model.depth=2",
    "model.mlp_dim=64",
    "model.num_heads=2",
    "model.img_size=8",
)

# The tiny run every training test starts from: the demo config (digits) with a 2-block
# width-32 ViT at 8 px, 6 steps of batch 32, a log line every 2 steps, an evaluation and a
# checkpoint every 3.
TINY_RUN = {
    **dict(o.split("=") for o in TINY_MODEL),
    "batch_size": 32,
    "eval_batch_size": 128,
    "total_steps": 6,
    "log_every_steps": 2,
    "eval_every_steps": 3,
    "checkpoint.every_steps": 3,
    "checkpoint.keep": 5,
    "schedule.warmup_steps": 2,
    "schedule.base_lr": 1e-3,
}


def _text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value)


def tiny_overrides(*overrides: str, **changes) -> list[str]:
    """`field=value` overrides of the tiny run. `changes` take dotted names through
    `**{"model.dropout": 0.1}` or with `__` for the dot (`checkpoint__every_steps=2`); a
    change to None leaves that field at the named config's default; `overrides` come last."""
    settings = dict(TINY_RUN)
    for key, value in changes.items():
        settings[key.replace("__", ".")] = value
    given = [f"{key}={_text(value)}" for key, value in settings.items() if value is not None]
    return [*given, *overrides]


def tiny_config(*overrides: str, **changes) -> ml_collections.ConfigDict:
    """The tiny run's config, through the command line's own parser (`--config=vit`)."""
    from vit_jax import config_loader

    return config_loader.load_config("vit", tiny_overrides(*overrides, **changes))


def tiny_flags(*overrides: str, **changes) -> list[str]:
    """The same run as `tiny_config(...)` as `vit_jax train` flags."""
    return ["--config=vit", *(f"--config.{o}" for o in tiny_overrides(*overrides, **changes))]


# The runs that tests/conftest.py trains once per test process (as `tiny_config` changes).
TRAINED_RUN = {
    "model.pool_type": "tok",
    "batch_size": 64,
    "total_steps": 100,
    "log_every_steps": 10,
    "eval_every_steps": 50,
    "checkpoint.every_steps": 100,
    "checkpoint.async_save": False,
    "schedule.warmup_steps": 5,
    "schedule.base_lr": 3e-3,
    "ema_decay": 0.99,  # a weight EMA: predict, visualize and export take it by default
}
# Dropout and mixup draw random numbers every step: a resume must restore them too, and the
# weight EMA kept in the state.
RESUME_RUN = {"model.dropout": 0.1, "mixup.mixup_alpha": 0.2, "ema_decay": 0.9}
# Long enough that a SIGTERM sent at step 3 lands mid-run; a log line every step.
STOPPED_RUN = {
    "total_steps": 100,
    "log_every_steps": 1,
    "eval_every_steps": 100,
    "checkpoint.every_steps": 100,
}


# The planner's tiny model: `vit:Ti/16,cifar10,small` (10 classes, gap pooling, AdamW) shrunk
# to 4 tokens of width 32, as `plan` flags and as a config.
PLAN_SPEC = "vit:Ti/16,cifar10,small"
PLAN_MODEL = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "img_size": 32}
PLAN_FLAGS = [
    *(f"--config.model.{k}={v}" for k, v in {**PLAN_MODEL, "patch_size": 16}.items()),
    "--config.batch_size=16",
]


def plan_config(mesh: str, **model) -> ml_collections.ConfigDict:
    """The planner's tiny config on the mesh `mesh` (`plan --mesh` syntax, e.g. "fsdp=8");
    `model` changes model fields (depth=4)."""
    from vit_jax import config_loader
    from vit_jax.commands import plan

    overrides = [f.removeprefix("--config.") for f in PLAN_FLAGS]
    overrides += [f"model.{k}={v}" for k, v in model.items()]
    return config_loader.load_config(PLAN_SPEC, overrides + plan._mesh_overrides(mesh))
