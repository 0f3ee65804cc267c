"""Fused numerical ops: the vocab-parallel LM head with reverse KL / log-prob / entropy.

``fused_kl_head`` and ``vocab_parallel_logprob_entropy`` live in ``fused_kl_head.py``; the
context-parallel attention fallback is added here by its owner.
"""

from sdpg_mcore.ops.fused_kl_head import fused_kl_head, vocab_parallel_logprob_entropy

__all__ = ["fused_kl_head", "vocab_parallel_logprob_entropy"]
