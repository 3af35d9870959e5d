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

`--slices N` plans N slices of `--devices` each (TPU slices joined by the data-center network,
DCN): the step is compiled for the whole N x devices mesh (data parallel across slices unless
config.mesh.dcn_data / dcn_fsdp say otherwise), and the plan adds the bytes each device sends
across the DCN per step, the time that takes at `--dcn-gbps`, and whether it hides behind the
backward pass; the collectives of the compiled program whose device groups span slices are
listed, so a layout whose FSDP crosses the DCN shows.

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
# DCN bandwidth per chip, Gbit/s: Cloud TPU v5p's published figure (50 Gbps per chip, 200 per
# 4-chip host, 25 GB/s); assumed for every device kind unless --dcn-gbps says otherwise.
DCN_GBPS = 50.0
# Share of a step's FLOPs in the backward pass (4 of 6 x params x tokens), the compute the
# gradients' reduction across slices can overlap with.
BACKWARD_SHARE = 2 / 3
AUTO_SCAN_DEPTH = 24  # the CLI scans models this deep unless --config.model.scan is given


def plan(
    config,
    devices: int,
    *,
    slices: int = 1,
    device_kind: str = "tpu-v4",
    mfu: float = 0.5,
    margin: float = 0.9,
    memory_bytes: float | None = None,
    propose: bool = True,
    dcn_gbps: float = DCN_GBPS,
) -> dict[str, Any]:
    """The plan of `config` on `slices` x `devices` simulated devices (the first ones JAX
    has; each run of `devices` of them treated as one slice).

    `memory_bytes` replaces the chip's memory (what-if questions, tests); a layout fits when
    its per-device total is at most `margin` x memory.
    """
    import jax

    if device_kind not in CHIPS:
        raise _error(f"--device-kind={device_kind} is not one of: {', '.join(CHIPS)}")
    if not 0 < mfu <= 1:
        raise _error(f"--mfu={mfu} must be in (0, 1]")
    if slices < 1 or dcn_gbps <= 0:
        raise _error(f"--slices={slices} and --dcn-gbps={dcn_gbps} must be positive")
    if devices * slices > jax.device_count():
        raise _error(
            f"--devices={devices} x --slices={slices}: JAX was started with "
            f"{jax.device_count()} devices"
        )
    kind, memory = CHIPS[device_kind]
    budget = margin * (memory_bytes or memory)
    start = time.perf_counter()
    experiment = _experiment(config, devices, slices)
    layout = _measure(experiment, slices)
    flops_start = time.perf_counter()
    xla_flops = experiment.step_flops()
    flops_s = time.perf_counter() - flops_start
    flops_method = "XLA cost_analysis of the unpartitioned step"
    if config.model.get("scan") and (config.model.get("depth") or 0) > 2:
        flops_method += f" at depth 1 and 2, linear to {config.model.depth}"
    model = _model_facts(experiment)
    formula_flops = 6 * model["params"] * model["tokens"] * config.batch_size
    flops = xla_flops or formula_flops
    peak = _peak(kind)
    step_s = flops / (mfu * peak * devices * slices)
    result = {
        "config": _describe(config),
        "devices": devices * slices,
        "slices": slices,
        "devices_per_slice": devices,
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
        "measured": f"XLA memory_analysis of the per-device train step compiled for "
        f"{devices * slices} simulated {jax.devices()[0].platform.upper()} devices "
        f"(jax {jax.__version__}); params "
        f"and optimizer bytes are exact (from the shardings); temporaries are the CPU "
        f"compiler's: it keeps f32 copies around bf16 work (an H/14 step measured 1.07x the "
        f"temporaries of its f32 twin), so for bf16 they bound the {device_kind}'s from above",
    }
    if math.prod(layout["mesh_dcn"].values()) > 1:
        result["dcn"] = _dcn_traffic(layout, step_s, dcn_gbps)
    if not result["fits"] and propose:
        result["proposal"] = _propose(experiment, layout, budget, devices, slices)
    result["total_s"] = round(time.perf_counter() - start, 1)
    return result


