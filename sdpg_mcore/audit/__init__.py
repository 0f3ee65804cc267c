"""Checks of the GPU code paths, and the synthetic step inputs they and the step tests share.

- ``fake_cuda``: tensors that claim ``cuda:0`` on a CPU-only torch, and the host syncs they see;
- ``device_audit`` (with ``fake_step``, ``construction`` and ``colocated``): one training step with the model on the
  fake GPU, reported by ``tools/device_audit.py``;
- ``gpu_check``: the prepared check for a real GPU, one module per stage (``tools/gpu_check.sh``);
- ``synthetic``: the one builder of a scored batch and the trainer's step context, used by the audit,
  the GPU check, ``tools/bench_step.py`` and ``tests/train/steplib.py``.
"""
