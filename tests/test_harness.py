"""The one command harness (`python -m vit_jax <command>`): order of start-up, one-line
mistakes, and the planner's simulated devices set in its own process."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env
from vit_jax import cli
from vit_jax.errors import UserError

SPY = """
import os, sys
from vit_jax import cli, host_memory

real = host_memory.keep_freed_host_memory

def spy():
    threads = len(os.listdir("/proc/self/task"))
    print("at host memory:", threads, "jax" in sys.modules, "tensorflow" in sys.modules)
    return real()

host_memory.keep_freed_host_memory = spy
"""


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_host_memory_is_set_before_any_thread_jax_or_tensorflow():
    """The training command imports JAX and TensorFlow, which start threads; the harness
    applies the malloc setting while the process still has its one thread."""
    code = SPY + (
        "try:\n"
        '    cli.main(["train", "--help"])\n'
        "finally:\n"
        '    print("after:", "jax" in sys.modules)\n'
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "at host memory: 1 False False" in result.stdout
    assert "--workdir" in result.stdout  # the command's own help came after
    assert "after: True" in result.stdout  # the command's own imports came after


def test_the_commands_tensorflow_is_quiet_and_loads_no_keras():
    """The harness sets TensorFlow's environment before anything imports it: tf.data works
    and Keras, which TensorFlow would otherwise import eagerly, is never loaded."""
    code = (
        "import os, sys\n"
        "from vit_jax import cli\n"
        "cli.tensorflow_environment()\n"
        "from vit_jax.data._tf import tf\n"
        "total = int(sum(tf.data.Dataset.range(4).as_numpy_iterator()))\n"
        "print(total, 'keras' in sys.modules, os.environ['TF_CPP_MIN_LOG_LEVEL'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["6", "False", "2"]


def test_plan_simulates_its_devices_in_its_own_process_without_starting_another():
    code = SPY + (
        "import subprocess\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError('the planner started a process')\n"
        "subprocess.Popen.__init__ = refuse\n"
        'status = cli.main(["plan", "--config=vit", "--devices", "4", "--mesh", "data=4",'
        ' "--config.batch_size=8", "--no-propose", "--config.model.depth=1",'
        ' "--config.model.width=32", "--config.model.mlp_dim=64",'
        ' "--config.model.num_heads=2", "--config.model.img_size=8"])\n'
        "import jax\n"
        "print('devices', jax.device_count())\n"
        "sys.exit(status)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "at host memory: 1 False False" in result.stdout
    assert "devices 4" in result.stdout
    plan = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert plan["devices"] == 4 and plan["mesh"] == {"data": 4, "fsdp": 1, "model": 1}


def test_every_command_module_has_the_harness_interface_and_no_other_entry():
    for name, module_name in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.parser) and callable(module.run), name
        assert module.parser().prog == f"python -m vit_jax {name}"
        assert not hasattr(module, "main"), f"{name}: the harness is the only entry point"


def test_an_unknown_command_and_a_bad_flag_are_one_line_and_status_2(capsys):
    assert cli.main(["tarin"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no command 'tarin'" in err and "train" in err
    with pytest.raises(SystemExit) as stop:
        cli.run("predict", ["--top_k", "3"])  # no images, no model
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "python -m vit_jax predict" in err


def test_a_user_error_is_one_line_and_verbose_shows_the_traceback(capsys, tmp_path):
    missing = str(tmp_path / "nope")
    assert cli.run("predict", ["--workdir", missing, "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    argv = ["--init_from", missing, "--model", "Ti/16", "--workdir", str(tmp_path / "w")]
    assert cli.run("transfer", argv) == 2
    assert "--init_from" in capsys.readouterr().err
    with pytest.raises(UserError, match="does not exist"):
        cli.run("transfer", [*argv, "--verbose"])


def test_a_program_too_large_for_the_device_is_one_line(capsys, monkeypatch, tmp_path):
    """XLA's RESOURCE_EXHAUSTED (here a real one: 4 TiB asked of the CPU) is the config's
    size, not a crash: one line that says what to lower; --verbose still shows it raised."""
    import jax
    import jax.numpy as jnp

    from vit_jax.commands import train

    def too_large(args, overrides):
        jax.jit(lambda: jnp.ones((1 << 40,), jnp.float32))().block_until_ready()

    monkeypatch.setattr(train, "run", too_large)
    assert cli.run("train", ["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: out of device memory (one allocation of 4096.0 GiB)"), err
    assert "config.batch_size" in err and "vit_jax plan" in err
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        cli.run("train", ["--workdir", str(tmp_path), "--verbose"])
    assert cli.out_of_memory(RuntimeError("Out of memory")) is None  # only XLA's own
