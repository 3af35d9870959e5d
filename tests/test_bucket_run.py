"""A run whose workdir is a bucket, end to end against a GCS-protocol server on localhost:
SIGTERM and resume, kill -9 during an asynchronous save, and every way a bucket can fail
(missing, refusing writes, not answering, a save refused mid-run). Two processes writing one
run into a bucket: tests/test_launch.py.

The commands that are stopped or killed run as real processes from an empty folder, and the
same commands run again in the test's process from that folder, which must stay empty: every
file of the run is an object in the bucket.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gcsfs
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import STOPPED_RUN, free_port, tiny_config, tiny_flags
from test_cli import cli_env, failure

from vit_jax import cli, storage
from vit_jax.commands import visualize
from vit_jax.experiment import Experiment

TESTS = os.path.dirname(os.path.abspath(__file__))
# The tiny run: 6 steps, a checkpoint every 3, a log line every step.
FLAGS = tiny_flags(log_every_steps=1, eval_every_steps=6)


def main_command(workdir: str, *flags: str) -> list[str]:
    """`python -m vit_jax train --workdir=... <flags>`; `[4:]` are the command's arguments."""
    return [sys.executable, "-m", "vit_jax", "train", f"--workdir={workdir}", *flags]


def env_for(server, devices: int = 2, **more: str) -> dict:
    return {**cli_env(devices), **server.env, **more}


def saved_arrays(directory: str, step: int) -> list[np.ndarray]:
    state = ocp.StandardCheckpointer().restore(storage.join(directory, str(step), "state"))
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def logged_steps(text: str) -> list[int]:
    return [row["step"] for row in map(json.loads, text.splitlines()) if "train/loss" in row]


@pytest.mark.slow
def test_sigterm_in_a_bucket_exits_143_and_the_same_command_resumes_bit_identically(
    storage_server, bucket, tmp_path, monkeypatch, straight_long_run
):
    """STOPPED_RUN on 8 devices (as the straight_long_run fixture), its workdir a bucket: exit
    143 with the saved step named, and the same command resumes to the uninterrupted state."""
    workdir, empty = f"gs://{bucket}/run", tmp_path / "cwd"
    empty.mkdir()
    steps = STOPPED_RUN["total_steps"]
    command = main_command(workdir, *tiny_flags(**STOPPED_RUN))
    proc = subprocess.Popen(
        command, cwd=empty, env=env_for(storage_server, devices=8), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stdout:  # trains (and logs) a few steps first
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 143, failure(stderr)
    assert f"in {workdir}/checkpoints" in stderr and "run the same command again" in stderr
    objects = storage_server.objects(bucket)
    stopped = sorted({int(n.split("/")[2]) for n in objects if n.startswith("run/checkpoints/")})
    assert len(stopped) == 1 and 3 <= stopped[0] < steps
    assert f"stopped by SIGTERM: saved the checkpoint of step {stopped[0]}" in stderr

    # The same command again, in this process (pointed at the same server), from the folder.
    monkeypatch.chdir(empty)
    assert cli.run("train", command[4:]) == 0
    monkeypatch.undo()
    assert list(empty.iterdir()) == []  # nothing local: no `gs:` folder
    objects = storage_server.objects(bucket)
    for name in (
        "run/config.json",
        "run/metrics.jsonl",
        f"run/checkpoints/{steps}/state/_METADATA",
    ):
        assert name in objects
    assert sum(n.startswith("run/tensorboard/events.out.tfevents.") for n in objects) == 2
    logged = logged_steps(storage.read_text(f"{workdir}/metrics.jsonl"))
    assert logged == list(range(1, steps + 1))  # each step logged once across both sessions
    assert_same(
        saved_arrays(f"{workdir}/checkpoints", steps),
        saved_arrays(os.path.join(straight_long_run, "checkpoints"), steps),
    )


KILL_DURING_SAVE = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity

def killing(finalize):
    async def finalize_then_die(self):  # the data of step 6 is written, the commit is not
        if self.get_final().name == "6":
            os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self)
    return finalize_then_die

for kind in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
    kind.finalize = killing(kind.finalize)
