"""Every option of a training run, as nested typed dataclasses; YAML recipes and ``a.b.c=value`` overrides.

A run is one :class:`Config` object. Recipes (``examples/*/sdpg.yaml``) set a subset of fields; the
command line overrides single fields with ``section.field=value``, parsed to the field's type. The
entry point calls :func:`load_config` once; it validates everything and raises :class:`ConfigError`
(a ``ValueError``) whose message names the key and lists the valid keys or choices. Code below the
entry point receives the typed section it needs (``cfg.algorithm``, ``cfg.rollout``,
``cfg.optimizer``...) or explicit values, never the whole config.

The ``algorithm:`` section is not a class of this module: ``name`` picks a registered algorithm and
the other keys parse straight into its typed config (``algo/config.py``), checked there.

    cfg = load_config("examples/tiny/sdpg.yaml", ["trainer.total_steps=20", "algorithm.name=grpo"])
    cfg.trainer.total_steps  # 20

Defaults are the paper's recipe (``algo/README.md``; Qwen3-4B, 128 prompts x 8 samples, mini-batch 16 prompts).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from sdpg_mcore.algo.config import AlgorithmConfigError, PolicyLossConfig, SDPGConfig
from sdpg_mcore.algo.registry import ALGORITHMS, algorithm_of

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A user mistake in a recipe or an override; the message names the key and the fix."""


@dataclass
class ModelConfig:
    path: str = ""
    """Hugging Face model directory (config.json, safetensors, tokenizer) the policy starts from."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Parameter and activation dtype of the trainer's model (fp32 master weights live in the optimizer)."""
    recompute_activations: bool = False
    """Recompute each transformer layer in backward (Megatron full recompute) to save activation memory."""
    transformer_impl: Literal["auto", "te", "local"] = "auto"
    """Transformer layer implementation: te (Transformer-Engine fused layers and flash attention; the
    run stops at start-up, naming this key, when TE is missing or broken), local (Megatron's torch
    layers: ``[s, s]`` attention scores, for CPU and debugging), auto (te when it imports on a GPU,
    else local, logged)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size: each rank holds 1/tp of every weight matrix and of the vocabulary."""
    pp: int = 1
    """Pipeline-parallel size: layers are split into pp stages, run with the 1F1B schedule."""
    cp: int = 1
    """Context-parallel size: each sequence is split across cp ranks."""
    dp: int = -1
    """Data-parallel size; -1 infers world_size / (tp*pp*cp). A set value must match the world size."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (tp > 1, Transformer-Engine spec): norm/dropout activations split over TP."""
    overlap_grad_reduce: bool = True
    """Reduce gradients bucket by bucket during the backward of the last micro-batch (Megatron DDP), not after it."""
    overlap_param_gather: bool = True
    """Distributed optimizer: all-gather updated weights bucket by bucket during the next forward instead of
    inside the optimizer step (forced complete before weight sync and checkpoints). Ignored without it."""
    gradient_accumulation_fusion: bool = True
    """Accumulate weight gradients straight into the fp32 main_grad inside the Transformer-Engine GEMMs
    (no bf16 grad + add per micro-batch). Needs Transformer Engine; ignored without it."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Training prompt files (parquet, jsonl or HF dataset dirs) with student/teacher prompts
    (``sdpg_mcore/data/README.md``)."""
    max_prompt_length: int = 2048
    """Longest student and teacher prompt in tokens (after the chat template); longer prompts are dropped
    or cut as ``filter_overlong_prompts`` says."""
    max_response_length: int = 4096
    """Longest generated response in tokens (``max_new_tokens`` of the rollout)."""
    batch_prompts: int = 128
    """Prompts per training step; each gets ``rollout.n`` responses."""
    mini_batch_prompts: int = 16
    """Prompts per optimizer step; a step makes batch_prompts / mini_batch_prompts optimizer steps."""
    micro_batch_tokens: int = 6144
    """Token budget (prompt + response) of one micro-batch per data-parallel rank."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (with ``seed``)."""
    seed: int = 1
    """Seed of the prompt sampler; the sampler position is saved in checkpoints."""
    enable_thinking: bool = True
    """Qwen3 chat template's ``enable_thinking`` for student and teacher prompts (the reference's 4B
    OPSD and DAPO scripts set it false)."""
    filter_overlong_prompts: bool = True
    """Drop prompts longer than max_prompt_length (counted, WARNING); false cuts their questions instead,
    never the teacher's context or the assistant header."""


