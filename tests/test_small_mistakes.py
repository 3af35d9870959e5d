"""Small things a user meets: the transfer sweep's dry run and tables, Ctrl-C before the
training loop, a timm comparison without timm."""

import importlib.util

from vit_jax import cli
from vit_jax.commands import transfer
from vit_jax.tools import step_benchmark


def test_results_tables_have_a_paper_column_only_when_asked(tmp_path):
    results = [transfer.TaskResult("folder:/x", 0.01, 0.5, float("nan"))]
    plain = transfer.write_tables(results, str(tmp_path), None)
    assert "paper" not in plain and "None" not in plain
    assert plain.splitlines()[0] == "| task | lr | val top-1 % | test top-1 % |"
    compared = transfer.write_tables(
        [transfer.TaskResult("cifar10", 0.01, 0.99, 0.99)], str(tmp_path), "i21k-l16"
    )
    assert "paper (i21k-l16) %" in compared and "99.15" in compared


def test_the_transfer_dry_run_lists_the_folders_the_runs_will_use(tmp_path, capsys):
    checkpoint = tmp_path / "w.npz"
    checkpoint.write_bytes(b"")
    argv = [f"--init_from={checkpoint}", "--model=Ti/16", f"--workdir={tmp_path / 'sweep'}"]
    assert cli.run("transfer", [*argv, "--tasks=cifar10", "--lrs=0.01,0.03", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}/sweep/cifar10/lr_0.01, {tmp_path}/sweep/cifar10/lr_0.03" in out
    assert "lr_0," not in out and not (tmp_path / "sweep").exists()


def test_ctrl_c_before_the_training_loop_is_one_line_and_status_130(monkeypatch, capsys):
    def interrupted(args, overrides):
        raise KeyboardInterrupt

    monkeypatch.setattr(transfer, "run", interrupted)
    assert cli.run("transfer", ["--init_from=x", "--model=Ti/16", "--workdir=w"]) == 130
    assert capsys.readouterr().err == "interrupted (Ctrl-C)\n"


def test_a_timm_comparison_without_timm_is_one_line(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a)
    )
    argv = ["step", "--model", "mu/4", "--img_size", "16", "--compare", "timm", "--rounds", "1"]
    assert cli.run("step_benchmark", argv) == 2
    err = capsys.readouterr().err
    assert err == "error: --compare timm needs timm installed (pip install torch timm), or " \
        "leave --compare out\n"  # fmt: skip
    assert step_benchmark.parser().prog == "python -m vit_jax step_benchmark"
