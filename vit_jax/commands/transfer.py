"""Transfer sweep: fine-tune one checkpoint on several datasets and tabulate the results.

`python -m vit_jax transfer --init_from=ViT-B_16.npz --model=B/16 --workdir=sweeps/b16`
fine-tunes on the paper's tasks (CIFAR-10/100, Pets, Flowers; `--tasks=vtab` for the 19
VTAB-1k tasks, `all` for both, or any presets separated by commas) with the `finetune`
recipe over a grid of learning rates. The lr is chosen on each task's validation split: for
VTAB, on the 800/200 split (`vtab/<task>/hparam`), then the chosen lr is trained again on all
1,000 examples (`vtab/<task>`) and evaluated on test, as in the paper. Results go to
`<workdir>/results.md` and `results.csv` (the layout of the paper's Table 2), next to the
paper's figures with `--paper`. Every run has its own workdir, so a stopped sweep resumes.
`--workdir` and `--init_from` may be bucket URLs (gs://...).
"""

from __future__ import annotations

import argparse
import csv
import io
from dataclasses import dataclass

from vit_jax import cli, config_loader, storage, validate
from vit_jax.data.presets import VTAB_TASKS
from vit_jax.errors import UserError

PAPER_TASKS = ("cifar10", "cifar100", "oxford_iiit_pet", "oxford_flowers102")
LEARNING_RATES = (0.001, 0.003, 0.01, 0.03)
# Top-1 (%) of the paper's Table 2 and of the original release's published results.
PAPER = {
    "jft-h14": {"cifar10": 99.50, "cifar100": 94.55, "oxford_iiit_pet": 97.56,
                "oxford_flowers102": 99.68, "vtab": 77.63},
    "jft-l16": {"cifar10": 99.42, "cifar100": 93.90, "oxford_iiit_pet": 97.32,
                "oxford_flowers102": 99.74, "vtab": 76.28},
    "i21k-l16": {"cifar10": 99.15, "cifar100": 93.25, "oxford_iiit_pet": 94.67,
                 "oxford_flowers102": 99.61, "vtab": 72.72},
    "i21k-b16": {"cifar10": 99.0, "cifar100": 92.1},
}  # fmt: skip


@dataclass
class TaskResult:
    task: str
    lr: float
    val_top1: float
    test_top1: float


def task_list(tasks: str) -> list[str]:
    """`paper`, `vtab`, `all`, or presets separated by commas."""
    vtab = [f"vtab/{t}" for t in VTAB_TASKS]
    named = {"paper": list(PAPER_TASKS), "vtab": vtab, "all": [*PAPER_TASKS, *vtab]}
    return named.get(tasks) or [t.strip() for t in tasks.split(",") if t.strip()]


def _config(args, dataset: str, lr: float, overrides: list[str]):
    spec = f"vit:{args.model},{dataset},{args.recipe}"
    extra = [f"init_from.path={args.init_from}", f"schedule.base_lr={lr}"]
    config = config_loader.load_config(spec, [*overrides, *extra])
    validate.check_config(config)
    if config.model.get("patch_sizes"):
        raise UserError(
            f"config.model.patch_sizes={tuple(config.model.patch_sizes)}: transfer selects "
            "the learning rate on one model's val/top1; fine-tune a FlexiViT with "
            "`python3 -m vit_jax train`, which evaluates every patch size"
        )
    if "val" not in config.data.evals:
        raise UserError(
            f"--tasks: {dataset} has no 'val' split to choose the learning rate on (its "
            f"splits: {', '.join(config.data.evals)}); use a preset or folder with one"
        )
    return config


def _workdir(args, dataset: str, lr: float) -> str:
    """`<workdir>/<dataset with / and : as _>/lr_<lr>`: a local path or a URL."""
    name = dataset.replace("/", "_").replace(":", "_")
    return storage.join(args.workdir, name, f"lr_{lr:g}")


