"""Plan a run before renting the chips: memory per device, FLOPs, step time, and a mesh that fits.

`python -m vit_jax plan --config=vit:G/14,imagenet21k,pretrain --devices 1024 --mesh
fsdp=128,data=8 --device-kind tpu-v4` compiles the StepBuilder's real train step (model, optimizer,
dtype, remat, scan, gradient accumulation, batch size: all from the config) ahead of time for a
mesh of simulated CPU devices, from abstract inputs (nothing is allocated, no data is read), and
prints JSON: parameter count; bytes per device of parameters, optimizer state and the
temporaries (activations, gradients) from XLA's memory analysis of the per-device program; FLOPs
per step; whether it fits the chip's memory; the step time and images/s at an assumed
MFU. A layout that does not fit comes with a mesh (or remat) that does, found by estimating
a few candidates and compiling the most promising one.

Simulated devices need `XLA_FLAGS=--xla_force_host_platform_device_count=N` before JAX
starts: the command sets it in `before_jax`, which the command harness runs before anything
imports JAX. `plan()` works in-process on the devices JAX already has (tests: 8).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import types
from typing import Any

from vit_jax import cli

GIB = 2**30
# Chip memory (the vendors' published figures) and the device kind `metric_logging.peak_flops`
# knows.
CHIPS = {
    "tpu-v4": ("TPU v4", 32 * GIB),
    "tpu-v5e": ("TPU v5e", 16 * GIB),
    "tpu-v5p": ("TPU v5p", 95 * GIB),
    "tpu-v6e": ("TPU v6 lite", 32 * GIB),
    "a100": ("NVIDIA A100", 80e9),
    "h100": ("NVIDIA H100", 80e9),
    "h200": ("NVIDIA H200", 141e9),
}
MAX_PROPOSAL_COMPILES = 2
AUTO_SCAN_DEPTH = 24  # the CLI scans models this deep unless --config.model.scan is given


def plan(
    config,
    devices: int,
    *,
    device_kind: str = "tpu-v4",
    mfu: float = 0.5,
    margin: float = 0.9,
    memory_bytes: float | None = None,
    propose: bool = True,
) -> dict[str, Any]:
    """The plan of `config` on `devices` simulated devices (the first ones JAX has).

    `memory_bytes` replaces the chip's memory (what-if questions, tests); a layout fits when
    its per-device total is at most `margin` x memory.
    """
    import jax

    if device_kind not in CHIPS:
        raise _error(f"--device-kind={device_kind} is not one of: {', '.join(CHIPS)}")
    if not 0 < mfu <= 1:
        raise _error(f"--mfu={mfu} must be in (0, 1]")
    if devices > jax.device_count():
        raise _error(f"--devices={devices}: JAX was started with {jax.device_count()} devices")
    kind, memory = CHIPS[device_kind]
    budget = margin * (memory_bytes or memory)
    start = time.perf_counter()
    experiment = _experiment(config, devices)
    layout = _measure(experiment)
    flops_start = time.perf_counter()
    xla_flops = experiment.step_flops(extrapolate_depth=True)
    flops_s = time.perf_counter() - flops_start
    flops_method = "XLA cost_analysis of the unpartitioned step"
    if (config.model.get("depth") or 0) > 2:
        flops_method += f" at depth 1 and 2, linear to {config.model.depth}"
    model = _model_facts(experiment)
    formula_flops = 6 * model["params"] * model["tokens"] * config.batch_size
    flops = xla_flops or formula_flops
    peak = _peak(kind)
    step_s = flops / (mfu * peak * devices)
    result = {
        "config": _describe(config),
        "devices": devices,
        **layout,
        **model,
        "flops_per_step": {
            "xla_unpartitioned": xla_flops,
            "6_x_params_x_tokens": formula_flops,
            "xla_method": flops_method,
        },
        "device_kind": device_kind,
        "memory_per_device_bytes": memory_bytes or memory,
        "budget_bytes": budget,
        "margin": margin,
        "fits": layout["bytes_per_device"]["total"] <= budget,
        "mfu": mfu,
        "peak_flops_per_device": peak,
        "step_time_s": step_s,
        "images_per_s": config.batch_size / step_s,
        "compile_s": round(layout.pop("compile_s"), 1),
        "flops_s": round(flops_s, 1),
        "measured": f"XLA memory_analysis of the per-device train step compiled for {devices} "
        f"simulated {jax.devices()[0].platform.upper()} devices (jax {jax.__version__}); params "
        f"and optimizer bytes are exact (from the shardings); temporaries are the CPU "
        f"compiler's: it keeps f32 copies around bf16 work (an H/14 step measured 1.07x the "
        f"temporaries of its f32 twin), so for bf16 they bound the {device_kind}'s from above",
    }
    if not result["fits"] and propose:
        result["proposal"] = _propose(experiment, layout, budget, devices)
    result["total_s"] = round(time.perf_counter() - start, 1)
    return result


def _error(message: str):
    from vit_jax.errors import UserError

    return UserError(message)


# --- one layout ----------------------------------------------------------------------------


def check_layout(config, devices: int) -> dict[str, int]:
    """The mesh shape on `devices` devices; UserError when the mesh, the batch or the class
    count does not allow a plan (nothing is compiled)."""
    from vit_jax import sharding, validate

    validate.check_config(config)
    shape = sharding.mesh_shape(config.mesh, devices)
    problems = sharding.batch_problems(config, shape, evaluation=False)  # train step only
    if problems:
        raise _error(problems[0])
    if config.data.num_classes is None:
        raise _error(
            f"the class count of {config.dataset} is read from its data, which the planner "
            "does not read: set --config.data.num_classes (e.g. 21843 for imagenet21k)"
        )
    return shape


def _experiment(config, devices: int):
    """The run on a mesh of the first `devices` devices; the class count and the schedule's
    length from the config (the planner reads no data)."""
    import jax

    from vit_jax.experiment import Experiment

    check_layout(config, devices)
    steps = max(config.total_steps or 0, config.schedule.warmup_steps, 1)
    return Experiment.from_config(
        config,
        devices=jax.devices()[:devices],
        num_classes=config.data.num_classes,
        steps=steps,
    )


def _measure(experiment) -> dict[str, Any]:
    """Compiles the train step for the experiment's mesh: memory per device, compile time."""
    start = time.perf_counter()
    compiled = experiment.compile_train_step()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    arguments, temp = stats.argument_size_in_bytes, stats.temp_size_in_bytes
    outputs, alias = stats.output_size_in_bytes, stats.alias_size_in_bytes
    code = stats.generated_code_size_in_bytes
    state = _state_bytes(experiment)
    config = experiment.config
    return {
        "mesh": dict(experiment.mesh.shape),
        "sharding_rules": config.sharding_rules,
        "remat": config.model.get("remat"),
        "bytes_per_device": {
            "params": state["params"],
            "optimizer": state["opt_state"],
            "batch_and_other_arguments": arguments - state["params"] - state["opt_state"],
            "arguments": arguments,
            "outputs": outputs,
            "aliased": alias,
            "temporaries": temp,
            "generated_code": code,
            "total": arguments + outputs - alias + temp + code,
        },
        "param_shards": state["params_global"] / max(state["params"], 1),
        "largest_replicated_params_bytes": state["replicated"],
        "compile_s": compile_s,
    }


