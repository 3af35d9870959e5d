"""The PyTorch side of `vit_jax step_benchmark step --compare timm`, in its own process.

torch and TensorFlow crash when loaded into one interpreter, and PyTorch is not a
dependency of this project, so timm runs here, in a child process that the benchmark
drives over stdin/stdout: one JSON request per line (`{"cmd": "train", "steps": 3}`), one
JSON reply per line with the seconds of each timed step. The parent alternates rounds of
its own steps with rounds of these, so both sides see the same load on a shared machine.

The model is timm's `VisionTransformer` built from the same variant (width, depth, heads,
MLP size, patch, image size, pooling, class count) and trained with AdamW and the same
gradient clipping, in eager mode. By default it keeps timm's exact (erf) GELU: PyTorch's
tanh GELU, the one vit_jax computes, runs ~3x slower on CPU, and the comparison should not
handicap timm (`--timm_gelu tanh` computes the same function as vit_jax).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from functools import partial


def build(spec: dict):
    """timm model, optimizer and random inputs for `spec` (the parent's description)."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    gap = spec["pool_type"] == "gap"
    model = VisionTransformer(
        img_size=spec["img_size"],
        patch_size=spec["patch_size"],
        embed_dim=spec["width"],
        depth=spec["depth"],
        num_heads=spec["num_heads"],
        mlp_ratio=spec["mlp_dim"] / spec["width"],
        num_classes=spec["num_classes"],
        class_token=not gap,
        global_pool="avg" if gap else "token",
        fc_norm=False,
        act_layer=partial(torch.nn.GELU, approximate=spec.get("gelu", "none")),
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"]
    )
    batch, size = spec["batch"], spec["img_size"]
    images = torch.randn(batch, 3, size, size)
    labels = torch.nn.functional.one_hot(
        torch.randint(0, spec["num_classes"], (batch,)), spec["num_classes"]
    ).float()
    return model, optimizer, images, labels, dtype


def make_steps(spec: dict):
    """(train_step, eval_step) closures over one model; each runs one full step."""
    import torch

    model, optimizer, images, labels, dtype = build(spec)
    autocast = dtype != torch.float32
    clip = spec["clip_global_norm"]

    def train_step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        loss.item()

    def eval_step() -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=autocast):
            logits = model(images)
            (logits.argmax(-1) == labels.argmax(-1)).sum().item()

    return train_step, eval_step


def peak_host_mib() -> float:
    """This process's peak resident memory (MiB). VmHWM, since Linux carries ru_maxrss
    over from the parent through fork and exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(spec: dict, requests, replies) -> None:
    """Answers timing requests until stdin closes."""
    import torch

    start = time.perf_counter()
    # Set once, before any work: switching the count later slows PyTorch's CPU kernels.
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    steps = dict(zip(("train", "eval"), make_steps(spec), strict=True))
    for fn in steps.values():  # warm-up: allocator, kernels picked
        fn()
        fn()
    hello = {
        "ready": True,
        "setup_seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    print(json.dumps(hello), file=replies, flush=True)
    for line in requests:
        request = json.loads(line)
        fn = steps[request["cmd"]]
        times = []
        for _ in range(int(request["steps"])):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        reply = {"times": times, "peak_host_mib": peak_host_mib()}
        print(json.dumps(reply), file=replies, flush=True)


def main() -> None:
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        print(
            json.dumps({"error": f"--compare timm needs torch and timm installed ({e})"}),
            flush=True,
        )
        sys.exit(3)
    serve(json.loads(sys.argv[1]), sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