def _error(message: str):
    from vit_jax.errors import UserError

    return UserError(message)


# --- one layout ----------------------------------------------------------------------------


def check_layout(config, devices: int, slices: int = 1) -> dict[str, int]:
    """The mesh shape on `slices` slices of `devices` devices; UserError when the mesh, the
    batch or the class count does not allow a plan (nothing is compiled)."""
    from vit_jax import sharding, validate

    validate.check_config(config)
    shape = sharding.mesh_shape(config.mesh, devices * slices, slices)
    problems = sharding.batch_problems(config, shape, evaluation=False)  # train step only
    if problems:
        raise _error(problems[0])
    if config.data.num_classes is None:
        raise _error(
            f"the class count of {config.dataset} is read from its data, which the planner "
            "does not read: set --config.data.num_classes (e.g. 21843 for imagenet21k)"
        )
    return shape


def _experiment(config, devices: int, slices: int = 1):
    """The run on a mesh of the first `slices` x `devices` devices, each `devices` of them a
    slice; the class count and the schedule's length from the config (the planner reads no
    data)."""
    import jax

    from vit_jax.experiment import Experiment

    check_layout(config, devices, slices)
    steps = max(config.total_steps or 0, config.schedule.warmup_steps, 1)
    chosen = jax.devices()[: devices * slices]
    return Experiment.from_config(
        config,
        devices=chosen,
        num_classes=config.data.num_classes,
        steps=steps,
        slices=[chosen[i * devices : (i + 1) * devices] for i in range(slices)],
        evaluates=False,
    )


def _measured_patch_size(experiment) -> int | None:
    """A FlexiViT's smallest patch size: its step has the most tokens, so the most memory
    (the one that must fit); None for other models."""
    sizes = experiment.steps.patch_sizes
    return min(sizes) if sizes else None