from vit_jax import cli
sys.exit(cli.run("train", sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_during_a_save_to_the_bucket_never_reads_the_half_written_step(
    storage_server, bucket, tmp_path, monkeypatch, caplog
):
    """Resumes from step 3; that a resume is bit-identical is the SIGTERM test's check."""
    workdir = f"gs://{bucket}/run"
    empty = tmp_path / "cwd"
    empty.mkdir()
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, *main_command(workdir, *FLAGS)[4:]],
        cwd=empty, env=env_for(storage_server, devices=8), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, failure(killed.stderr)
    half = [n for n in storage_server.objects(bucket) if n.startswith("run/checkpoints/6/")]
    assert half and "run/checkpoints/6/commit_success.txt" not in half  # data, no commit

    # The same command again, in this process (8 devices too), from the same empty folder.
    monkeypatch.chdir(empty)
    log = logging.getLogger("vit_jax")  # the progress messages, which do not propagate
    log.addHandler(caplog.handler)
    try:
        assert cli.run("train", main_command(workdir, *FLAGS)[4:]) == 0
    finally:
        log.removeHandler(caplog.handler)
        monkeypatch.undo()
    assert "resumed from step 3" in caplog.text
    assert list(empty.iterdir()) == []
    # Steps 4-6 ran twice; metrics.jsonl holds each once, in order: `visualize curves` draws
    # one line per metric, not one that doubles back.
    assert logged_steps(storage.read_text(f"{workdir}/metrics.jsonl")) == [1, 2, 3, 4, 5, 6]
    records = visualize.read_metrics(workdir)
    for key in ("train/loss", "train/learning_rate"):
        steps = [r["step"] for r in records if key in r]
        assert steps == sorted(set(steps)) and len(steps) == 6
    visualize.draw_curves(workdir, f"{workdir}/pictures/curves.png", records)
    assert "run/pictures/curves.png" in storage_server.objects(bucket)

    # config.init_from.path takes the run in the bucket (its directory, as --workdir does).
    config = tiny_config("schedule.warmup_steps=1", f"init_from.path={workdir}")
    params = Experiment.from_config(config).initial_params()
    saved = ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/6/state")["params"]
    assert_same(
        [np.asarray(x) for x in jax.tree.leaves(params)],
        [np.asarray(x) for x in jax.tree.leaves(saved)],
    )


# --- a bucket that fails -------------------------------------------------------------------


class QuietServer(ThreadingHTTPServer):
    """Says nothing when a client hangs up mid-answer (the command shares this process's
    stderr, which the tests read)."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class RefusingProxy:
    """An HTTP proxy in front of the storage server that answers 403 to every write whose
    URL contains one of `refused` (a bucket without write access, or one path of it)."""

    def __init__(self, upstream_port: int, refused: tuple[str, ...]):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # tensorstore's client expects it

            def log_message(self, *args):
                pass

            def _relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                writes = self.command in ("POST", "PUT", "PATCH", "DELETE")
                if writes and any(part in self.path for part in proxy.refused):
                    message = json.dumps({"error": {"code": 403, "message": "Forbidden"}})
                    self.send_response(403)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message.encode())
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                content = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)
                upstream.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay  # noqa: N815

        self.refused = refused
        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url}

    def close(self) -> None:
        self.server.shutdown()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, failure(result.stderr)
    # tensorstore notes the test token (GOOGLE_AUTH_TOKEN_FOR_TESTING) once; it is not ours.
    lines = [line for line in result.stderr.strip().splitlines() if "FOR_TESTING" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_refusing_or_silent_bucket_is_one_line_before_anything_runs(
    storage_server, bucket, tmp_path, monkeypatch, capsys
):
    """`--dry_run` checks the bucket for real (in this process: no start-up cost)."""
    monkeypatch.chdir(tmp_path)

    def dry_run(workdir: str, **env: str) -> tuple[int, str]:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        gcsfs.GCSFileSystem.clear_instance_cache()  # a client made for another endpoint
        status = cli.run("train", main_command(workdir, *FLAGS, "--dry_run")[4:])
        return status, capsys.readouterr().err

    def assert_refused(result: tuple[int, str], *fragments: str) -> None:
        status, stderr = result
        assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert all(fragment in stderr for fragment in ("error: ", *fragments)), stderr

    assert dry_run(f"gs://{bucket}/run")[0] == 0
    assert storage_server.objects(bucket) == []  # the marker was written and deleted
    assert_refused(dry_run("gs://no-such-bucket/run"), "gs://no-such-bucket/run", "not exist")
    proxy = RefusingProxy(storage_server.port, refused=(f"/b/{bucket}/",))
    try:
        assert_refused(dry_run(f"gs://{bucket}/run", **proxy.env()), "was refused")
    finally:
        proxy.close()
    silent = f"http://127.0.0.1:{free_port()}"
    assert_refused(
        dry_run(f"gs://{bucket}/run", STORAGE_EMULATOR_HOST=silent),
        f"gs://{bucket}/run",
        "does not answer",
    )
    monkeypatch.undo()
    gcsfs.GCSFileSystem.clear_instance_cache()
    assert list(tmp_path.iterdir()) == []


def test_a_save_refused_mid_run_keeps_the_last_checkpoint_and_says_so(
    storage_server, bucket, tmp_path, monkeypatch, capsys
):
    """The command in this process (8 devices: the kill -9 test's program), its storage
    clients pointed at a proxy that refuses the writes of step 6."""
    proxy = RefusingProxy(
        storage_server.port, refused=("run%2Fcheckpoints%2F6", "run/checkpoints/6")
    )
    monkeypatch.chdir(tmp_path)
    for key, value in proxy.env().items():
        monkeypatch.setenv(key, value)
    gcsfs.GCSFileSystem.clear_instance_cache()  # a client made for another endpoint
    capsys.readouterr()
    try:
        argv = main_command(f"gs://{bucket}/run", *FLAGS, "--config.checkpoint.async_save=false")
        status = cli.run("train", argv[4:])
    finally:
        monkeypatch.undo()
        gcsfs.GCSFileSystem.clear_instance_cache()
        proxy.close()
    stderr = capsys.readouterr().err
    assert_one_line_error(
        subprocess.CompletedProcess(argv, status, "", stderr),
        "could not save the checkpoint of step 6",
        "the checkpoint of step 3 is kept",
    )
    assert "run/checkpoints/3/state/_METADATA" in storage_server.objects(bucket)
    assert list(tmp_path.iterdir()) == []
