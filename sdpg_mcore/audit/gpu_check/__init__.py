"""Stage logic of the prepared GPU check (``tools/gpu_check.sh``), one module per stage with
``run(cpu: bool) -> dict`` (``cpu``: the same plumbing on CPU with small shapes), and what they share.

- ``common``: progress and phase lines with timestamps, partial results to ``$OUT``, the stack dump a
  few seconds before a stage's limit, ``torch.compile`` time.
- ``step_checks``: the fixed limits the step stages are held to (pure judgements, tested on broken
  inputs).
- ``nccl``: the trainer's process groups on every visible GPU (binding, collectives).
- ``sdpg_step``: two SDPG steps of a Qwen3-width model against an fp64 ``transformers`` reference,
  the planner, and the colocated offload.
- ``llama70b_layer``: one SDPG step at Llama-3.3-70B's layer shape, two layers, TE spec when present.
- ``head_fp64``: both fused heads against fp64 at a fixed tolerance (``audit.head_check``).
- ``parity``: Megatron vs ``transformers`` logits at 1e-4, the bound the parity tests hold (``checkpoints_convert/README.md``).
- ``bench_kl``: ``tools/bench_kl.py`` with kernel tables, last.
- ``driver``: each stage in its own process and time limit, its JSON to ``$OUT`` as it finishes.
"""
