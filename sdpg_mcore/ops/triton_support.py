"""The one place that imports Triton (an optional dependency: ``pip install 'sdpg_mcore[triton]'``).

Triton runs its kernels on CUDA tensors, or on CPU tensors under its interpreter
(``TRITON_INTERPRET=1`` in the environment before the kernels are defined, i.e. before
``sdpg_mcore.ops.kl_head_kernels`` is first imported; the tests and ``tools/bench_kl.py --count``
do that). Everything else asks this module whether it can run, and imports the kernels only then.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: ImportError | None = None
except ImportError as err:  # the fallback: the torch path of every op that has a Triton one
    triton = tl = None
    IMPORT_ERROR = err

__all__ = [
    "IMPORT_ERROR",
    "can_run",
    "interpreter_module",
    "interpreting",
    "tl",
    "triton",
    "unavailable_reason",
]


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def unavailable_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` (None: they can)."""
    if triton is None:
        return f"the triton package is not importable ({IMPORT_ERROR}); pip install 'sdpg_mcore[triton]'"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return (
        f"Triton kernels need CUDA tensors (got {device.type}); on CPU only under Triton's "
        "interpreter, with TRITON_INTERPRET=1 set before the kernels are first imported"
    )


def can_run(device: torch.device) -> bool:
    """Triton is importable and can run kernels on ``device``."""
    return unavailable_reason(device) is None


def interpreter_module():
    """Triton's interpreter (``triton.runtime.interpreter``), for counting its loads and stores
    (``ops.kl_head_traffic``)."""
    if triton is None:
        raise RuntimeError(
            f"the triton package is not importable ({IMPORT_ERROR}); pip install 'sdpg_mcore[triton]'"
        )
    if not interpreting():
        raise RuntimeError(
            "Triton's interpreter is off: set TRITON_INTERPRET=1 before the kernels are imported"
        )
    import triton.runtime.interpreter as interpreter

    return interpreter
