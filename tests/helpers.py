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


def readme_commands(module: str) -> list[list[str]]:
    """The arguments of every `python3 -m vit_jax.<module> ...` command in README.md."""
    commands = shell_commands(open(os.path.join(ROOT, "README.md")).read())
    prefix = ["python3", "-m", f"vit_jax.{module}"]
    return [words[3:] for words in map(shlex.split, commands) if words[:3] == prefix]


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


def tiny_config(*overrides: str) -> ml_collections.ConfigDict:
    """The demo config with a tiny model at 8 px, through the command line's own parser."""
    from vit_jax import config_loader

    return config_loader.load_config("vit", [*TINY_MODEL, *overrides])
