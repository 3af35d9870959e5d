"""Installs vit_jax: Vision Transformers in JAX/Flax NNX."""

from setuptools import find_packages, setup

# The one jax version range: the base install and every accelerator extra below use it.
JAX_VERSIONS = ">=0.10,<0.11"

setup(
    name="vit_jax",
    version="0.1.0",
    description="Vision Transformers in JAX/Flax NNX: pre-training, fine-tuning, model zoo.",
    packages=find_packages(include=["vit_jax", "vit_jax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=[
        f"jax{JAX_VERSIONS}",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.6,<0.3",
        "tensorflow-cpu>=2.20,<2.22",
        "tensorflow-datasets>=4.9.9,<5",
        "ml_collections>=1.0,<2",
        "orbax-checkpoint>=0.12,<0.13",
        "clu>=0.0.12,<0.1",
        "tensorboard>=2.20,<2.22",
        "scikit-learn>=1.5,<2",
        "numpy>=1.26,<3",
        "pillow>=10",
        "matplotlib>=3.8,<4",
        # gs:// workdirs, checkpoints and data listings (vit_jax.storage, through etils.epath)
        "gcsfs>=2025.1",
    ],
    entry_points={"console_scripts": ["vit-jax=vit_jax.cli:entry"]},
    extras_require={
        # Accelerator builds of the same jax: jax's own extras bring the matching jaxlib and
        # libtpu (Cloud TPU VM) or CUDA plugin with its CUDA libraries (NVIDIA GPUs).
        "tpu": [f"jax[tpu]{JAX_VERSIONS}"],
        "cuda12": [f"jax[cuda12]{JAX_VERSIONS}"],
        "cuda13": [f"jax[cuda13]{JAX_VERSIONS}"],
        "test": [
            "pytest>=8,<10",
            "hypothesis>=6.100,<7",
            "pytest-xdist>=3.5,<4",
            "ruff>=0.6",
            # a Cloud Storage server on localhost for the bucket tests (no network, no Docker)
            "gcp-storage-emulator>=2026.7,<2027",
            # PyTorch interop: files written by save_npz load in timm with identical logits.
            "torch>=2.14,<2.15",
            "torchvision>=0.29,<0.30",
            "timm>=1.0.31,<2",
        ],
    },
)
