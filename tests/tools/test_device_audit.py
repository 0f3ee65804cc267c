"""``tools/device_audit.py`` (``sdpg_mcore.audit.device_audit``): one SDPG step on a fake GPU is clean,
and the audit sees what it must.

Each audit runs in a fresh interpreter (it owns the process group and patches Megatron for the
audit's lifetime).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _audit(
    tmp_path: Path, prelude: str = "", teacher_states: str = "device", teacher: str = "policy"
) -> dict:
    out = tmp_path / "audit.json"
    code = (
        "import json\nfrom sdpg_mcore.audit.device_audit import run_audit\n"
        f"{prelude}\n"
        f"r = run_audit('sdpg', {teacher_states!r}, teacher={teacher!r})\n"
        f"open({str(out)!r}, 'w').write(json.dumps(r))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("teacher_states,head_backend", [("device", "triton"), ("host", "torch")])
def test_sdpg_step_is_device_clean_with_only_the_needed_host_syncs(tmp_path, teacher_states, head_backend):
    """No device mix, no collective on a host tensor, and the host syncs are the documented ones:
    the loss normalisers once per mini-batch (2 here) and the metrics reduce once per step. With
    ``trainer.teacher_states=host`` the teacher states' trips to pinned host memory and back add none.
    Both heads: the Triton one's launches get GPU tensors only (its kernels cannot run on fake ones)."""
    proc = subprocess.run(
        [sys.executable, "tools/device_audit.py", "--teacher-states", teacher_states, "--head-backend",
         head_backend, "--json", str(tmp_path / "a.json")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    result = json.loads((tmp_path / "a.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "CLEAN" in proc.stdout and result["clean"] and "stopped_at" not in result
    assert result["violations"] == [] and result["unexpected_host_syncs"] == {}
    by_site = {sync.rsplit(" ", 1)[-1]: n for sync, n in result["host_syncs"].items()}
    assert by_site == {"normalisers_from_counts": 2, "reduce": 2}
    # host: the states really went through the (pinned) buffer: the larger mini-batch's 58 rows of
    # H=64 bf16, rounded up to a power of two elements.
    assert result["host_teacher_state_bytes"] == (4096 * 2 if teacher_states == "host" else 0)
    assert (result["triton_launches"] > 0) == (head_backend == "triton")  # each head really ran
    # The trainer's model construction (build_model) with a GPU available: all 19 tensors of the
    # 2-layer Qwen3 stage (norms and qk-norms included) on the device.
    assert result["construction"]["tensors"] == 19 and result["construction"]["off_device"] == []
    # The colocated turn (train/colocate.py) freed and restored every weight on the fake GPU through
    # pinned non-blocking copies (no host sync above): the bf16 weights of the 2-layer stage.
    assert result["colocated"]["offloaded_bytes"] == result["colocated"]["restored_bytes"] > 200_000


@pytest.mark.parametrize("teacher, ema_weights", [("ema", "host"), ("ema", "device"), ("initial", "host")])
def test_guarded_teacher_steps_are_device_clean(tmp_path, teacher, ema_weights):
    """``algorithm.teacher=ema | initial``: the weights swapped in for every teacher pass (the average
    from pinned host memory or from the device; the frozen initial weights from pinned host memory),
    the teacher's own output layer in the fused head, and the average's update after every optimizer
    step add no host sync and no device mix: the syncs are those of ``teacher=policy``."""
    out = tmp_path / "a.json"
    proc = subprocess.run(
        [sys.executable, "tools/device_audit.py", "--teacher", teacher, "--ema-weights", ema_weights, "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert result["clean"] and "stopped_at" not in result and result["teacher"] == teacher
    by_site = {sync.rsplit(" ", 1)[-1]: n for sync, n in result["host_syncs"].items()}
    assert by_site == {"normalisers_from_counts": 2, "reduce": 2}


def test_audit_catches_a_builder_that_leaves_the_norms_on_the_host(tmp_path):
    """The builder before the GPU run's fix (no ``model.cuda(current_device())``): Megatron's linear
    layers on the GPU, the local spec's torch RMSNorms on the host — the GPU's first forward died
    with "weight is on cpu ... _fused_rms_norm". The construction check reports each of them."""
    prelude = (
        "from sdpg_mcore.models import builder\nbuilder._on_megatron_device = lambda model, config: model\n"
    )
    result = _audit(tmp_path, prelude)
    assert not result["clean"]
    off = result["construction"]["off_device"]
    assert len(off) == 9 and all(name.endswith("layernorm.weight on cpu") for name in off), off
    assert any("not on cuda:0" in v for v in result["violations"])


def test_audit_catches_a_micro_batch_left_on_the_host(tmp_path):
    """The audit is not blind: a micro-batch never moved to the device stops the step with the
    device mismatch a GPU would raise, at the model call."""
    result = _audit(
        tmp_path, "from sdpg_mcore.train.batch import MicroBatch; MicroBatch.to = lambda self, d: self"
    )
    assert not result["clean"]
    assert "FakeTensorDeviceMismatchError" in result["stopped_at"]
    assert "forward.py" in result["stopped_at"]


def test_audit_reports_a_pageable_upload_as_a_host_sync(tmp_path):
    """A host->device copy from pageable memory is reported (and makes the step not clean)."""
    prelude = (
        "import torch\nfrom sdpg_mcore.train import batch\nbatch.to_device = lambda x, device: x.to(device)\n"
    )
    result = _audit(tmp_path, prelude)
    assert not result["clean"] and not result["violations"]
    assert any("synchronous host-to-device copy" in s for s in result["unexpected_host_syncs"])


def test_audit_catches_host_teacher_states_left_on_the_host(tmp_path):
    """``teacher_states=host`` without the copy back before the student forward: the fused head
    meets host teacher states next to device student states and stops, as a GPU would."""
    prelude = "from sdpg_mcore.train import forward\nforward.teacher_states_to_device = lambda mb: mb\n"
    result = _audit(tmp_path, prelude, teacher_states="host")
    assert not result["clean"]
    assert "FakeTensorDeviceMismatchError" in result["stopped_at"]
    assert "kl_head_math.py" in result["stopped_at"]


def test_audit_reports_teacher_states_offloaded_to_pageable_memory(tmp_path):
    """A host buffer that is not pinned makes every teacher state's device-to-host copy a host sync."""
    prelude = (
        "import torch\nfrom sdpg_mcore.train import teacher_states as ts\n"
        "def _reserve(self, numel, like):\n"
        "    if self._flat is None or self._flat.numel() < numel:\n"
        "        self._flat = torch.empty(numel, dtype=like.dtype)\n"
        "ts.HostTeacherStates._reserve = _reserve\n"
    )
    result = _audit(tmp_path, prelude, teacher_states="host")
    assert not result["clean"] and not result["violations"]
    unexpected = list(result["unexpected_host_syncs"])
    assert unexpected and all("into pageable memory" in s and "teacher_states.py" in s for s in unexpected)


def test_audit_reports_a_colocated_offload_through_pageable_memory(tmp_path):
    """train/colocate.py with plain (pageable) host buffers: each copy out and back is a host sync."""
    prelude = (
        "from sdpg_mcore.train import colocate\noffload = colocate._Storages.offload\n"
        "colocate._Storages.offload = lambda self, pin: offload(self, False)\n"
    )
    result = _audit(tmp_path, prelude)
    assert not result["clean"] and not result["violations"]
    unexpected = list(result["unexpected_host_syncs"])
    assert any("into pageable memory" in s and "colocate.py" in s for s in unexpected), unexpected
    assert any("synchronous host-to-device copy" in s and "colocate.py" in s for s in unexpected), unexpected


def test_audit_catches_a_colocated_reload_that_leaves_storages_empty(tmp_path):
    prelude = "from sdpg_mcore.train import colocate\ncolocate._Storages.reload = lambda self, pin: None\n"
    result = _audit(tmp_path, prelude)
    assert not result["clean"]
    assert any("colocated reload restored" in v for v in result["violations"]), result["violations"]


@pytest.mark.slow
def test_audit_reports_an_ema_teacher_in_pageable_memory(tmp_path):
    """``ema_weights=host`` with buffers that are not pinned: the average's trips to the device and
    back and the parked live weights' become host syncs, each reported at the EMA's own line."""
    prelude = (
        "import torch\nfrom sdpg_mcore.train import ema_weights\n"
        "ema_weights._buffer = lambda numel, dtype, device, place: torch.empty(numel, dtype=dtype)\n"
    )
    result = _audit(tmp_path, prelude, teacher="ema")
    assert not result["clean"] and not result["violations"]
    unexpected = list(result["unexpected_host_syncs"])
    assert unexpected and all("ema_weights.py" in s for s in unexpected)
