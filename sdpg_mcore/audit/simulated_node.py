"""Run an entry point as on a node with N GPUs, on a CPU-only machine: for start-up decisions only.

``torch.cuda.is_available()`` answers True and ``torch.cuda.device_count()`` answers N; nothing
else is simulated, so the command must decide (and stop) before any CUDA work: ``sdpg-train``'s
start-up checks (servers on trainer GPUs, ``model.transformer_impl=te``) and the process-group
binding (``parallel.state.device_binding``) read exactly these two answers. A command that goes on
to touch a device fails as torch does without CUDA.

    python -m sdpg_mcore.audit.simulated_node --gpus 8 -m sdpg_mcore.cli --config r.yaml rollout.backend=sglang
"""

from __future__ import annotations

import argparse
import contextlib
import runpy
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def simulated_gpus(count: int) -> Iterator[None]:
    """Inside the block torch reports ``count`` CUDA devices (0: none)."""
    import torch

    saved = torch.cuda.is_available, torch.cuda.device_count
    torch.cuda.is_available = lambda: count > 0
    torch.cuda.device_count = lambda: count
    try:
        yield
    finally:
        torch.cuda.is_available, torch.cuda.device_count = saved


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("-m") + 2 if "-m" in argv else len(argv)  # the module's own arguments follow it
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, required=True, help="GPUs the node pretends to have")
    parser.add_argument(
        "-m", dest="module", required=True, help="module to run as __main__; its arguments follow"
    )
    args = parser.parse_args(argv[:cut])
    sys.argv = [args.module, *argv[cut:]]
    with simulated_gpus(args.gpus):
        try:
            runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
