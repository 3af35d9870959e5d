"""launch/: the local, Cloud TPU VM, SLURM and GKE launchers run the same vit_jax train
command.

Dry runs are checked line by line (the SLURM job is executed with stand-in srun, scontrol and
python; the GKE manifest is parsed and applied with a stand-in kubectl); a real two-process
run on localhost (into a bucket on the local storage server) logs the same losses and few-shot
accuracies as one process with as many devices.
"""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys

import pytest
import yaml

from tests.helpers import subprocess_env, tiny_flags
from vit_jax import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
USER_FLAGS = ["--config=vit:B/16,imagenet2012,pretrain", "--workdir=/ckpt/b16"]
MAIN = "python3 -m vit_jax train " + " ".join(USER_FLAGS)


def launch(script, *args, env=None, timeout=60):
    return subprocess.run(
        [os.path.join(LAUNCH, script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def dry_run(script, *options):
    result = launch(script, *options, "--dry-run", "--", *USER_FLAGS)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def fake_bin(tmp_path, name, body):
    """An executable stand-in for a cluster command."""
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("script", ["local.sh", "tpu_vm.sh", "slurm.sh", "gke.sh"])
def test_scripts_are_executable_and_documented(script):
    path = os.path.join(LAUNCH, script)
    assert os.stat(path).st_mode & stat.S_IXUSR
    result = launch(script, "--help")
    assert result.returncode == 0 and "--dry-run" in result.stdout and " -- " in result.stdout
    bad = launch(script, "--no-such-option")
    assert bad.returncode == 2 and "unknown option '--no-such-option'" in bad.stderr


def test_local_dry_run_lists_every_process():
    lines = dry_run(
        "local.sh",
        "--processes",
        "3",
        "--devices-per-process",
        "2",
        "--port",
        "4321",
        "--log-dir",
        "/tmp/logs",
    )
    assert lines[0] == "mkdir -p /tmp/logs" and len(lines) == 4
    ids = []
    for line in lines[1:]:
        assert line.startswith(MAIN + " ")
        words = shlex.split(line)
        assert "--local_device_count=2" in words and "--num_processes=3" in words
        assert "--coordinator_address=127.0.0.1:4321" in words
        ids.append(int(next(w for w in words if w.startswith("--process_id="))[13:]))
        if ids[-1]:  # The others log to files in the background; process 0 is in front.
            assert line.endswith(f"> /tmp/logs/process_{ids[-1]}.log 2>&1 &")
    assert ids == [1, 2, 0]
    assert dry_run("local.sh") == [MAIN]  # One process: the command alone.


def test_local_stops_the_others_when_one_fails(tmp_path):
    # Process 1 fails at once; process 0 would run for a minute.
    python = fake_bin(
        tmp_path,
        "python",
        'if [[ " $* " == *" --process_id=1 "* ]]; then echo broken >&2; exit 3; fi\nsleep 60\n',
    )
    result = launch(
        "local.sh",
        "--processes",
        "2",
        "--python",
        str(python),
        "--log-dir",
        str(tmp_path / "logs"),
        "--",
        "--workdir=/x",
        timeout=30,
    )
    assert result.returncode == 3
    assert "process 1 exited" in result.stderr and "stopping the others" in result.stderr
    assert (tmp_path / "logs" / "process_1.log").read_text() == "broken\n"


def test_tpu_vm_dry_run_creates_installs_runs_streams_and_deletes():
    lines = dry_run(
        "tpu_vm.sh",
        "--name",
        "pod",
        "--zone",
        "us-central2-b",
        "--project",
        "proj",
        "--accelerator-type",
        "v4-64",
        "--delete",
    )
    commands = [shlex.split(line) for line in lines]
    where = ["--zone=us-central2-b", "--project=proj"]
    describe, create = lines[0].split(" > /dev/null 2>&1 || ")
    assert shlex.split(describe) == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "describe",
        "pod",
        *where,
    ]
    assert shlex.split(create) == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "pod", *where,
        "--accelerator-type=v4-64", "--version=tpu-ubuntu2204-base",
    ]  # fmt: skip
    assert "git -C" in lines[1] and "ls-files" in lines[1]
    scp, install, start, follow, delete = commands[2:]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    for cmd in (install, start):
        assert cmd[4:6] == ["ssh", "pod"] and "--worker=all" in cmd
    # The `tpu` extra of setup.py (jax with libtpu in the package's jax range), not an
    # unpinned jax[tpu].
    assert install[-1].endswith('pip install -q -e "$HOME/vit_jax[tpu]"')
    assert install[-1].count("pip install") == 1
    assert start[-1].startswith("--command=") and MAIN + " --distributed" in start[-1]
    assert "--worker=0" in follow and "tail" in follow[-1]
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", *where, "--quiet"]


def test_tpu_vm_reuses_or_creates_the_slice_through_gcloud(tmp_path):
    calls = tmp_path / "calls.jsonl"
    fake_bin(
        tmp_path,
        "gcloud",
        f'python3 -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" >> {calls}\n'
        'if [[ $4 == describe ]]; then exit "$DESCRIBE_STATUS"; fi\n',
    )
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    for missing in (True, False):
        calls.write_text("")
        result = launch(
            "tpu_vm.sh",
            "--name",
            "pod",
            "--zone",
            "z",
            "--no-install",
            "--",
            *USER_FLAGS,
            env={**env, "DESCRIBE_STATUS": "1" if missing else "0"},
        )
        assert result.returncode == 0, result.stderr
        verbs = [json.loads(line)[2:4] for line in calls.read_text().splitlines()]
        created = [["tpu-vm", "create"]] if missing else []
        assert verbs == [["tpu-vm", "describe"], *created, ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]


def test_tpu_vm_dry_run_creates_several_slices_as_one_queued_resource():
    lines = dry_run(
        "tpu_vm.sh", "--name", "pod", "--zone", "z", "--project", "proj",
        "--accelerator-type", "v5p-256", "--slices", "3", "--spot", "--delete",
    )  # fmt: skip
    where = ["--zone=z", "--project=proj"]
    queued = ["gcloud", "compute", "tpus", "queued-resources"]
    describe, create = lines[0].split(" > /dev/null 2>&1 || ")
    assert shlex.split(describe) == [*queued, "describe", "pod", *where]
    assert shlex.split(create) == [
        *queued, "create", "pod", "--node-count=3", "--node-prefix=pod",
        "--accelerator-type=v5p-256", "--runtime-version=tpu-ubuntu2204-base", *where, "--spot",
    ]  # fmt: skip
    # It waits for the queued resource to be ACTIVE (and gives up when it failed).
    assert lines[1].startswith("until s=$(") and "ACTIVE" in lines[1] and "FAILED" in lines[1]
    commands = [shlex.split(line) for line in lines[3:]]
    nodes = ["pod-0", "pod-1", "pod-2"]
    scp, install, start = commands[:3], commands[3:6], commands[6:9]
    assert [c[4:6] for c in scp] == [["scp", "/tmp/vit_jax-pod.tar.gz"]] * 3
    assert [c[6] for c in scp] == [f"{n}:vit_jax.tar.gz" for n in nodes]
    for step in (install, start):
        assert [c[4:6] for c in step] == [["ssh", n] for n in nodes]
        assert all("--worker=all" in c for c in step)
    assert all(c[-1].endswith('pip install -q -e "$HOME/vit_jax[tpu]"') for c in install)
    assert all(MAIN + " --distributed" in c[-1] for c in start)
    follow, delete = commands[9:]
    assert follow[4:6] == ["ssh", "pod-0"] and "--worker=0" in follow  # process 0
    assert delete == [*queued, "delete", "pod", *where, "--force", "--quiet"]
    assert len(commands) == 11


def test_tpu_vm_waits_for_the_queued_resource_then_runs_every_slice(tmp_path):
    calls = tmp_path / "calls.jsonl"
    fake_bin(
        tmp_path,
        "gcloud",
        f'python3 -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" >> {calls}\n'
        'if [[ $4 == describe && " $* " == *" --format=value(state.state) "* ]]; then\n'
        "  n=$(grep -c state.state " + str(calls) + ")\n"
        "  if ((n < 2)); then echo WAITING_FOR_RESOURCES; else echo ACTIVE; fi; exit 0\n"
        "fi\n"
        "if [[ $4 == describe ]]; then exit 1; fi\n",
    )
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    script = tmp_path / "tpu_vm.sh"  # the same script, polling every second instead of 30
    script.write_text(open(os.path.join(LAUNCH, "tpu_vm.sh")).read().replace("sleep 30", "sleep 1"))
    script.chmod(0o755)
    (tmp_path / "common.sh").write_text(open(os.path.join(LAUNCH, "common.sh")).read())
    result = subprocess.run(
        [str(script), "--name", "pod", "--zone", "z", "--slices", "2", "--no-install", "--delete",
         "--", *USER_FLAGS],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [c[2:5] for c in calls] == [
        ["queued-resources", "describe", "pod"],
        ["queued-resources", "create", "pod"],
        ["queued-resources", "describe", "pod"],  # waiting
        ["queued-resources", "describe", "pod"],  # active
        ["tpu-vm", "ssh", "pod-0"],
        ["tpu-vm", "ssh", "pod-1"],
        ["tpu-vm", "ssh", "pod-0"],  # follows process 0
        ["queued-resources", "delete", "pod"],
    ]
    assert "--node-count=2" in calls[1]


@pytest.mark.parametrize("per_node, processes", [(False, 16), (True, 4)])
def test_slurm_job_gives_each_process_its_id(tmp_path, per_node, processes):
    options = [
        "--nodes",
        "4",
        "--gpus-per-node",
        "4",
        "--partition",
        "gpu",
        "--time",
        "2:00:00",
        "--account",
        "acct",
        "--script",
        str(tmp_path / "job.sbatch"),
    ]
    options += ["--per-node"] if per_node else []
    lines = dry_run("slurm.sh", *options, "--python", str(tmp_path / "bin" / "python3"))
    assert lines[0] == f"cat > {tmp_path / 'job.sbatch'} <<'SBATCH'"
    assert lines[-2:] == ["SBATCH", f"sbatch {tmp_path / 'job.sbatch'}"]
    for header in (
        "--nodes=4",
        "--partition=gpu",
        "--time=2:00:00",
        "--account=acct",
        f"--ntasks-per-node={1 if per_node else 4}",
    ):
        assert f"#SBATCH {header}" in lines
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert "-m vit_jax train " + " ".join(USER_FLAGS) + " --coordinator_address=" in srun
    # Execute the pasted commands with stand-ins: srun starts every task with its SLURM_PROCID.
    fake_bin(
        tmp_path, "python3", 'python -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@"\n'
    )
    fake_bin(tmp_path, "python", f'exec {sys.executable} "$@"\n')
    fake_bin(tmp_path, "scontrol", 'echo "gpu-a"; echo "gpu-b"; echo "gpu-c"; echo "gpu-d"\n')
    fake_bin(tmp_path, "sbatch", 'SLURM_JOB_NODELIST="gpu-[a-d]" bash "$1"\n')
    fake_bin(
        tmp_path,
        "srun",
        "while [[ $1 == --* ]]; do shift; done\n"
        f'for ((i = 0; i < {processes}; i++)); do SLURM_PROCID=$i "$@"; done\n',
    )
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-c", "\n".join(lines)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    runs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r[:5] for r in runs] == [["-m", "vit_jax", "train", *USER_FLAGS]] * processes
    assert {tuple(r[5:]) for r in runs} == {
        ("--coordinator_address=gpu-a:12355", f"--num_processes={processes}", f"--process_id={i}")
        for i in range(processes)
    }


def test_slurm_auto_passes_distributed():
    (srun,) = [line for line in dry_run("slurm.sh", "--auto") if line.startswith("srun ")]
    assert f"exec {MAIN} --distributed'" in srun and "--process_id" not in srun


@pytest.mark.parametrize("extra", ["cuda12", "cuda13", "none"])
def test_slurm_installs_through_the_cuda_extra_when_asked(tmp_path, extra):
    options = ["--setup", "source ~/venv/bin/activate", "--source", "/src/vit jax"]
    lines = dry_run("slurm.sh", *options, "--install", extra)
    installs = [line for line in lines if "pip install" in line]
    if extra == "none":  # the default: the job script as without the option
        assert installs == [] and lines == dry_run("slurm.sh", *options)
        return
    (install,) = installs
    assert shlex.split(install) == [
        "python3",
        "-m",
        "pip",
        "install",
        "-q",
        "-e",
        f"/src/vit jax[{extra}]",
    ]
    # After the environment is set up, before any process starts.
    assert lines.index("source ~/venv/bin/activate") < lines.index(install)
    assert lines.index(install) < next(
        i for i, line in enumerate(lines) if line.startswith("srun ")
    )


def test_slurm_rejects_an_unknown_install_extra():
    result = launch("slurm.sh", "--install", "cuda11", "--", *USER_FLAGS)
    assert result.returncode == 2
    assert result.stderr == "slurm.sh: --install must be cuda12, cuda13 or none, got 'cuda11'\n"
    assert "--install" in launch("slurm.sh", "--help").stdout


# Flags that only survive if every layer quotes them: a space, both quotes, a shell word.
ODD_FLAGS = [*USER_FLAGS, '--config.note=it\'s a "b16" run', "--config.x=$HOME; rm -rf /"]
GKE = ["--image", "us-docker.pkg.dev/p/vit/vit_jax:1", "--name", "b16", "--namespace", "ml"]


def gke_manifest(lines, path):
    """The manifest written by the dry run's pasteable commands, parsed."""
    assert lines[0] == f"cat > {path} <<'YAML'"
    assert lines[-2:] == ["YAML", f"kubectl apply -f {path}"]
    return yaml.safe_load("\n".join(lines[1:-2]))


@pytest.mark.parametrize(
    "tpu_type, topology, slices, hosts, chips, accelerator",
    [
        ("v5p-256", "4x4x8", 2, 32, 4, "tpu-v5p-slice"),
        ("v4-64", "2x4x4", 3, 8, 4, "tpu-v4-podslice"),
        ("v5litepod-16", "4x4", 1, 4, 4, "tpu-v5-lite-podslice"),
        ("v6e-8", "2x4", 2, 1, 8, "tpu-v6e-slice"),
    ],
)
def test_gke_manifest_is_a_jobset_of_one_job_per_slice(
    tpu_type, topology, slices, hosts, chips, accelerator
):
    options = [*GKE, "--tpu-type", tpu_type, "--topology", topology, "--slices", str(slices)]
    result = launch(
        "gke.sh", *options, "--manifest", "/tmp/b16.yaml", "--dry-run", "--", *ODD_FLAGS
    )
    assert result.returncode == 0, result.stderr
    jobset = gke_manifest(result.stdout.splitlines(), "/tmp/b16.yaml")
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    assert jobset["metadata"]["name"] == "b16" and jobset["metadata"]["namespace"] == "ml"
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated["replicas"] == slices
    job = replicated["template"]["spec"]
    assert job["parallelism"] == job["completions"] == hosts
    assert job["completionMode"] == "Indexed"
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": accelerator,
        "cloud.google.com/gke-tpu-topology": topology,
    }
    (container,) = pod["containers"]
    assert container["image"] == "us-docker.pkg.dev/p/vit/vit_jax:1"
    assert container["command"] == [
        "python3",
        "-m",
        "vit_jax",
        "train",
        *ODD_FLAGS,
        "--distributed",
    ]
    for limits in ("requests", "limits"):
        assert container["resources"][limits] == {"google.com/tpu": chips}
    assert "env" not in container  # left to the JobSet and GKE
    # The comment shows the same command, shell-quoted: a shell splits it back into the flags.
    (shown,) = [line for line in result.stdout.splitlines() if line.startswith("# Each pod runs: ")]
    assert shlex.split(shown.removeprefix("# Each pod runs: ")) == container["command"]


def test_gke_applies_the_manifest_it_writes_with_kubectl(tmp_path):
    calls = tmp_path / "calls.jsonl"
    fake_bin(
        tmp_path,
        "kubectl",
        f'python3 -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" >> {calls}\n'
        f'cp "$3" {tmp_path / "applied.yaml"}\n',
    )
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    options = [*GKE, "--tpu-type", "v4-64", "--topology", "2x4x4", "--slices", "2"]
    path = tmp_path / "job s" / "b16.yaml"
    path.parent.mkdir()
    result = launch("gke.sh", *options, "--manifest", str(path), "--", *ODD_FLAGS, env=env)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [
        ["apply", "-f", str(path)]
    ]
    applied = (tmp_path / "applied.yaml").read_text()
    assert applied == path.read_text()
    dry = launch("gke.sh", *options, "--manifest", str(path), "--dry-run", "--", *ODD_FLAGS)
    assert yaml.safe_load(applied) == gke_manifest(dry.stdout.splitlines(), shlex.quote(str(path)))
    assert "kubectl logs -n ml -f -l" in result.stderr
    # The dry run ran nothing.
    assert len(calls.read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "options, message",
    [
        (["--topology", "2x4x2"], "gke.sh: --topology 2x4x2 has 16 chips, but v4-64 has 32"),
        (["--topology", "2x4x4", "--hosts-per-slice", "3"], "does not divide the 32 chips"),
        (["--topology", "2x4x4", "--slices", "0"], "--slices must be a positive integer"),
        (["--topology", "2x4x4", "--name", "B_16"], "--name must be lowercase"),
        (["--topology", "2x4x4", "--tpu-type", "v3-8"], "--tpu-type must be v4-N"),
        (["--topology", "2x4x4", "--image"], "--image needs a value"),
    ],
)
def test_gke_mistakes_end_in_one_line(tmp_path, options, message):
    manifest = tmp_path / "b16.yaml"
    result = launch(
        "gke.sh", "--image", "i", "--tpu-type", "v4-64", "--manifest", str(manifest), *options,
        "--", *USER_FLAGS,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not manifest.exists()


def test_gke_help_lists_the_options():
    help_text = launch("gke.sh", "--help").stdout
    for option in ("--slices", "--tpu-type", "--topology", "--image", "--hosts-per-slice",
                   "--name", "--namespace", "--manifest", "--dry-run"):  # fmt: skip
        assert f"  {option} " in help_text


# Three steps of the tiny run, a log line each, with the few-shot evaluation every step. The
# same 32 examples every step, preprocessed without randomness: the global batch is then the
# same however the processes split it. The learning rate of the first update is 0 (warmup from
# 0), so the few-shot accuracies of step 1 are those of the initial parameters in both runs:
# any difference comes from how the examples are gathered, ordered and sampled.
TWO_PROCESS_FLAGS = tiny_flags(
    "data.train.split=train[:32]",
    "data.train.pp=decode(3)|resize({image_size})|value_range(-1, 1)|onehot({num_classes})",
    **{
        "model.depth": 1,
        "total_steps": 3,
        "log_every_steps": 1,
        "eval_every_steps": 3,
        "checkpoint.every_steps": 3,
        "schedule.warmup_steps": 1,
        "fewshot.datasets": "digits",
        "fewshot.shots": (1, 5),
        "fewshot.every_steps": 1,
        # A bounded pass: 3 global batches (384 examples) are read and 300 of them kept.
        "fewshot.max_train_examples": 300,
    },
)
DIGITS_TEST_EXAMPLES = 355  # odd: the two processes get 178 and 177


def start_local(tmp_path, name, workdir, processes, devices, mesh):
    env = subprocess_env()
    command = [
        os.path.join(LAUNCH, "local.sh"),
        f"--processes={processes}",
        f"--devices-per-process={devices}",
        f"--log-dir={tmp_path / f'{name}_logs'}",
        "--",
        f"--workdir={workdir}",
        *TWO_PROCESS_FLAGS,
        *(f"--config.mesh.{axis}" for axis in mesh),
    ]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: stopped with its children
    )  # fmt: skip


def finished(run):
    out, err = run.communicate(timeout=400)
    assert run.returncode == 0, err[-3000:]
    assert "final evaluation" in out  # process 0 prints to the terminal
    return out


@pytest.mark.slow
def test_two_local_processes_equal_one_with_as_many_devices_and_share_a_bucket_run(
    tmp_path, storage_server, bucket
):
    """2 processes x 2 devices (into a bucket) and 1 x 4 (on disk), run at the same time: the
    same losses, gradient norms, few-shot accuracies and test counts; each process writes its
    own shards of the checkpoint, process 0 alone the logs. The two processes are also two
    slices (devices without a TPU slice index are grouped by process): data parallel across
    them (`dcn_data=2`) and FSDP inside each, against `data=2, fsdp=2` in one process."""
    url = f"gs://{bucket}/run"
    slices, one = ["dcn_data=2", "fsdp=2", "data=1"], ["data=2", "fsdp=2"]
    runs = {
        "two": start_local(tmp_path, "two", url, processes=2, devices=2, mesh=slices),
        "one": start_local(tmp_path, "one", tmp_path / "one", processes=1, devices=4, mesh=one),
    }
    try:
        for run in runs.values():
            finished(run)
    finally:
        for run in runs.values():
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    two = [json.loads(line) for line in storage.read_text(f"{url}/metrics.jsonl").splitlines()]
    one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]

    def values(records, key, step=None):
        return [r[key] for r in records if key in r and step in (None, r["step"])]

    losses = values(two, "train/loss")
    assert len(losses) == 3 and losses[-1] < losses[0]  # it trains
    assert losses == pytest.approx(values(one, "train/loss"), rel=1e-5)
    grad_norms = values(two, "train/grad_norm")
    assert len(grad_norms) == 3 and grad_norms == pytest.approx(
        values(one, "train/grad_norm"), rel=1e-5
    )
    for key in ("fewshot/digits_1shot", "fewshot/digits_5shot"):
        assert values(two, key, step=1) == values(one, key, step=1)
    # Features line up with their labels: far above chance (0.1) even for random weights.
    assert values(two, "fewshot/digits_5shot", step=1)[0] > 0.3
    # The uneven test split counts each example once.
    assert values(two, "test/count") == values(one, "test/count") == [DIGITS_TEST_EXAMPLES]
    # After training, the parameters agree to float rounding: one example may flip, no more.
    assert values(two, "test/top1") == pytest.approx(
        values(one, "test/top1"), abs=1.5 / DIGITS_TEST_EXAMPLES
    )

    objects = storage_server.objects(bucket, "run/")
    for process in (0, 1):  # each process wrote its own shards of the state
        assert any(f"/state/ocdbt.process_{process}/" in n for n in objects if "/3/" in n)
    assert sum("tensorboard/events" in n for n in objects) == 1  # written once, by process 0
    other = (tmp_path / "two_logs" / "process_1.log").read_text()
    assert other and "step 3/3" not in other  # only process 0 reports