def _state_bytes(experiment) -> dict[str, Any]:
    """Bytes per device of params and optimizer state, from the abstract state's shardings,
    and the largest parameters left whole on every device (a dimension no mesh axis divides,
    or a logical axis no rule maps)."""
    import jax

    abstract_state = experiment.abstract_state

    def per_device(tree) -> int:
        leaves = jax.tree.leaves(tree)
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)

    params = abstract_state["params"]
    whole = [
        (jax.tree_util.keystr(path, simple=True, separator="/"), x.size * x.dtype.itemsize)
        for path, x in jax.tree_util.tree_leaves_with_path(params)
        if x.sharding.is_fully_replicated and experiment.mesh.size > experiment.mesh.shape["data"]
    ]
    return {
        "params": per_device(params),
        "opt_state": per_device(abstract_state["opt_state"]),
        "params_global": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)),
        "replicated": dict(sorted(whole, key=lambda item: -item[1])[:3]),
    }


def _model_facts(experiment) -> dict[str, Any]:
    import jax

    config = experiment.config
    model = config.model
    params = sum(x.size for x in jax.tree.leaves(experiment.abstract_state["params"]))
    tokens = (model.img_size // model.patch_size) ** 2 + (model.get("pool_type") == "tok")
    parallel = experiment.mesh.shape["data"] * experiment.mesh.shape["fsdp"]
    return {
        "params": params,
        "tokens": tokens,
        "batch_size": config.batch_size,
        "batch_per_device": config.batch_size / parallel,
        "grad_accum_steps": config.optim.grad_accum_steps,
        "dtype": model.get("dtype") or "float32",
        "scan": model.get("scan"),
    }


def _peak(kind: str) -> float:
    from vit_jax.metric_logging import peak_flops

    return peak_flops(types.SimpleNamespace(device_kind=kind, platform="accelerator"))


def _describe(config) -> str:
    return f"{config.model_name},{config.dataset},{config.recipe}"


# --- a layout that fits ---------------------------------------------------------------------


def _propose(experiment, measured: dict, budget: float, devices: int) -> dict[str, Any]:
    """A mesh (and remat) that fits: candidates estimated first, the best few compiled.

    Estimate = exact sharded state + gradients (one more copy of the sharded params) +
    the measured activations scaled by images per device, the model axis and remat.
    """
    config = experiment.config
    used = measured["bytes_per_device"]
    state = used["params"] + used["optimizer"]
    activations = max(used["total"] - state - used["params"], 0)
    per_image = activations / (_micro_batch(config, measured["mesh"]) * _remat_factor(config))
    estimates = []
    for mesh, remat in _candidates(config, measured["mesh"], devices):
        candidate = _with(config, mesh, remat)
        try:
            cand_state = _state_bytes(_experiment(candidate, devices))
        except Exception:  # noqa: BLE001 - a candidate the batch does not divide
            continue
        act = per_image * _micro_batch(candidate, mesh) * _remat_factor(candidate)
        act *= measured["mesh"]["model"] / mesh["model"]
        total = cand_state["params"] * 2 + cand_state["opt_state"] + act
        estimates.append({"mesh": mesh, "remat": remat, "estimated_bytes": int(total)})
    # Those estimated to fit, in order; else the closest one (estimates are rough).
    ranked = [e for e in estimates if e["estimated_bytes"] <= budget]
    ranked = ranked or sorted(estimates, key=lambda e: e["estimated_bytes"])[:1]
    compiled = []
    for entry in ranked[:MAX_PROPOSAL_COMPILES]:
        layout = _measure(_experiment(_with(config, entry["mesh"], entry["remat"]), devices))
        entry = dict(entry, compiled_bytes=layout["bytes_per_device"]["total"])
        entry["compile_s"] = round(layout["compile_s"], 1)
        compiled.append(entry)
        if entry["compiled_bytes"] <= budget:
            return {
                "fits": True,
                "mesh": entry["mesh"],
                "remat": entry["remat"],
                "flags": _flags(entry["mesh"], entry["remat"], config),
                "bytes_per_device": entry["compiled_bytes"],
                "compiled": compiled,
                "estimated": len(estimates),
            }
    return {
        "fits": False,
        "message": "no candidate mesh fits: add devices, gradient accumulation "
        "(--config.optim.grad_accum_steps) or a smaller batch",
        "compiled": compiled,
        "closest_estimates": sorted(estimates, key=lambda e: e["estimated_bytes"])[:3],
    }


def _candidates(config, current: dict, devices: int):
    """(mesh, remat) to try, cheapest change first: FSDP over more devices, then tensor
    parallelism, then full remat. FSDP is as large as the width divides (an undivided
    dimension stays replicated)."""
    heads = config.model.get("num_heads", 1)
    width = config.model.width
    remats = [config.model.get("remat", "none")]
    remats += ["full"] if "remat" in config.model and remats[0] != "full" else []
    for remat in remats:
        for model in (1, 2, 4, 8, 16):
            if devices % model or heads % model or model > devices:
                continue
            rest = devices // model
            fsdp = max(f for f in range(1, rest + 1) if rest % f == 0 and width % f == 0)
            mesh = {"data": rest // fsdp, "fsdp": fsdp, "model": model}
            if (mesh, remat) != (current, config.model.get("remat")):
                yield mesh, remat


def _with(config, mesh: dict, remat: str):
    import ml_collections

    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh.update(mesh)
    if "remat" in config.model:
        config.model.remat = remat
    if mesh["model"] > 1 and config.sharding_rules in ("dp", "fsdp"):
        config.sharding_rules = "fsdp_tp"
    return config


def _micro_batch(config, mesh: dict) -> float:
    return config.batch_size / (mesh["data"] * mesh["fsdp"] * config.optim.grad_accum_steps)


def _remat_factor(config) -> float:
    """Rough share of the activations a remat policy keeps (only for ranking candidates)."""
    return {"none": 1.0, "full": 0.2}.get(config.model.get("remat", "none"), 0.5)


def _flags(mesh: dict, remat: str, config) -> str:
    text = "--mesh " + ",".join(f"{k}={v}" for k, v in mesh.items())
    if remat != config.model.get("remat"):
        text += f" --config.model.remat={remat}"
    return text


# --- command line ---------------------------------------------------------------------------


TAKES_CONFIG = True


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        "plan",
        description="Compile the train step for N simulated devices and print the plan as "
        "JSON. Any config field is set with --config.<field>=<value>.",
    )
    p.add_argument("--config", default="vit", help="as for python -m vit_jax train")
    p.add_argument("--devices", type=int, required=True, help="number of devices (chips)")
    p.add_argument("--mesh", help="data=..,fsdp=..,model=.. (missing axes: 1; one may be -1)")
    p.add_argument("--device-kind", default="tpu-v4", choices=sorted(CHIPS))
    p.add_argument("--mfu", type=float, default=0.5, help="assumed model FLOPs utilisation")
    p.add_argument("--margin", type=float, default=0.9, help="usable share of chip memory")
    p.add_argument("--memory-gib", type=float, help="chip memory in GiB instead of the kind's")
    p.add_argument("--no-propose", action="store_true", help="no search when it does not fit")
    p.add_argument("--verbose", action="store_true", help="tracebacks for every error")
    return p


def before_jax(args: argparse.Namespace) -> None:
    """`--devices` simulated CPU devices, set while JAX is not imported yet. A process whose
    JAX already runs (a test, a notebook) plans on the first `--devices` devices it has."""
    if args.devices < 1:
        raise _error(f"--devices={args.devices} must be positive")
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = re.sub(
            r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")
        )
        count = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{flags} {count}".strip()


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from vit_jax import config_loader

    config = config_loader.load_config(args.config, overrides + _mesh_overrides(args.mesh))
    scan_set = _auto_scan(config, overrides)
    memory = args.memory_gib * GIB if args.memory_gib else None
    result = plan(
        config,
        args.devices,
        device_kind=args.device_kind,
        mfu=args.mfu,
        margin=args.margin,
        memory_bytes=memory,
        propose=not args.no_propose,
    )
    if scan_set:
        result["scan"] = "true (set by the planner: depth >= 24; --config.model.scan=false)"
    print(json.dumps(result, indent=1))
    return 0


def _auto_scan(config, overrides: list[str]) -> bool:
    """Scans deep models (one compiled block instead of `depth`: compiles in a fraction of
    the time) unless the command line says otherwise; True when it did."""
    model = config.model
    if "scan" not in model or any(o.startswith("model.scan") for o in overrides):
        return False
    if model.scan or model.get("depth", 0) < AUTO_SCAN_DEPTH:
        return False
    model.scan = True
    return True


def _mesh_overrides(text: str | None) -> list[str]:
    """`data=2,fsdp=4` -> config overrides for every mesh axis (missing axes: 1)."""
    if not text:
        return []
    sizes = {"data": "1", "fsdp": "1", "model": "1"}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if axis.strip() not in sizes or not size.strip():
            raise _error(f"--mesh={text}: give axis=size pairs for data, fsdp and model")
        sizes[axis.strip()] = size.strip()
    return [f"mesh.{axis}={size}" for axis, size in sizes.items()]
