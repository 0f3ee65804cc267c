"""Step-time inputs from a recipe (``examples/*/recipe.yaml``) plus what a recipe cannot know.

A recipe fixes the batch (``data.batch_prompts`` x ``rollout.n``, ``mini_batch_prompts``), the caps
(``max_prompt_length``, ``max_response_length``), the micro-batch budget, recompute, overlap flags, the
algorithm's passes, the weight-sync transport and the fused head's kernels (``trainer.logprob_backend``
as it resolves on a GPU: auto is triton). It cannot know how long the responses will be; those
are :class:`Assumptions` with stated defaults, printed with every prediction:

- mean prompt: 1/8 of ``max_prompt_length`` (DAPO-Math prompts with their instruction and chat template
  are ~150-250 tokens against a 2,048 cap);
- mean response: 1/3 of ``max_response_length`` (with the default 2 % truncated share, the rest of the
  responses then have the exponential tail of an RL run whose clip ratio is a few percent);
- teacher context: 64 tokens (SDPG's privileged context is the reference answer and a sentence around it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from sdpg_mcore.plan.lengths import DEFAULT_TRUNCATED, ResponseLengths
from sdpg_mcore.plan.workload import (
    HEAD_BACKENDS_ON_GPU,
    SDPG_MCORE,
    Implementation,
    Rollout,
    TrainSettings,
    Workload,
    with_head_backend,
    with_head_bytes,
    with_sync,
)

DEFAULT_TEACHER_EXTRA = 64.0


@dataclass(frozen=True)
class Assumptions:
    """What the recipe does not say (module docstring); None: the stated default."""

    mean_prompt_len: float | None = None
    mean_response_len: float | None = None
    teacher_extra_len: float = DEFAULT_TEACHER_EXTRA
    truncated: float = DEFAULT_TRUNCATED
    head_bytes: float | None = None
    """The train head's elementwise bytes per (token, vocabulary) pair, student + teacher (None: those
    of the recipe's ``trainer.logprob_backend`` on a GPU, ``workload.FUSED_HEAD_BYTES``)."""


@dataclass(frozen=True)
class RecipeTiming:
    """Everything :func:`~sdpg_mcore.plan.step_time.predict_step` needs besides the layout and machine."""

    work: Workload
    settings: TrainSettings
    rollout: Rollout
    impl: Implementation
    assumed: dict


def _needs(algorithm: dict) -> tuple[bool, bool]:
    """(teacher pass, reference pass) of the recipe's algorithm, with the algorithms' own defaults."""
    name = algorithm.get("name", "sdpg")
    if name == "sdpg":
        return float(algorithm.get("beta", 1e-3)) != 0, float(algorithm.get("alpha", 1e-3)) != 0
    if name == "grpo":
        return False, float(algorithm.get("kl_penalty_coef", 1e-3)) != 0
    if name == "dapo":
        return False, False
    raise ValueError(f"algorithm.name={name!r}: the step-time model covers sdpg, grpo and dapo")


def recipe_timing(
    recipe: dict,
    *,
    max_prompt_len: int,
    max_response_len: int,
    micro_batch_tokens: int,
    recompute: str,
    rollout: Rollout,
    assume: Assumptions = Assumptions(),
) -> RecipeTiming:
    """The step of ``recipe`` (a parsed YAML dict; caps and budgets already resolved by the caller)."""
    data, ro, par, trainer = (recipe.get(k) or {} for k in ("data", "rollout", "parallel", "trainer"))
    teacher, reference = _needs(recipe.get("algorithm") or {})
    prompts = int(data.get("batch_prompts", 128))
    mini = int(data.get("mini_batch_prompts", prompts))
    if prompts % mini:
        raise ValueError(f"data.mini_batch_prompts={mini} must divide data.batch_prompts={prompts}")
    prompt_len = assume.mean_prompt_len or max_prompt_len / 8
    response_len = assume.mean_response_len or max_response_len / 3
    work = Workload(
        prompts=prompts,
        n=int(ro.get("n", 8)),
        prompt_len=prompt_len,
        lengths=ResponseLengths(response_len, max_response_len, assume.truncated),
        teacher_extra_len=assume.teacher_extra_len if teacher else 0.0,
        teacher_pass=teacher,
        reference_pass=reference,
        mini_batches=prompts // mini,
    )
    settings = TrainSettings(
        micro_batch_tokens=micro_batch_tokens,
        recompute=recompute,
        sequence_parallel=bool(par.get("sequence_parallel", False)),  # the config's defaults
        overlap_grad_reduce=bool(par.get("overlap_grad_reduce", True)),
        overlap_param_gather=bool(par.get("overlap_param_gather", True)),
        teacher_states_host=trainer.get("teacher_states") == "host",
        teacher_weights=str((recipe.get("algorithm") or {}).get("teacher", "policy"))
        if teacher
        else "policy",
        ema_weights_host=trainer.get("ema_weights", "host") == "host",
    )
    rollout = replace(
        rollout, async_steps=int(ro.get("async_steps", 0)), bucket_bytes=int(ro.get("bucket_mb", 512)) << 20
    )
    backend = trainer.get("logprob_backend", "auto")
    impl = with_sync(with_head_backend(SDPG_MCORE, backend), rollout, ro.get("weight_sync", "disk"))
    if trainer.get("reference_weights") == "separate_model":
        impl = replace(impl, reference_swap="resident")
    if assume.head_bytes is not None:
        impl = with_head_bytes(impl, assume.head_bytes)
    assumed = {
        "mean_prompt_len": prompt_len,
        "mean_response_len": response_len,
        "teacher_extra_len": work.teacher_extra_len,
        "truncated_share": assume.truncated,
        "head_backend": HEAD_BACKENDS_ON_GPU[backend],
        "head_bytes_per_pair": impl.head_bytes_train + (impl.head_bytes_teacher if teacher else 0.0),
        "rollout": asdict(rollout),
        "weight_sync": impl.weight_sync,
    }
    return RecipeTiming(work=work, settings=settings, rollout=rollout, impl=impl, assumed=assumed)
