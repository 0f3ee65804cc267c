"""Triton's kernels run here on CPU tensors under its interpreter.

``TRITON_INTERPRET=1`` must be in the environment before the kernels are defined, i.e. before
``sdpg_mcore.ops.kl_head_kernels`` is first imported; nothing imports it before a test asks for
``backend="triton"`` (``kl_head_backends`` imports it lazily), so setting it when this directory's
tests are collected is early enough, and the gloo ranks these tests spawn inherit it. Only where no
GPU is visible: on a GPU machine the same tests run the compiled kernels on CUDA tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
