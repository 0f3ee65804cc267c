"""Stage ``llama70b_layer``: one SDPG step of Llama-3.3-70B's layer shape, two layers deep, on one GPU.

Hidden 8,192, 64 query and 8 KV heads of 128, intermediate 28,672, vocabulary 128,256 (the head's
``[V, H]`` weight at full size, tied to the embedding so that weights, fp32 gradients and Adam
states of the 2.76 B parameters fit one 80 GB GPU: 50 GB), with the Transformer-Engine spec when TE
imports (``model.transformer_impl=auto``; reported). The same step and the same fixed limits as
``sdpg_step`` (``sdpg_step.run_shape``: fp64 ``transformers`` reference log-probs, finite metrics, the
peak against ``sdpg_mcore.plan``), without the colocated turn (its host copies would need 76 GB of
host memory at this size). ``--cpu``: the same ratios (GQA 8:1, intermediate 3.5 x hidden) at
hidden 64.
"""

from __future__ import annotations

from sdpg_mcore.audit.gpu_check.sdpg_step import run_shape

LLAMA70B_TWO_LAYERS = dict(
    hidden_size=8192, num_hidden_layers=2, vocab_size=128256, num_attention_heads=64, num_key_value_heads=8,
    head_dim=128, intermediate_size=28672, max_position_embeddings=8192, rope_theta=500000.0,
    tie_word_embeddings=True,
)  # fmt: skip
CPU_SHAPE = dict(
    hidden_size=64, num_hidden_layers=2, vocab_size=1024, num_attention_heads=8, num_key_value_heads=1,
    head_dim=8, intermediate_size=224, max_position_embeddings=4096, rope_theta=500000.0,
    tie_word_embeddings=True, initializer_range=0.125,
)  # fmt: skip


def run(cpu: bool) -> dict:
    lengths = (16, 8, 24) if cpu else (128, 64, 512)
    shape = CPU_SHAPE if cpu else LLAMA70B_TWO_LAYERS
    return run_shape("llama", shape, cpu, lengths=lengths, steps=1, colocated=False)
