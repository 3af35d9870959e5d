"""The training loop: state, steps, evaluation, checkpoints and metrics for one run.

`run(config, workdir)` resumes from the newest complete checkpoint in `workdir`, otherwise
starts from `config.init_from` (a released `.npz` or another run's directory) or
from scratch. The checkpoint holds the step, which is also the data position. A run already
at its last step only says so and returns its final evaluation from `metrics.jsonl`.

Failure behaviour (README "Failure behaviour"): SIGTERM/SIGINT save a checkpoint at the
current step and raise `Preempted` (a SystemExit with status 128 + signal number); a
workdir without room for one checkpoint is refused before training; a NaN/Inf step stops
the run (`on_nonfinite="stop"`) or is skipped (`"skip"`, up to `max_consecutive_skips` in
a row); no bad state is ever saved over a good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import data, evaluate, sharding, storage
from vit_jax.checkpoint import Checkpointer
from vit_jax.checkpoint.manager import RESUME_STEP, check_room
from vit_jax.data import pipeline
from vit_jax.errors import UserError
from vit_jax.experiment import CLASS_NAMES_FILE, Experiment
from vit_jax.metric_logging import MetricLogger, Progress, format_line, peak_flops, rows_up_to
from vit_jax.preemption import Preempted, StopSignals
from vit_jax.steps import nonfinite_policy

log = logging.getLogger("vit_jax")

__all__ = ["NonFiniteLossError", "Preempted", "TooManySkippedStepsError", "run"]


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class TooManySkippedStepsError(UserError, RuntimeError):
    """`config.max_consecutive_skips` steps in a row were not finite and were skipped."""


def run(
    config: ml_collections.ConfigDict, workdir: str, *, stop_after_step: int | None = None
) -> dict[str, float]:
    """Trains and evaluates; returns the last evaluation metrics.

    `stop_after_step` ends the run early, after saving a checkpoint at that step, as a
    preemption would; running again resumes from there. SIGTERM/SIGINT received from here
    on stop the run after the next step with a checkpoint (`Preempted`).
    """
    with StopSignals() as signals:
        return _run(config, workdir, stop_after_step, signals)


def _run(config, workdir: str, stop_after_step: int | None, signals: StopSignals) -> dict:
    policy = nonfinite_policy(config)
    storage.make_dirs(workdir)
    experiment = Experiment.from_config(config)
    mesh, steps = experiment.mesh, experiment.total_steps
    checkpointer = Checkpointer(
        storage.join(workdir, "checkpoints"),
        every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep,
        keep_every=config.checkpoint.keep_every,
        async_save=config.checkpoint.async_save,
    )
    finished = finished_results(config, workdir, checkpointer, steps)
    if finished is not None:
        checkpointer.close()
        return finished
    if jax.process_index() == 0:  # the class names travel with the run (predict, export)
        save_class_names(workdir, config.data, experiment.num_classes)
    check_room(checkpointer.directory, experiment.abstract_state)
    state = initial_state(experiment, checkpointer)
    start_step = int(jax.device_get(state["step"]))
    logger = MetricLogger(workdir, is_main=jax.process_index() == 0, start_step=start_step)
    logger.record_config(config)
    # One compiled step per patch size of a FlexiViT (config.model.patch_sizes), else one.
    train_steps, flops = experiment.compile_train_steps(), experiment.step_flops()
    if experiment.teacher is not None:  # config.distill: its parameters go into every step
        train_steps = {size: experiment.teacher.bind(s) for size, s in train_steps.items()}
    peak = peak_flops(jax.devices()[0], config.peak_flops_per_device)
    progress = Progress(
        total_steps=steps,
        start_step=start_step,
        batch_size=config.batch_size,
        flops_per_step=flops,
        peak_flops_total=peak * jax.device_count() if peak else None,
    )
    batches = data.prefetch_to_device(
        data.train_batches(
            config.data,
            global_batch_size=config.batch_size,
            seed=config.seed,
            start_step=start_step,
        ),
        sharding.batch_sharding(mesh),
    )
    evaluator = evaluate.Evaluator(experiment.steps, logger, total_steps=steps)
    profiler = StepProfiler(workdir, config.profile, enabled=logger.is_main)
    skips = SkipCounter(config.max_consecutive_skips) if policy == "skip" else None
    bad_images = pipeline.num_bad_examples(config.data, "train")
    finite, good_step, results, stopped, stats = jnp.array(True), start_step, {}, None, None
    try:
        for step in range(start_step + 1, steps + 1):
            with profiler.step(step):
                batch = progress.next_batch(batches, stats)  # times the device's input wait
                train_step = train_steps[experiment.patch_size_at(step)]
                state, stats = train_step(state, batch)
            step_finite = stats.pop("finite")
            if skips is None:
                finite = finite & step_finite
            else:  # a non-finite step was skipped: the state stays finite
                skips.update(step, stats.pop("skipped"), checkpointer)
            stopped = signals.stop_requested(step)
            end = step in (steps, stop_after_step)
            last = end or stopped is not None
            log_now = due(step, config.log_every_steps, last)
            save_now = due(step, config.checkpoint.every_steps, last)
            if log_now or save_now:
                if skips is not None:
                    skips.check(checkpointer)
                ensure_finite(finite, good_step, step, checkpointer)
                good_step = step
            if log_now:
                values = {k: float(v) for k, v in jax.device_get(stats).items()}
                values.update(progress.update(step))
                if skips is not None:
                    values["skipped_steps"] = skips.since_log()
                if bad_images:
                    values["bad_images"] = bad_images
                logger.scalars(step, values, prefix="train/")
                if logger.is_main:
                    print(format_line(step, steps, values), flush=True)
            if save_now:
                logger.flush()  # the metrics up to this step are stored with its checkpoint
                checkpointer.save(step, state, force=last)
            if stopped is not None:
                break
            if due(step, config.eval_every_steps, end):  # the parameters, then their EMA
                results = {}
                for params, suffix in evaluator.parameter_sets(state):
                    results.update(evaluator.classification(step, params, suffix))
            if due(step, config.fewshot.every_steps or config.eval_every_steps, end):
                for params, suffix in evaluator.parameter_sets(state):
                    results = {**results, **evaluator.fewshot(step, params, suffix)}
            if step == stop_after_step:
                break
    except BaseException:
        checkpointer.close()  # a save in flight completes before the error ends the process
        raise
    finally:
        batches.close()  # stops the input thread before anything shuts down
    if stopped is not None:
        checkpointer.wait()  # the stop checkpoint is complete on disk
        saved = checkpointer.latest_step()
        checkpointer.close()
        logger.close()
        stop = Preempted(stopped, saved, checkpointer.directory)
        print(stop.message, file=sys.stderr, flush=True)
        raise stop
    checkpointer.close()
    logger.close()
    return results


def finished_results(
    config: ml_collections.ConfigDict, workdir: str, checkpointer: Checkpointer, steps: int
) -> dict[str, float] | None:
    """For a run already trained to its last step: says so and returns its final evaluation
    as `metrics.jsonl` holds it (nothing is evaluated or written again); None otherwise.

    A damaged last checkpoint is reported as on resuming; `config.checkpoint.resume_step`
    goes the usual way (it sets the later steps aside)."""
    latest = checkpointer.latest_step()
    if latest is None or latest < steps or config.checkpoint.get("resume_step") is not None:
        return None
    reason = checkpointer.damage(latest)
    if reason is not None:
        raise checkpointer.damaged_error(latest, reason, RESUME_STEP)
    results = final_evaluation(storage.join(workdir, "metrics.jsonl"), latest)
    log.info(
        "the run in %s is complete: its last checkpoint is step %d of %d; nothing was trained "
        "or evaluated (raise config.total_steps to train on, or use another --workdir)",
        workdir,
        latest,
        steps,
    )
    return results


def final_evaluation(path: str, step: int) -> dict[str, float]:
    """The evaluation rows of `step` in a `metrics.jsonl`, merged (train rows left out)."""
    results = {}
    for line in rows_up_to(path, step).splitlines():
        row = json.loads(line)
        if row["step"] == step:
            results.update(
                {k: float(v) for k, v in row.items() if k != "step" and not k.startswith("train/")}
            )
    return results


def save_class_names(workdir: str, data_config, num_classes: int) -> None:
    """`<workdir>/class_names.json`: the data's class names (`null` where it has none), so
    that predict, visualize and export name classes without the data. Names found earlier
    are not replaced by `null`."""
    from vit_jax.inference import class_names

    names = class_names(data_config)
    if names is not None and len(names) != num_classes:
        names = None
    path = storage.join(workdir, CLASS_NAMES_FILE)
    if names is None and storage.exists(path):
        return
    storage.write_text(path, json.dumps(list(names) if names is not None else None) + "\n")


class SkipCounter:
    """Counts skipped (non-finite) steps on the device and stops a run after too many in a
    row. Each step's count is read one step late, so the host never waits for the step it
    just dispatched."""

    def __init__(self, limit: int):
        self.limit = limit
        self._counts = None  # device scalars: total, current run, longest run
        self._pending = None  # (step, counts) not yet read
        self._logged_total = 0
        self._total = 0

    @staticmethod
    @jax.jit
    def _add(counts, skipped):
        total, run, longest = counts
        run = jnp.where(skipped > 0, run + 1, 0)
        return total + skipped, run, jnp.maximum(longest, run)

    def update(self, step: int, skipped: jax.Array, checkpointer: Checkpointer) -> None:
        if self._counts is None:
            zero = jnp.zeros((), jnp.int32)
            self._counts = (zero, zero, zero)
        previous = self._pending
        self._counts = self._add(self._counts, skipped)
        self._pending = (step, self._counts)
        if previous is not None:
            self._read(*previous, checkpointer)

    def check(self, checkpointer: Checkpointer) -> None:
        """Reads the newest counts (waits for the last step) and stops if over the limit."""
        if self._pending is not None:
            self._read(*self._pending, checkpointer)

    def _read(self, step: int, counts, checkpointer: Checkpointer) -> None:
        total, _, longest = (int(x) for x in jax.device_get(counts))
        self._total = total
        if longest >= self.limit:
            checkpointer.close()
            raise TooManySkippedStepsError(
                f"{longest} steps in a row up to step {step} had a NaN/Inf loss or gradients "
                f"and were skipped (config.max_consecutive_skips={self.limit}); the last good "
                f"checkpoint ({checkpointer.latest_step()}) in {checkpointer.directory} is "
                "kept. Lower the learning rate or check the input data."
            )

    def since_log(self) -> int:
        """Skipped steps since the previous call (the previous log line)."""
        count, self._logged_total = self._total - self._logged_total, self._total
        return count


def ensure_finite(finite: jax.Array, good_step: int, step: int, checkpointer) -> None:
    """Stops the run, keeping the last good checkpoint, once a loss was NaN or Inf."""
    if bool(finite):
        return
    checkpointer.close()
    raise NonFiniteLossError(
        f"the loss became NaN or Inf between steps {good_step} and {step}; the last good "
        f"checkpoint ({checkpointer.latest_step()}) in {checkpointer.directory} is kept. "
        "Lower the learning rate or check the input data."
    )


def due(step: int, every: int | None, last: bool) -> bool:
    """Whether a periodic action runs at `step` (always on the run's last step)."""
    return last or bool(every and step % every == 0)


def initial_state(experiment: Experiment, checkpointer: Checkpointer) -> dict:
    """The newest checkpoint of this run (or `config.checkpoint.resume_step`, the later
    steps set aside), else init_from or a fresh initialisation."""
    resume = experiment.config.checkpoint.get("resume_step")
    if resume is not None:
        steps = checkpointer.all_steps()
        if resume not in steps:
            have = f"checkpoints at steps {steps}" if steps else "no checkpoints"
            raise UserError(
                f"config.checkpoint.resume_step={resume}: {checkpointer.directory} has {have}; "
                "give one of them, or leave the field unset to resume from the newest"
            )
        reason = checkpointer.damage(resume)
        if reason is not None:  # refused before anything is moved
            raise checkpointer.damaged_error(resume, reason, RESUME_STEP)
        aside = storage.join(storage.dirname(checkpointer.directory), "checkpoints_set_aside")
        moved = checkpointer.set_aside_after(resume, aside)
        if moved:
            log.info(
                "resuming from step %d (config.checkpoint.resume_step); the later checkpoints "
                "%s were moved to %s",
                resume,
                ", ".join(map(str, moved)),
                aside,
            )
    if checkpointer.latest_step() is not None:
        state, record = checkpointer.restore(experiment.abstract_state)
        log.info("resumed from step %d in %s", record["step"], checkpointer.directory)
        return state
    return experiment.init_state(experiment.initial_params())


class StepProfiler:
    """Captures a profiler trace of `config.profile.num_steps` steps from `start_step` into
    `<workdir>/profile`. For a bucket workdir the trace is written to a local temporary
    folder and then copied through `vit_jax.storage`, like every other file of the run."""

    def __init__(self, workdir: str, settings, *, enabled: bool):
        self.directory = storage.join(workdir, "profile")
        self.start = settings.start_step if enabled else -1
        self.stop = self.start + settings.num_steps
        self._local = None

    @contextlib.contextmanager
    def step(self, step: int):
        if step == self.start:
            remote = storage.is_remote(self.directory)
            self._local = tempfile.mkdtemp(prefix="vit_jax_profile_") if remote else None
            jax.profiler.start_trace(self._local or self.directory)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield
        if step == self.stop - 1 and self.start >= 0:
            jax.profiler.stop_trace()
            if self._local:
                for root, _, files in os.walk(self._local):
                    for name in files:
                        local = os.path.join(root, name)
                        relative = os.path.relpath(local, self._local).split(os.sep)
                        with open(local, "rb") as f:
                            storage.write_bytes(storage.join(self.directory, *relative), f.read())
                shutil.rmtree(self._local, ignore_errors=True)