def _measure(experiment, slices: int = 1) -> dict[str, Any]:
    """Compiles the train step for the experiment's mesh (`slices` slices, as `_experiment`
    makes them): memory per device, DCN x ICI layout, the collectives that cross slices,
    compile time. A FlexiViT's step is compiled at its smallest patch size."""
    import jax

    from vit_jax import sharding

    start = time.perf_counter()
    compiled = experiment.compile_train_step(_measured_patch_size(experiment))
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    config = experiment.config
    dcn, ici = sharding.mesh_layout(config.mesh, experiment.mesh.size, slices)
    crossing = {}
    if slices > 1:
        per_slice = experiment.mesh.size // slices
        slice_of = {d.id: i // per_slice for i, d in enumerate(jax.devices())}
        assigned = [slice_of[d.id] for d in experiment.mesh.devices.flat]
        for kind, size in cross_slice_collectives(compiled.as_text(), assigned):
            entry = crossing.setdefault(kind, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += size
    arguments, temp = stats.argument_size_in_bytes, stats.temp_size_in_bytes
    outputs, alias = stats.output_size_in_bytes, stats.alias_size_in_bytes
    code = stats.generated_code_size_in_bytes
    state = _state_bytes(experiment)
    return {
        "mesh": dict(experiment.mesh.shape),
        "mesh_dcn": dcn,
        "mesh_ici": ici,
        "cross_slice_collectives": crossing,
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
    patch_size = _measured_patch_size(experiment) or model.patch_size
    tokens = (model.img_size // patch_size) ** 2 + (model.get("pool_type") == "tok")
    tokens += model.get("num_registers") or 0
    parallel = experiment.mesh.shape["data"] * experiment.mesh.shape["fsdp"]
    facts = {}
    if experiment.steps.patch_sizes:
        sizes = list(experiment.steps.patch_sizes)
        facts["patch_size"] = (
            f"{patch_size} (FlexiViT: memory and tokens at the smallest of {sizes}; "
            "FLOPs their mean)"
        )
    if experiment.teacher is not None:  # its parameters are arguments of the step
        facts["teacher"] = experiment.teacher.info.description()
    return {
        **facts,
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


# --- across slices (DCN) -------------------------------------------------------------------


def _dcn_traffic(layout: dict, step_s: float, gbps: float) -> dict[str, Any]:
    """Bytes each device sends across the DCN per step, from its parameter shard `p` (bytes
    per device of the sharded parameters; gradients have the parameters' dtype): the
    gradients' all-reduce across the dcn_data slices sends 2 (n-1)/n p (ring: a
    reduce-scatter and an all-gather, each (n-1)/n of the data), and FSDP across dcn_fsdp
    slices 3 (k-1) p (the forward's and the backward's all-gather and the gradients'
    reduce-scatter, each (k-1) p over the DCN; remat may gather again)."""
    p = layout["bytes_per_device"]["params"]
    n, k = layout["mesh_dcn"]["dcn_data"], layout["mesh_dcn"]["dcn_fsdp"]
    all_reduce = 2 * (n - 1) / n * p
    fsdp = 3 * (k - 1) * p
    seconds = (all_reduce + fsdp) / (gbps * 1e9 / 8)
    backward_s = BACKWARD_SHARE * step_s
    return {
        "bytes_per_device_per_step": int(all_reduce + fsdp),
        "gradient_all_reduce_bytes": int(all_reduce),
        "fsdp_across_slices_bytes": int(fsdp),
        "how": f"params bytes per device p={p}: gradient all-reduce over dcn_data={n} slices "
        f"2(n-1)/n p, FSDP over dcn_fsdp={k} slices 3(k-1) p (2 all-gathers + 1 "
        "reduce-scatter); parameters replicated inside a slice are counted whole (a "
        "hierarchical all-reduce sends less)",
        "gbps_per_device": gbps,
        "assumed": f"{gbps:g} Gbit/s of DCN per device, sending at full rate (default: Cloud "
        "TPU v5p's published 50 Gbps per chip)",
        "time_s": seconds,
        "compute_step_time_s": step_s,
        "backward_time_s": backward_s,
        "hidden": seconds <= backward_s,
        "hidden_means": "the DCN time fits in the backward pass (2/3 of the step's FLOPs), "
        "with which XLA overlaps the gradients' reduction",
    }


_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%?\S+ = (.+?) "
    r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\((.*)$"
)
_ARRAY = re.compile(r"\b(pred|bf16|[fsu]\d+|f8\w*)\[([\d,]*)\]")


def cross_slice_collectives(hlo_text: str, slice_of: list[int]) -> list[tuple[str, int]]:
    """(kind, bytes of its result) of every collective in a compiled program's HLO text
    whose device groups hold devices of more than one slice. The HLO numbers devices by
    their place in the program's device assignment (a mesh's devices, flattened):
    `slice_of[i]` is the slice of the i-th. Each op is counted once (a scanned loop's body
    runs `depth` times)."""
    found = []
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.match(line)
        if not match:
            continue
        result, kind, attributes = match.groups()
        groups = _device_groups(attributes, len(slice_of))
        if any(len({slice_of[d] for d in group}) > 1 for group in groups):
            found.append((kind, _array_bytes(result)))
    return found


def _array_bytes(result_type: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(result_type):
        bits = 8 if dtype in ("pred",) or dtype.startswith("f8") else int(dtype[-2:].lstrip("f"))
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _iota(text: str):
    """Device ids written as `[dims]T(perm)` (an iota reshaped and transposed) or a list."""
    import numpy as np

    match = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if not match:
        return np.asarray(_ints(text))
    dims = _ints(match.group(1))
    ids = np.arange(math.prod(dims)).reshape(dims)
    return ids.transpose(_ints(match.group(2))) if match.group(2) else ids


def _device_groups(attributes: str, device_count: int) -> list[list[int]]:
    """The device groups of one collective, from any of the HLO printer's forms: explicit
    `{{0,1},{2,3}}`, iota `[2,2]<=[4]`, mesh axes `mesh['axis_0'=4,'axis_1'=2],
    device_ids=([2,4]T(1,0)) {'axis_0'}`, or a permute's source_target_pairs."""
    if match := re.search(r"source_target_pairs=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", attributes):
        return [_ints(pair) for pair in re.findall(r"\{([\d,]*)\}", match.group(1))]
    if match := re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attributes):
        groups = [_ints(g) for g in re.findall(r"\{([\d,]*)\}", match.group(1))]
        return [g for g in groups if g] or [list(range(device_count))]
    if match := re.search(r"replica_groups=\[([\d,]+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", attributes):
        return _iota(match.group(2)).reshape(_ints(match.group(1))).tolist()
    mesh = r"replica_groups=mesh\[([^\]]*)\]"
    ids = r"(?:, device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?|[\d,]+)\))?"
    if match := re.search(mesh + ids + r"(?: \{([^}]*)\})?", attributes):
        axes = re.findall(r"'(\w+)'=(\d+)", match.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        grid = _iota(match.group(2)) if match.group(2) else _iota(f"[{math.prod(sizes)}]")
        grid = grid.reshape(sizes)
        chosen = names
        if match.group(3) is not None:
            if not re.fullmatch(r"'\w+'(?:,\s*'\w+')*", match.group(3)):
                raise ValueError(f"unread replica groups: {match.group(0)}")
            chosen = re.findall(r"'(\w+)'", match.group(3))
        keep = [names.index(name) for name in chosen]
        rest = [i for i in range(len(names)) if i not in keep]
        size = math.prod(sizes[i] for i in keep)
        return grid.transpose(rest + keep).reshape(-1, size).tolist()
    if "replica_groups" in attributes or "source_target_pairs" in attributes:
        raise ValueError(f"unread device groups: {attributes[:200]}")
    return [list(range(device_count))]  # no groups: every device


# --- a layout that fits ---------------------------------------------------------------------


def _propose(
    experiment, measured: dict, budget: float, devices: int, slices: int = 1
) -> dict[str, Any]:
    """A mesh (and remat) that fits: candidates estimated first, the best few compiled.
    With several slices the candidates change the mesh inside a slice (ICI); the DCN
    fields stay as given.

    Estimate = exact sharded state + gradients (one more copy of the sharded params) +
    the measured activations scaled by images per device, the model axis and remat.
    """
    config = experiment.config
    used = measured["bytes_per_device"]
    state = used["params"] + used["optimizer"]
    activations = max(used["total"] - state - used["params"], 0)
    images = _micro_batch(config, devices, slices)
    per_image = activations / (images * _remat_factor(config))
    estimates = []
    for mesh, remat in _candidates(config, measured["mesh_ici"], devices):
        candidate = _with(config, mesh, remat)
        try:
            cand_state = _state_bytes(_experiment(candidate, devices, slices))
        except Exception:  # noqa: BLE001 - a candidate the batch does not divide
            continue
        act = per_image * _micro_batch(candidate, devices, slices) * _remat_factor(candidate)
        act *= measured["mesh"]["model"] / mesh["model"]
        total = cand_state["params"] * 2 + cand_state["opt_state"] + act
        estimates.append({"mesh": mesh, "remat": remat, "estimated_bytes": int(total)})
    # Those estimated to fit, in order; else the closest one (estimates are rough).
    ranked = [e for e in estimates if e["estimated_bytes"] <= budget]
    ranked = ranked or sorted(estimates, key=lambda e: e["estimated_bytes"])[:1]
    compiled = []
    for entry in ranked[:MAX_PROPOSAL_COMPILES]:
        chosen = _with(config, entry["mesh"], entry["remat"])
        layout = _measure(_experiment(chosen, devices, slices), slices)
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


def _micro_batch(config, devices: int, slices: int = 1) -> float:
    """Images per device in one micro-batch on `slices` slices of `devices`."""
    from vit_jax import sharding

    shape = sharding.mesh_shape(config.mesh, devices * slices, slices)
    parallel = math.prod(shape[axis] for axis in sharding.BATCH_AXES)
    return config.batch_size / (parallel * config.optim.grad_accum_steps)


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
    p.add_argument(
        "--devices", type=int, required=True, help="number of devices (chips), per slice"
    )
    p.add_argument(
        "--slices",
        type=int,
        default=1,
        help="slices joined by the data-center network (DCN); data parallel across them "
        "(config.mesh.dcn_data=-1) unless the mesh sets dcn_data/dcn_fsdp",
    )
    p.add_argument(
        "--mesh",
        help="data=..,fsdp=..,model=.. inside a slice (missing axes: 1; one may be -1), and "
        "dcn_data=..,dcn_fsdp=.. across slices",
    )
    p.add_argument(
        "--dcn-gbps",
        type=float,
        default=DCN_GBPS,
        help="DCN bandwidth per device in Gbit/s (default %(default)g: Cloud TPU v5p's "
        "published 50 Gbps per chip, 200 per 4-chip host)",
    )
    p.add_argument("--device-kind", default="tpu-v4", choices=sorted(CHIPS))
    p.add_argument("--mfu", type=float, default=0.5, help="assumed model FLOPs utilisation")
    p.add_argument("--margin", type=float, default=0.9, help="usable share of chip memory")
    p.add_argument("--memory-gib", type=float, help="chip memory in GiB instead of the kind's")
    p.add_argument("--no-propose", action="store_true", help="no search when it does not fit")
    p.add_argument("--verbose", action="store_true", help="tracebacks for every error")
    return p


def before_jax(args: argparse.Namespace) -> None:
    """`--slices` x `--devices` simulated CPU devices, set while JAX is not imported yet. A
    process whose JAX already runs (a test, a notebook) plans on the first ones it has."""
    if args.devices < 1 or args.slices < 1:
        raise _error(f"--devices={args.devices} and --slices={args.slices} must be positive")
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = re.sub(
            r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")
        )
        count = f"--xla_force_host_platform_device_count={args.devices * args.slices}"
        os.environ["XLA_FLAGS"] = f"{flags} {count}".strip()


def plan_config(args: argparse.Namespace, overrides: list[str]):
    """The config the command plans, and whether the planner turned on scan: `--mesh` inside
    a slice, data parallel across `--slices` unless the DCN fields are given, deep models
    scanned (`_auto_scan`)."""
    from vit_jax import config_loader

    mesh = _mesh_overrides(args.mesh)
    config = config_loader.load_config(args.config, overrides + mesh)
    dcn_set = any(o.startswith(("mesh.dcn_data", "mesh.dcn_fsdp")) for o in overrides + mesh)
    if args.slices > 1 and not dcn_set:
        config.mesh.dcn_data = -1  # data parallel across the slices
    return config, _auto_scan(config, overrides)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    config, scan_set = plan_config(args, overrides)
    memory = args.memory_gib * GIB if args.memory_gib else None
    result = plan(
        config,
        args.devices,
        slices=args.slices,
        dcn_gbps=args.dcn_gbps,
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
    """`data=2,fsdp=4` -> config overrides for every mesh axis (missing ICI axes: 1; the
    DCN fields only where given)."""
    if not text:
        return []
    sizes = {"data": "1", "fsdp": "1", "model": "1"}
    valid = ("dcn_data", "dcn_fsdp", *sizes)
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if axis.strip() not in valid or not size.strip():
            raise _error(f"--mesh={text}: give axis=size pairs for {', '.join(valid)}")
        sizes[axis.strip()] = size.strip()
    return [f"mesh.{axis}={size}" for axis, size in sizes.items()]
