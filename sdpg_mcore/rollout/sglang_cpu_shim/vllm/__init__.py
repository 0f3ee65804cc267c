"""Stand-in for the one piece of vLLM that SGLang 0.5.23 imports on a CUDA-less generic platform.

SGLang's ``RotaryEmbedding`` (``sglang/srt/layers/rotary_embedding/base.py``) imports
``vllm._custom_ops.rotary_embedding`` when the platform is neither CUDA, HIP, XPU, NPU, MUSA nor its
sgl-kernel CPU engine. This package is only ever on the PYTHONPATH of a real SGLang server that the
project launches with ``--device cpu`` (``sdpg_mcore.rollout.sglang_launch``); never install it.
"""
