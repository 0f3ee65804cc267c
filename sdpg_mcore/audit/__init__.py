"""Audits that run GPU code paths on a CPU-only machine (``fake_cuda``)."""
