"""CLI: `python -m vit_jax.main --config=configs/vit.py:<args> --workdir=<dir>`.

Flags -> locked ml_collections config -> `train.run`. Any field is overridden with
`--config.<field>=<value>`; an unknown field is refused with the closest existing names.
Multi-process runs pass --coordinator_address/--num_processes/--process_id (or rely on the
cluster's environment, e.g. on TPU pods, with --distributed).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/vit.py", "Config file[:args].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (cluster env).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.DEFINE_integer("local_device_count", None, "Simulated CPU devices in this process.")


def check_overrides(config, argv: list[str]) -> None:
    """Fails with the closest valid names for every unknown `--config.<field>`."""
    valid = sorted(_paths(config.to_dict()))
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        field = arg[len("--config.") :].split("=", 1)[0]
        if field not in valid and not any(v.startswith(field + ".") for v in valid):
            close = difflib.get_close_matches(field, valid, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SystemExit(f"error: unknown config field {field!r}.{hint}")


def _paths(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from _paths(value, f"{prefix}{key}.")


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.workdir is None:
        raise SystemExit("error: --workdir is required")
    import jax

    if FLAGS.local_device_count:
        jax.config.update("jax_num_cpu_devices", FLAGS.local_device_count)
    if FLAGS.coordinator_address or FLAGS.distributed:
        # Cross-process collectives for CPU devices; accelerators use their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes
    from vit_jax import train

    results = train.run(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print("final evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))


def load_config_file(spec: str):
    """The config that `--config=path[:arg]` names, loaded the way config_flags does."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_vit_jax_config", path)
    if module_spec is None or not os.path.exists(path):
        raise SystemExit(f"error: config file {path!r} does not exist")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def entry() -> None:
    """Console entry point: refuse unknown config fields in one line, then run absl."""
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    if overrides:
        spec = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), None)
        check_overrides(load_config_file(spec or "configs/vit.py"), overrides)
    app.run(main)


if __name__ == "__main__":
    entry()
