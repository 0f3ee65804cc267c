"""Stage ``env``: torch, CUDA, NCCL and megatron-core versions, the layer spec the run gets (and why),
and the device binding of local rank 0; not ok without a GPU in GPU mode (the run would test nothing)."""

from __future__ import annotations


def run(cpu: bool) -> dict:
    import torch

    from sdpg_mcore.models.spec import te_status
    from sdpg_mcore.parallel.state import device_binding, visible_gpu_count

    te, found = te_status()
    gpus = visible_gpu_count()
    out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "gpus": gpus,
           "te_spec": te, "te": found, "rank0_binding": str(device_binding(0, gpus))}  # fmt: skip
    try:
        import megatron.core

        out["megatron_core"] = getattr(megatron.core, "__version__", "?")
    except ImportError as err:
        out["megatron_core"] = f"missing: {err}"
    problems = []
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        a = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
        out["mm_out_dtype_fp32"] = str(torch.mm(a, a, out_dtype=torch.float32).dtype)
    elif not cpu:
        problems.append("no CUDA device is visible: the GPU check would test nothing")
    return out | {"problems": problems, "ok": not problems}
