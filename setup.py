"""sdpg_mcore: a Megatron-Core backend for RL post-training with SDPG (Self-Distilled Policy Gradient).

CPU install (this is what the README and CI do; the torch wheel is pinned because an open range
pulls a multi-GB CUDA build):

    python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e '.[dev]'

Clusters install their own CUDA torch first; the ranges below then leave it alone.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.8",  # torch.mm(out_dtype=float32) for bf16 operands: the fused head's fp32 logits on CUDA
    "megatron-core==0.16.1",  # newest release that supports Python 3.11
    "transformers>=4.56,<6",
    "tokenizers>=0.21",
    "safetensors>=0.5",
    "datasets>=3.0",
    "pyyaml>=6.0",
    "rich>=13.0",
    "tensorboard>=2.16",
    "psutil>=5.9",  # dist_checkpointing hangs on save without it
    "math-verify>=0.7",
    "aiohttp>=3.9",
    "sglang-router>=0.2",  # the real router; pure Rust/Python wheel, runs without torch
    "matplotlib>=3.8",
    "numpy>=1.26",
]

TRITON = "triton>=3.3"  # the fused KL head's kernels; tested with 3.9.0 (interpreter and sm_90/sm_80 builds)
# Optional metrics sink: train/metrics_log.py imports it in one place and skips wandb when it is missing;
# offline mode when there is no API key.
WANDB = ["wandb>=0.18"]

EXTRAS = {
    # triton in dev: the kernels' tests run on CPU under Triton's interpreter (~290 MB wheel, ~30 s);
    # wandb in dev: the tests run it offline
    "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "ruff>=0.6", TRITON, *WANDB],
    "triton": [TRITON],  # CUDA torch wheels bring it already
    "sglang": ["sglang>=0.5.21", "sglang-router>=0.2"],  # weight-update sessions; checked at start-up
    "te": ["transformer-engine[pytorch]>=2.0"],
    "wandb": WANDB,
}

setup(
    name="sdpg_mcore",
    version="0.1.0",
    description="Megatron-Core backend for Self-Distilled Policy Gradient RL post-training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(
        include=["sdpg_mcore", "sdpg_mcore.*", "checkpoints_convert", "checkpoints_convert.*"]
    ),
    package_data={"sdpg_mcore.plan": ["published_runs.json"]},  # the step-time model's validation data
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["sdpg-train=sdpg_mcore.cli:main"]},
)
