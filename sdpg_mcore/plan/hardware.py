"""The machines the step-time model runs on, as data, and the few efficiency factors it applies to all.

A prediction is physics (FLOPs, bytes, messages) divided by a machine's peak rates (:class:`Hardware`)
times how much of a peak software reaches (:class:`Efficiency`). The efficiency factors are few, the
same for every prediction and every machine, and each says why it has its value; nothing is fitted to
the published runs the model is checked against (``sdpg_mcore/plan/published_runs.json``).

Peaks are datasheet numbers per device (dense, no sparsity). ``cpu`` is this project's test machine,
measured by ``python tools/plan.py --calibrate-cpu`` (a 1024-square fp32 matmul, a 256 MiB copy and a
copy into freshly allocated memory); rerun it on another CPU and pass the numbers with ``--hardware``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9
TFLOPS = 1e12


@dataclass(frozen=True)
class Hardware:
    """Peak rates of one device and the links around it."""

    name: str
    peak_flops: float
    """Dense bf16 tensor-core FLOP/s (fp32 matmul FLOP/s for ``cpu``)."""
    memory_bytes_per_s: float
    """Device memory (HBM) bandwidth."""
    memory_bytes: float
    """Device memory capacity."""
    nvlink_bytes_per_s: float
    """Intra-node bandwidth per device, one direction (NVLink)."""
    network_bytes_per_s: float
    """Inter-node bandwidth per device, one direction (its own NIC)."""
    host_link_bytes_per_s: float
    """Pinned host<->device DMA per device while every device of the node copies at once (PCIe)."""
    pageable_copy_bytes_per_s: float
    """A device->host copy into freshly allocated pageable host memory: the driver stages it through a
    pinned buffer and the CPU copies it on, page-faulting every new page (``tensor.to("cpu")``)."""
    source: str


#: PCIe Gen5 x16 is 64 GB/s per direction; in a DGX H100/H200 two GPUs share one switch uplink to a CPU.
_GEN5_SHARED = 32 * GB
#: SGLang PR #32032 measured pageable device->host offload at ~2.8 GB/s on an H200 node (PCIe Gen5 x16,
#: "an order of magnitude below PCIe bandwidth"): the host's page faults and CPU copy, not the link, set it.
_PAGEABLE = 2.8 * GB

HARDWARE: dict[str, Hardware] = {
    "h100": Hardware(
        name="NVIDIA H100 SXM5 80GB (DGX H100)",
        peak_flops=989.4 * TFLOPS,
        memory_bytes_per_s=3.35e12,
        memory_bytes=80 * GB,
        nvlink_bytes_per_s=450 * GB,
        network_bytes_per_s=50 * GB,
        host_link_bytes_per_s=_GEN5_SHARED,
        pageable_copy_bytes_per_s=_PAGEABLE,
        source="NVIDIA H100 datasheet (SXM5: 1,979 TFLOPS bf16 with sparsity = 989 dense, HBM3 3.35 TB/s, "
        "NVLink 900 GB/s bidirectional); DGX H100 user guide (8x ConnectX-7 400 Gb/s, one per GPU)",
    ),
    "h200": Hardware(
        name="NVIDIA H200 SXM 141GB (DGX H200)",
        peak_flops=989.4 * TFLOPS,
        memory_bytes_per_s=4.8e12,
        memory_bytes=141 * GB,
        nvlink_bytes_per_s=450 * GB,
        network_bytes_per_s=50 * GB,
        host_link_bytes_per_s=_GEN5_SHARED,
        pageable_copy_bytes_per_s=_PAGEABLE,
        source="NVIDIA H200 datasheet (989 TFLOPS dense bf16, HBM3e 4.8 TB/s, 141 GB, NVLink 900 GB/s); "
        "DGX H200 (8x ConnectX-7 400 Gb/s)",
    ),
    "a100": Hardware(
        name="NVIDIA A100 SXM4 80GB (DGX A100)",
        peak_flops=312 * TFLOPS,
        memory_bytes_per_s=2.039e12,
        memory_bytes=80 * GB,
        nvlink_bytes_per_s=300 * GB,
        network_bytes_per_s=25 * GB,
        host_link_bytes_per_s=16 * GB,
        pageable_copy_bytes_per_s=_PAGEABLE,
        source="NVIDIA A100 datasheet (312 TFLOPS bf16, HBM2e 2,039 GB/s, NVLink 600 GB/s bidirectional); "
        "DGX A100 (8x ConnectX-6 HDR 200 Gb/s; PCIe Gen4 x16 = 32 GB/s shared by two GPUs per switch)",
    ),
    "cpu": Hardware(
        name="CPU (this project's 2-core test machine, fp32)",
        peak_flops=16.7e9,
        memory_bytes_per_s=4.49e9,
        memory_bytes=24 * GB,
        nvlink_bytes_per_s=4.49e9,
        network_bytes_per_s=4.49e9,
        host_link_bytes_per_s=4.49e9,
        pageable_copy_bytes_per_s=0.31e9,
        source="measured by python tools/plan.py --calibrate-cpu (AMD EPYC, 2 cores, torch 2.13, fp32) while "
        "other jobs shared the cores (load ~12); --against-bench recalibrates in the same minute as it compares",
    ),
}


@dataclass(frozen=True)
class Efficiency:
    """How much of a peak software reaches; one set for every prediction (module docstring)."""

    gemm: float = 0.5
    """Fraction of peak FLOP/s that a transformer layer's matmuls and attention reach, communication and
    pipeline bubbles excluded (they are modelled). Megatron-Core reaches up to 47 % end-to-end MFU on
    H100 with those included (Megatron-LM README) and Llama 3 405B trained at 38-43 % (arXiv 2407.21783):
    the compute alone runs somewhat above the best end-to-end figure."""
    memory: float = 0.8
    """Fraction of memory bandwidth a streaming kernel reaches (decode's weight and KV-cache reads, the
    LM head's elementwise passes, the optimizer): STREAM-like kernels reach 80-90 % of HBM peak."""
    link: float = 0.8
    """Fraction of a link's bandwidth a large NCCL collective or DMA reaches (nccl-tests bus bandwidth
    on NVLink and 400 Gb/s InfiniBand, pinned PCIe copies: 80-90 %)."""
    collective_latency_s: float = 20e-6
    """Fixed cost of one collective call (NCCL small-message latency, intra-node 10-25 us)."""
    decode_step_s: float = 1e-3
    """Fixed cost of one decode iteration of an inference engine beyond its kernels: scheduling, sampling,
    launches under CUDA graphs. Check: vLLM decodes one Llama-3.1-8B stream on an A100 40GB at 75
    tokens/s, 77 % of the bandwidth ceiling (J. Musgrave, "vLLM throughput-latency sweep on NVIDIA
    A100", vLLM 0.23); 16.1 GB of weights at ``memory`` x 1,555 GB/s plus 1 ms gives 72 tokens/s."""


EFFICIENCY = Efficiency()


def hardware(name: str, **overrides: float) -> Hardware:
    """A named entry of :data:`HARDWARE`, with fields replaced (e.g. a recalibrated ``cpu``)."""
    if name not in HARDWARE:
        raise ValueError(f"--hardware {name!r} is unknown; choose one of {', '.join(HARDWARE)}")
    return replace(HARDWARE[name], **overrides) if overrides else HARDWARE[name]