@dataclass
class EvalConfig:
    files: list[str] = field(default_factory=list)
    """Held-out prompt files; each is reported as its own set (avg@k and pass@k per file)."""
    interval: int = 10
    """Evaluate every this many steps and after the last one; 0 disables evaluation."""
    n_samples: int = 32
    """k: samples per problem for avg@k and pass@k."""
    temperature: float = 1.0
    """Sampling temperature during evaluation."""
    max_prompts: int = 0
    """Evaluate at most this many prompts per file (0 = all)."""
    mechanism: bool = False
    """Also probe the self-distillation mechanism on the eval prompts (``train/mechanism.py``: teacher
    vs student accuracy and log-prob of the reference response, all-wrong share, KL on correct vs
    incorrect samples); needs TP = PP = CP = 1."""
    mechanism_sets: list[str] = field(default_factory=list)
    """With ``mechanism``: the eval sets (file names without the suffix, as the metrics name them) the
    probe runs on; empty: every set. The others get avg@k / pass@k only: the probe samples the teacher
    prompt too and runs the model on every sample, several times a plain evaluation's cost."""


@dataclass
class RolloutConfig:
    backend: Literal["builtin", "sglang", "external"] = "builtin"
    """builtin: the trainer starts the CPU dev servers; sglang: the trainer launches SGLang servers;
    external: servers are already running at ``urls``."""
    urls: list[str] = field(default_factory=list)
    """Server (or router) base URLs for backend=external, e.g. ``http://node1:30000``."""
    api_key_file: str = ""
    """backend=external: file (mode 0600) with the servers' API key, sent with every request as
    ``Authorization: Bearer``: the key alone on one line, or SGLang's ``--config`` YAML with an
    ``api-key`` entry. Empty: no key (anyone who reaches the servers can replace the weights).
    Launched servers (builtin, sglang) always get a fresh key per run, in RUN_DIR/secrets/."""
    num_servers: int = 1
    """Servers to start for builtin/sglang backends."""
    router: bool = False
    """Put the launched servers behind the SGLang router (sglang_router) and talk to the router."""
    n: int = 8
    """Responses generated per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature; also the temperature of the trainer's log-probs (``algo/README.md``)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups with all-equal rewards and generate more until the batch is full."""
    max_num_gen_batches: int = 10
    """Most generation rounds per step under dynamic sampling before training on what was kept."""
    weight_sync: Literal["disk", "distributed", "tensor"] = "disk"
    """How new weights reach the servers: HF safetensors on disk, NCCL/gloo broadcast in buckets
    (servers on their own devices), or tensor handles (``/update_weights_from_tensor``, colocated)."""
    tp_size: int = 1
    """Tensor-parallel size of each launched SGLang server (``--tp-size``); it then holds that many
    ranks of the weight-update group."""
    base_gpu_id: int | None = None
    """backend=sglang on GPUs: first GPU (as the trainer's rank 0 sees its node) of the servers it
    launches there; server i uses the ``tp_size`` GPUs from ``base_gpu_id + i * tp_size``. None: the
    GPUs after the trainer's own on that node (GPU 0 when colocated). Start-up refuses GPUs a
    trainer rank uses unless ``colocated`` (``rollout/placement.py``)."""
    mem_fraction_static: float | None = None
    """SGLang ``--mem-fraction-static`` of launched servers: the share of each GPU's memory for weights
    and KV cache. None: SGLang's own default on GPUs of their own, 0.5 when colocated (the trainer's
    residue and SGLang's activations share the rest; ``tools/plan.py`` checks it fits)."""
    colocated: bool = False
    """The engines share the trainer's devices: they release their memory after each rollout and
    resume it before the weight push (needs weight_sync=disk or tensor: NCCL refuses two ranks of
    one communicator on one GPU)."""
    bucket_mb: int = 512
    """Bucket size of the distributed weight sync, in MiB."""
    request_timeout_s: float = 600.0
    """Timeout of one generate request."""
    startup_timeout_s: float = 300.0
    """How long to wait for launched servers to answer /health."""
    watchdog_s: float = 60.0
    """Launched servers: one that has not answered ``/health`` for this long during a rollout is
    killed and restarted (``rollout/supervisor.py``); 0 turns the watchdog off. SGLang answers
    ``/health`` once its scheduler sends anything, so only a stuck server stays silent; raise it
    where servers are slow to answer under load (a CPU machine shared with other work)."""
    max_concurrency: int = 256
    """Most in-flight generate requests per server."""
    server_threads: int = 1
    """Torch threads of each built-in CPU dev server."""
    async_steps: int = 0
    """0: generate a step's responses, then train on them (synchronous). k >= 1: the rollout of the
    next step is generated while this one trains, from weights at most k versions older than the
    trainer's (``train/async_rollout.py``); the loss still uses the trainer's recomputed old log-probs
    and, by default, a truncated importance weight for the staleness (``algorithm.rollout_is_cap``)."""
    async_cpus: list[int] = field(default_factory=list)
    """CPU cores for rank 0's rollout thread under async_steps (HTTP client, scoring and the reward
    workers it starts); empty: the trainer process's cores. For a trainer pinned to its own cores,
    so that this work does not slow training down (e.g. ``tools/bench_async.py`` on 2 cores)."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    min_lr: float = 0.0
    """Final learning rate for decaying schedules."""
    lr_warmup_steps: int = 10
    """Linear LR warm-up, in optimizer steps."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Megatron OptimizerParamScheduler decay style after warm-up."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (Megatron distributed optimizer)."""


@dataclass
class TrainerConfig:
    total_steps: int = 400
    """Training steps (each: rollout of batch_prompts x n, then batch_prompts/mini_batch_prompts updates)."""
    run_dir: str = "runs/sdpg"
    """Where metrics, TensorBoard events, checkpoints and synced weights go."""
    seed: int = 42
    """Seed of model init, dropout and rollout sampling seeds."""
    save_interval: int = 50
    """Save a checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep on disk (0 = all)."""
    resume: str = "auto"
    """auto: resume from RUN_DIR/checkpoints/latest if present; none: start fresh; or a checkpoint path."""
    reference_weights: Literal["cpu_swap", "separate_model"] = "cpu_swap"
    """Reference policy for lp_ref: weights kept on CPU and swapped in, or a second resident model."""
    teacher_states: Literal["device", "host"] = "device"
    """Where sdpg's teacher hidden states wait between the teacher pass and the train pass: device
    keeps the whole mini-batch's share on the GPU (8 GiB/GPU for the 70B recipe, which fits: 63.5 of
    80 GiB, so no copies are paid); host moves each micro-batch's to pinned host memory and back
    (one micro-batch's on the GPU, the mini-batch's share in host RAM per GPU), for layouts where
    ``tools/plan.py`` says device does not fit."""
    ema_weights: Literal["device", "host"] = "host"
    """Where the EMA teacher's fp32 average of the weights lives (``algorithm.teacher=ema``;
    ``train/ema_weights.py``): device keeps it on the GPU (4 bytes per parameter of the rank, no
    copies); host keeps it in pinned host memory and streams it through the GPU one parameter at a
    time (8 bytes per parameter over PCIe per optimizer step and per teacher pass), for models whose
    average does not fit beside the training state (the 70B recipe: 16.4 GiB more per GPU, peak 85.5 of
    80 GiB: ``tools/plan.py --config examples/llama3_70b/recipe.yaml --nodes 4 --teacher ema
    --ema-weights device``). ``tools/plan.py`` counts either and advises host when device does not fit."""
    stop_at_step: int = 0
    """Stop after this step (0 = run to total_steps), e.g. for time-limited jobs; resume continues the run."""
    logprob_chunk_size: int = 1024
    """Tokens per chunk of the fused LM head (peak extra memory is chunk x vocab/tp)."""
    logprob_backend: Literal["auto", "torch", "triton"] = "auto"
    """Kernels of the fused LM head: triton (cuBLAS GEMMs and two fused Triton kernels per vocabulary
    block; needs a GPU and the triton package, checked at start-up), torch (aten ops per block, the
    CPU implementation), or auto: triton on a GPU when triton is importable, else torch."""
    nonfinite_patience: int = 0
    """Steps in a row with a non-finite loss or gradient (their updates skipped) before the run stops
    with an error; 0 stops at the first. Non-finite weights always stop the run at once."""
    rollout_deadline_s: float = 1800.0
    """Most seconds one rollout request batch may take, retries included; past it the supervisor
    restarts stuck or dead servers (re-pushing the weights) and the batch is generated again once."""


@dataclass
class RewardConfig:
    scorer: str = "auto"
    """Reward function: auto (by the record's data_source), or a registered scorer name."""
    strict: bool = False
    """Score exactly as the reference does (its data-source table, string-matching math_dapo scorer,
    math-verify/gsm8k 0/1 sources, error on unknown sources) instead of the default math scorer."""
    answer_format: Literal["answer_colon", "boxed"] = "answer_colon"
    """The reference's answer format: which math_dapo scorer strict mode uses, and ``boxed`` rewrites
    the DAPO prompts' Answer:-line instruction to the boxed one at load time (as the reference)."""
    overlong_penalty: bool = False
    """DAPO linear overlong penalty in the last ``overlong_buffer`` tokens before max_response_length."""
    overlong_buffer: int = 512
    """Length of the overlong-penalty ramp in tokens."""
    overlong_factor: float = 1.0
    """Penalty at max_response_length."""


@dataclass
class LoggingConfig:
    jsonl: bool = True
    """Write RUN_DIR/metrics.jsonl, one JSON object per step."""
    tensorboard: bool = True
    """Write TensorBoard events to RUN_DIR/tensorboard."""
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    """Weights & Biases mode; online falls back to offline when no API key is configured."""
    project: str = "sdpg_mcore"
    """wandb project name."""
    run_name: str = ""
    """Run name for wandb and the progress display (default: RUN_DIR's name)."""
    progress: bool = True
    """Rich progress bar with phase timings and ETA on rank 0."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Python logging level."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the policy is split over ranks."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training prompts and batch shapes."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation servers and sampling."""
    algorithm: PolicyLossConfig = field(default_factory=SDPGConfig)
    """Loss and its coefficients: ``algorithm.name`` picks a registered algorithm (``algo/registry.py``),
    every other key is a field of its typed config (``algo/config.py``, validated there)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and the LR schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Step count, run directory, checkpoints."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Verifier."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks."""


_FALSE = {"false", "no", "off", "0"}
_TRUE = {"true", "yes", "on", "1"}
_NONE = {"none", "null", "~"}


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(key: str, cls: type, prefix: str) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    valid = _fields(cls)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ";"
    where = f"under {prefix.rstrip('.')}" if prefix else "at top level"
    return ConfigError(f"unknown config key '{key}'{hint} valid keys {where}: {', '.join(valid)}")


def _convert(key: str, value: Any, tp: Any) -> Any:
    """Coerce ``value`` (a YAML value or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config key '{key}': cannot parse {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        text = value if not isinstance(value, str) else value.strip()
        if text not in choices:
            raise ConfigError(
                f"config key '{key}' got {value!r}; choose one of: {', '.join(map(str, choices))}"
            )
        return text
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            value = [value]
        return [_convert(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or isinstance(value, dict | list):
            raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {value!r}") from None
        if tp is float:
            return number
        if not number.is_integer():
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return int(value) if isinstance(value, int) else int(number)
    if tp is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported config type {tp!r} for {key}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}"
        )
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown_key(key, cls, prefix)
        tp = hints[name]
        if tp is PolicyLossConfig:
            kwargs[name] = algorithm_from_dict(value or {})
        elif _is_config(tp):
            kwargs[name] = _from_dict(tp, value or {}, f"{key}.")
        else:
            kwargs[name] = _convert(key, value, tp)
    return cls(**kwargs)


def _unknown_algorithm_key(name: str, algorithm: str, cls: type) -> ConfigError:
    owners = [n for n, a in ALGORITHMS.items() if name in _fields(a.config_cls)]
    if owners:
        problem = f"is not an option of algorithm.name={algorithm} (only of {', '.join(owners)}); remove it."
    else:
        close = difflib.get_close_matches(name, _fields(cls), n=1)
        problem = f"is unknown; did you mean 'algorithm.{close[0]}'?" if close else "is unknown."
    keys = ", ".join(["name", *_fields(cls)])
    return ConfigError(
        f"config key 'algorithm.{name}' {problem} Valid keys under algorithm for {algorithm}: {keys}"
    )


def algorithm_from_dict(data: dict[str, Any]) -> PolicyLossConfig:
    """The ``algorithm:`` section as the registered algorithm's typed config.

    ``name`` (default sdpg) picks the algorithm in ``algo.registry.ALGORITHMS``; every other key
    must be a field of its config class (``algo/config.py``), whose checks run here, at load time.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config section 'algorithm' must be a mapping, got {data!r}")
    values = dict(data)
    name = str(values.pop("name", "sdpg")).strip()
    if name not in ALGORITHMS:
        raise ConfigError(f"config key 'algorithm.name' got {name!r}; choose one of: {', '.join(ALGORITHMS)}")
    cls = ALGORITHMS[name].config_cls
    hints = _hints(cls)
    kwargs = {}
    for field_name, value in values.items():
        if field_name not in hints:
            raise _unknown_algorithm_key(field_name, name, cls)
        kwargs[field_name] = _convert(f"algorithm.{field_name}", value, hints[field_name])
    try:
        return cls(**kwargs)
    except AlgorithmConfigError as err:
        raise ConfigError(
            f"config key 'algorithm.{err.key}': {err.message} (algorithm.name={name})"
        ) from None


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested dicts (a parsed YAML recipe); unknown keys raise ConfigError."""
    return _from_dict(Config, data or {})


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set one ``section.field=value`` in the parsed recipe ``data``; :func:`config_from_dict` parses it.

    Overrides are merged before parsing because the algorithm's keys depend on the final
    ``algorithm.name`` (``algorithm.name=grpo`` may come before or after ``algorithm.kl_penalty_coef``).
    """
    if "=" not in override:
        raise ConfigError(
            f"override {override!r} must look like section.field=value (e.g. trainer.total_steps=20)"
        )
    key, raw = override.split("=", 1)
    key = key.strip().lstrip("-")
    parts = key.split(".")
    cls: Any = Config
    node = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if cls is PolicyLossConfig:  # keys depend on the final algorithm.name: checked when parsed
            if not last:
                raise ConfigError(f"config key '{key}': algorithm options are values, not sections")
            node[part] = raw
            return
        hints = _hints(cls)
        if part not in hints:
            raise _unknown_key(
                ".".join(parts[: depth + 1]), cls, ".".join(parts[:depth]) + "." if depth else ""
            )
        cls = hints[part]
        if last and _is_config(cls):
            raise ConfigError(
                f"config key '{key}' is a section; set one of its keys: {', '.join(_fields(cls))}"
            )
        if last:
            node[part] = raw
            return
        if not _is_config(cls):
            raise ConfigError(f"config key '{'.'.join(parts[: depth + 1])}' is a value, not a section")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(
                f"config section '{'.'.join(parts[: depth + 1])}' must be a mapping, got {node!r}"
            )


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {message}")


def _check_rollout(ro: RolloutConfig) -> None:
    """The ``rollout:`` section's ranges and combinations."""
    _check(ro.n >= 1, "rollout.n", f"must be >= 1, got {ro.n}")
    _check(ro.temperature > 0, "rollout.temperature", f"must be > 0, got {ro.temperature}")
    _check(0 < ro.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {ro.top_p}")
    _check(ro.max_num_gen_batches >= 1, "rollout.max_num_gen_batches", "must be >= 1")
    _check(
        ro.n >= 2 or not ro.dynamic_sampling,
        "rollout.dynamic_sampling",
        "needs rollout.n >= 2 (a group of one always has equal rewards); set rollout.n or turn it off",
    )
    _check(ro.num_servers >= 1, "rollout.num_servers", f"must be >= 1, got {ro.num_servers}")
    _check(ro.watchdog_s >= 0, "rollout.watchdog_s", f"must be >= 0 seconds (0: off), got {ro.watchdog_s}")
    _check(ro.tp_size >= 1, "rollout.tp_size", f"must be >= 1, got {ro.tp_size}")
    _check(
        ro.tp_size == 1 or ro.backend == "sglang",
        "rollout.tp_size",
        f"={ro.tp_size} needs rollout.backend=sglang (the builtin server is TP1; external servers report their own)",
    )
    _check(
        not (ro.colocated and ro.weight_sync == "distributed"),
        "rollout.weight_sync",
        "=distributed cannot be colocated (NCCL refuses two ranks of one communicator on one GPU); "
        "use rollout.weight_sync=tensor or disk",
    )
    _check(
        ro.base_gpu_id is None or ro.base_gpu_id >= 0,
        "rollout.base_gpu_id",
        f"must be >= 0 or null (after the trainer's GPUs), got {ro.base_gpu_id}",
    )
    _check(
        ro.mem_fraction_static is None or 0 < ro.mem_fraction_static < 1,
        "rollout.mem_fraction_static",
        f"must be in (0, 1) or null (SGLang's default), got {ro.mem_fraction_static}",
    )
    _check(ro.async_steps >= 0, "rollout.async_steps", f"must be >= 0 (0: synchronous), got {ro.async_steps}")
    _check(
        not (ro.colocated and ro.async_steps),
        "rollout.async_steps",
        "needs the rollout servers on their own devices: colocated engines hand their memory to training "
        "between rollouts; set rollout.colocated=false or rollout.async_steps=0",
    )
    if ro.backend == "external":
        _check(bool(ro.urls), "rollout.urls", "is required when rollout.backend=external")
        for url in ro.urls:
            _check(
                url.startswith(("http://", "https://")), "rollout.urls", f"{url!r} must start with http://"
            )
    _check_api_key_file(ro)


def _check_eval(ev: EvalConfig, par: ParallelConfig, ro: RolloutConfig) -> None:
    _check(ev.interval >= 0, "eval.interval", "must be >= 0")
    _check(ev.n_samples >= 1, "eval.n_samples", "must be >= 1")
    _check(
        not ev.mechanism or (par.tp, par.pp, par.cp) == (1, 1, 1),
        "eval.mechanism",
        f"needs parallel.tp = pp = cp = 1 (the probe runs the model on rank 0 alone), got "
        f"tp={par.tp} pp={par.pp} cp={par.cp}; set eval.mechanism=false",
    )
    _check(
        not (ev.mechanism and ro.colocated),
        "eval.mechanism",
        "runs the policy during evaluation, when colocated engines hold the GPU memory; set "
        "eval.mechanism=false or rollout.colocated=false",
    )
    names = [Path(f).stem for f in ev.files]
    unknown = [s for s in ev.mechanism_sets if s not in names]
    _check(
        not (unknown and names),  # no files: nothing is evaluated (the benchmark's grid runs)
        "eval.mechanism_sets",
        f"names {unknown}, which are not eval sets; the sets of eval.files are {names} (a file's name "
        "without its suffix)",
    )


def _check_api_key_file(ro: RolloutConfig) -> None:
    """``rollout.api_key_file``: only for external servers, and a file only its owner can read."""
    if not ro.api_key_file:
        return
    _check(
        ro.backend == "external",
        "rollout.api_key_file",
        f"is for rollout.backend=external; the trainer gives the {ro.backend} servers it launches a "
        "fresh key per run (RUN_DIR/secrets/rollout_api_key): remove the key",
    )
    from sdpg_mcore.rollout.auth import ApiKeyError, read_key_file

    try:
        read_key_file(ro.api_key_file)
    except ApiKeyError as err:
        raise ConfigError(f"config key 'rollout.api_key_file': {err}") from None


def validate(cfg: Config) -> Config:
    """Check value ranges and cross-field consistency (the algorithm checked itself when parsed), and
    resolve the defaults that depend on another section (``algorithm.rollout_is_cap``). Returns ``cfg``."""
    par, data, ro, opt, tr = cfg.parallel, cfg.data, cfg.rollout, cfg.optimizer, cfg.trainer
    for name in ("tp", "pp", "cp"):
        _check(getattr(par, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(par, name)}")
    _check(par.dp == -1 or par.dp >= 1, "parallel.dp", f"must be >= 1 or -1 (infer), got {par.dp}")
    _check(bool(cfg.model.path), "model.path", "is required (a Hugging Face model directory)")
    _check(bool(data.train_files), "data.train_files", "is required (one or more prompt files)")
    for name in ("max_prompt_length", "max_response_length", "batch_prompts", "mini_batch_prompts"):
        _check(getattr(data, name) >= 1, f"data.{name}", f"must be >= 1, got {getattr(data, name)}")
    _check(
        data.batch_prompts % data.mini_batch_prompts == 0,
        "data.mini_batch_prompts",
        f"must divide data.batch_prompts={data.batch_prompts}, got {data.mini_batch_prompts}",
    )
    longest = data.max_prompt_length + data.max_response_length
    _check(
        data.micro_batch_tokens >= longest,
        "data.micro_batch_tokens",
        f"must fit one full sequence (max_prompt_length + max_response_length = {longest}), "
        f"got {data.micro_batch_tokens}",
    )
    _check_rollout(ro)
    if cfg.algorithm.rollout_is_cap is None:  # the default: correct stale samples, leave the paper recipe
        cfg.algorithm = dataclasses.replace(cfg.algorithm, rollout_is_cap=2.0 if ro.async_steps else 0.0)
    _check(opt.lr > 0, "optimizer.lr", f"must be > 0, got {opt.lr}")
    _check(opt.clip_grad >= 0, "optimizer.clip_grad", f"must be >= 0, got {opt.clip_grad}")
    _check(tr.total_steps >= 1, "trainer.total_steps", f"must be >= 1, got {tr.total_steps}")
    _check(tr.save_interval >= 0, "trainer.save_interval", "must be >= 0")
    _check_eval(cfg.eval, par, ro)
    _check(tr.stop_at_step >= 0, "trainer.stop_at_step", "must be >= 0")
    _check(tr.logprob_chunk_size >= 1, "trainer.logprob_chunk_size", "must be >= 1")
    _check(
        tr.keep_checkpoints >= 0,
        "trainer.keep_checkpoints",
        f"must be >= 0 (0 keeps every checkpoint), got {tr.keep_checkpoints}",
    )
    _check(tr.nonfinite_patience >= 0, "trainer.nonfinite_patience", "must be >= 0")
    _check(tr.rollout_deadline_s > 0, "trainer.rollout_deadline_s", "must be > 0 seconds")
    return cfg


def resolve_world(cfg: Config, world_size: int) -> int:
    """The data-parallel size for ``world_size`` ranks; ConfigError when TP x PP x CP x DP does not match."""
    par = cfg.parallel
    model_parallel = par.tp * par.pp * par.cp
    if world_size % model_parallel != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp x parallel.cp = "
            f"{par.tp} x {par.pp} x {par.cp} = {model_parallel}; launch a multiple of {model_parallel} ranks"
        )
    dp = world_size // model_parallel
    if par.dp != -1 and par.dp != dp:
        raise ConfigError(
            f"world size {world_size} != parallel.tp x pp x cp x dp = {par.tp} x {par.pp} x {par.cp} x {par.dp}"
            f" = {model_parallel * par.dp}; set parallel.dp={dp} or -1, or launch {model_parallel * par.dp} ranks"
        )
    return dp


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (optional), apply ``section.field=value`` overrides in order, validate once."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}"
            )
    recipe_algorithm = dict(data.get("algorithm") or {}) if isinstance(data.get("algorithm"), dict) else {}
    for override in overrides or []:
        apply_override(data, override)
    _switch_algorithm(data, recipe_algorithm)
    return validate(config_from_dict(data))


def _switch_algorithm(data: dict[str, Any], recipe: dict[str, Any]) -> None:
    """``algorithm.name=X`` on the command line switches a recipe to X (one switch, ``algo/README.md``).

    The recipe's algorithm keys that X has no field for (e.g. sdpg's beta under grpo) are not
    carried over, and a warning names them; keys given as overrides are always kept and checked.
    """
    section = data.get("algorithm")
    name = str(section.get("name", "sdpg")).strip() if isinstance(section, dict) else ""
    if name == str(recipe.get("name", "sdpg")).strip() or name not in ALGORITHMS:
        return
    fields = set(_fields(ALGORITHMS[name].config_cls))
    dropped = [k for k, v in recipe.items() if k != "name" and k not in fields and section.get(k) is v]
    for key in dropped:
        del section[key]
    if dropped:
        logger.warning(
            "algorithm.name=%s (override): the recipe's %s keys %s do not apply to %s and are not used",
            name,
            recipe.get("name", "sdpg"),
            ", ".join(dropped),
            name,
        )


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dicts (for saving next to the run and for wandb); contains no secrets.

    The algorithm section gets its ``name`` back, so the dict loads again as the same config.
    """
    out = dataclasses.asdict(cfg)
    out["algorithm"] = {"name": algorithm_of(cfg.algorithm).name, **out["algorithm"]}
    return out


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML (the exact recipe to reproduce the run)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
