"""Model speed benchmarks, measured side by side in one process (ratios, not absolute times).

`python -m vit_jax.benchmark attention --model ViT-B/16 --batch 8` compares the attention
implementations on a jitted forward+backward step and prints JSON: the fused
`jax.nn.dot_product_attention` (what the models use) against a plain einsum-softmax.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import create_model


def time_call(fn, *args, repeats: int = 5) -> float:
    """Median seconds of `fn(*args)` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def train_like_step(model_name: str, batch: int, img_size: int, dtype: str, attention_impl):
    """A jitted loss+gradient function of the model's parameters and its inputs."""
    model = create_model(
        model_name,
        img_size=img_size,
        num_classes=1000,
        dtype=dtype,
        attention_impl=attention_impl,
    )
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, images):
        return jnp.mean(nnx.merge(graphdef, params)(images) ** 2)

    images = jnp.ones((batch, img_size, img_size, 3), jnp.float32)
    return jax.jit(jax.grad(loss)), params, images


def attention(args: argparse.Namespace) -> dict:
    results = {}
    fused = "xla" if jax.default_backend() == "cpu" else None  # None: cuDNN/TPU kernels
    for name, impl in (("dot_product_attention", fused), ("einsum_softmax", "einsum")):
        fn, params, images = train_like_step(
            args.model, args.batch, args.img_size, args.dtype, impl
        )
        results[name] = time_call(fn, params, images, repeats=args.repeats)
    fastest = min(results, key=results.get)
    return {
        "model": args.model,
        "batch": args.batch,
        "img_size": args.img_size,
        "dtype": args.dtype,
        "backend": jax.default_backend(),
        "seconds": results,
        "fastest": fastest,
        "einsum_over_fused": results["einsum_softmax"] / results["dot_product_attention"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["attention"])
    parser.add_argument("--model", default="ViT-B/16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(attention(args), indent=2))


if __name__ == "__main__":
    main()
