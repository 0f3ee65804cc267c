"""sdpg_mcore: Self-Distilled Policy Gradient on Megatron-Core (see README.md and sdpg_mcore/README.md)."""

__version__ = "0.1.0"