def sweep_task(args, task: str, overrides: list[str]) -> TaskResult:
    """Fine-tunes `task` at every lr; the best on validation, evaluated on test."""
    from vit_jax.loop import run as train_fn

    is_vtab = task.startswith("vtab/")
    select = f"{task}/hparam" if is_vtab else task
    scores = {}
    for lr in args.lrs:
        results = train_fn(_config(args, select, lr, overrides), _workdir(args, select, lr))
        scores[lr] = results
    best = max(args.lrs, key=lambda lr: scores[lr].get("val/top1", float("-inf")))
    final = scores[best]
    if is_vtab:  # retrain on train800 + val200 with the chosen lr
        final = train_fn(_config(args, task, best, overrides), _workdir(args, task, best))
    return TaskResult(task, best, scores[best].get("val/top1", float("nan")),
                      final.get("test/top1", float("nan")))  # fmt: skip


def write_tables(results: list[TaskResult], workdir: str, paper: str | None) -> str:
    """results.csv and results.md in `workdir` (a folder or a bucket URL); returns the
    Markdown."""
    reference = PAPER.get(paper or "", {})
    rows = [(r.task, r.lr, 100 * r.val_top1, 100 * r.test_top1, reference.get(r.task))
            for r in results]  # fmt: skip
    vtab = [r for r in results if r.task.startswith("vtab/")]
    if len(vtab) == len(VTAB_TASKS):
        mean = 100 * sum(r.test_top1 for r in vtab) / len(vtab)
        rows.append(("VTAB-19 mean", None, None, mean, reference.get("vtab")))
    header = ["task", "lr", "val top-1 %", "test top-1 %", f"paper ({paper}) %"]
    if not paper:  # no row of the paper to compare with: no such column
        header, rows = header[:-1], [row[:-1] for row in rows]
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(header)
    writer.writerows(rows)
    storage.write_text(storage.join(workdir, "results.csv"), table.getvalue())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_cell(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    storage.write_text(storage.join(workdir, "results.md"), text)
    return text


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.2f}" if value >= 0.1 else f"{value:g}"


def check_init_from(path: str) -> None:
    """Raises a UserError unless the checkpoint (.npz or a run's folder) exists."""
    try:
        found = storage.exists(path)
    except Exception as e:  # noqa: BLE001 - a bucket that cannot be read: one line
        raise UserError(f"--init_from={path}: cannot read it ({type(e).__name__}: {e})") from e
    if not found:
        what = storage.missing(path)
        if what == "no such file or folder":
            raise UserError(f"--init_from={path} does not exist")
        raise UserError(f"--init_from={path} does not exist: {what}")


def _learning_rates(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--lrs={text} must be numbers separated by commas") from None
    if not values or min(values) <= 0:
        raise UserError(f"--lrs={text} must be positive")
    return values


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser("transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--init_from", required=True, help="the checkpoint: .npz or a run's dir")
    p.add_argument("--model", required=True, help="its model: a zoo name or size (B/16)")
    p.add_argument("--workdir", required=True, help="one sub-folder per task and lr")
    p.add_argument("--tasks", default="paper", help="paper, vtab, all, or presets a,b,c")
    p.add_argument("--recipe", default="finetune", help="finetune or finetune_short")
    p.add_argument("--lrs", default=",".join(map(str, LEARNING_RATES)), help="lr grid")
    p.add_argument("--paper", choices=sorted(PAPER), help="compare with the paper's row")
    p.add_argument("--dry_run", action="store_true", help="check every run's config, list them")
    p.add_argument("--verbose", action="store_true", help="tracebacks for every error")
    return p


TAKES_CONFIG = True


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    args.lrs = _learning_rates(args.lrs)
    tasks = task_list(args.tasks)
    check_init_from(args.init_from)
    for task in tasks:  # every config is checked before the first run starts
        for lr in args.lrs:
            select = f"{task}/hparam" if task.startswith("vtab/") else task
            _config(args, select, lr, overrides)
    if args.dry_run:
        for task in tasks:
            select = f"{task}/hparam" if task.startswith("vtab/") else task
            folders = ", ".join(_workdir(args, select, lr) for lr in args.lrs)
            print(f"{task}: lrs {', '.join(map(str, args.lrs))} -> {folders}")
        return 0
    storage.check_output(args.workdir, "--workdir", folder=True)
    results = []
    for task in tasks:
        results.append(sweep_task(args, task, overrides))
        table = write_tables(results, args.workdir, args.paper)
    print(table, end="")
    return 0
