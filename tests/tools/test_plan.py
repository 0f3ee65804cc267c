"""tools/plan.py: exact parameter counts (HF and Megatron), memory components, layout rules, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdpg_mcore.models.tiny import tiny_hf_config
from sdpg_mcore.parallel.spawn import spawn_ranks
from sdpg_mcore.plan import (
    GIB,
    Layout,
    ModelShape,
    TrainingShape,
    estimate_memory,
    evaluate,
    layout_problems,
    padded_vocab_size,
    propose_layout,
)

REPO = Path(__file__).resolve().parents[2]


def run_plan(argv: list[str]) -> int:
    """``tools/plan.py`` as a command: its exit status; its output goes to this test's (``capsys``)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan.py"), *argv], capture_output=True, text=True, timeout=300
    )
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


VARIANTS = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": False}),
    ("qwen3", {}),
    ("qwen3", {"tie_word_embeddings": False, "attention_bias": True}),
]


def _hf_numel(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("arch,overrides", VARIANTS)
def test_hf_count_matches_transformers(arch, overrides):
    config = tiny_hf_config(arch, **overrides)
    assert ModelShape.from_hf_config(config).num_hf_parameters() == _hf_numel(config)


@pytest.mark.parametrize(
    "example,published",
    [("qwen3_4b", 4_022_468_096), ("llama3_70b", 70_553_706_496)],
)
def test_real_configs_match_published_and_transformers(example, published):
    from transformers import AutoConfig

    path = REPO / "examples" / example / "config.json"
    shape = ModelShape.from_path(path)
    assert shape.num_hf_parameters() == published
    assert _hf_numel(AutoConfig.from_pretrained(path.parent)) == published
    # Megatron pads the vocabulary to 128*TP; the count grows by exactly the padded rows.
    for tp in (1, 2, 8):
        pad = -(-shape.vocab_size // (128 * tp)) * 128 * tp - shape.vocab_size
        rows = pad * (1 if shape.tie_word_embeddings else 2)
        assert shape.num_megatron_parameters(tp) == published + rows * shape.hidden_size


def _init_model_parallel(tp: int, pp: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from sdpg_mcore.parallel.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(1234)


def _build_gpt(shape: ModelShape, tp: int, pp: int, *, bf16: bool = False):
    """Megatron's own ``GPTModel`` (local spec) for this rank's stage, independent of ``sdpg_mcore.models``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.intermediate_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=True,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=shape.qk_norm, normalization="RMSNorm"),
        vocab_size=padded_vocab_size(shape.vocab_size, tp),
        max_sequence_length=256,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="rope",
    )


def _saved_activation_bytes(model, tokens_BS: torch.Tensor, **kwargs) -> int:
    """Bytes autograd keeps for backward during one forward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    num_tokens = tokens_BS.shape[1]
    mask = torch.triu(torch.ones(1, 1, num_tokens, num_tokens, dtype=torch.bool), 1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(tokens_BS, torch.arange(num_tokens)[None], mask, **kwargs)
    return sum(saved.values()), out


def _megatron_rank(rank: int, world_size: int, shapes: list[ModelShape], hf_configs: list[dict]) -> dict:
    """TP2 x PP2: count every rank's parameters; then TP1 x DP4: measure DDP + distributed optimizer."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    _init_model_parallel(2, 2)
    last_stage = parallel_state.is_pipeline_last_stage()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    from sdpg_mcore.models.builder import build_gpt_model

    local, unique, project = [], [], []
    for shape, hf_config in zip(shapes, hf_configs):
        project.append(sum(p.numel() for p in build_gpt_model(hf_config).parameters()))
        model = _build_gpt(shape, 2, 2)
        local.append(sum(p.numel() for p in model.parameters()))
        count = 0
        for name, p in model.named_parameters():
            if last_stage and shape.tie_word_embeddings and name == "output_layer.weight":
                continue  # PP copy of the tied embedding
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                count += p.numel()
        unique.append(count)
    parallel_state.destroy_model_parallel()

    _init_model_parallel(2, 1)  # TP2 x DP2: activations saved by the local spec, fp32
    tokens = torch.randint(0, 301, (1, 64), generator=torch.Generator().manual_seed(0))
    tp2_activations = [_saved_activation_bytes(_build_gpt(shape, 2, 1), tokens)[0] for shape in shapes]
    parallel_state.destroy_model_parallel()

    _init_model_parallel(1, 1)
    shape = shapes[-1]
    model = _build_gpt(shape, 1, 1, bf16=True)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = DistributedDataParallel(model.config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, use_distributed_optimizer=True), [model]
    )
    model.zero_grad_buffer()
    tokens = torch.randint(0, shape.vocab_size, (1, 32), generator=torch.Generator().manual_seed(rank))
    activations, loss = _saved_activation_bytes(model, tokens, labels=tokens)
    loss.float().mean().backward()
    model.finish_grad_sync()
    stepped, _, _ = optimizer.step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in model.buffers)
    states = 0
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in sub.optimizer.state.values():
            states += sum(
                v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim()
            )
        states += sum(
            p.numel() * p.element_size() for group in sub.shard_fp32_from_float16_groups for p in group
        )
    return dict(
        local=local,
        project=project,
        unique=unique,
        stepped=stepped,
        tp1_count=sum(p.numel() for p in model.parameters()),
        bytes=dict(parameters=params, gradients=grads, optimizer_states=states, activations=activations),
        tp2_activations=tp2_activations,
    )


def test_megatron_counts_and_measured_static_memory():
    """Planner vs real GPTModels (TP2/PP2: Megatron's local spec and ``sdpg_mcore.models.build_gpt_model``)
    and a real DDP + distributed-optimizer step (TP1/DP4).

    Ranks 0-1 form pipeline stage 0 and ranks 2-3 stage 1 (Megatron's default order tp-cp-ep-dp-pp).
    """
    configs = [tiny_hf_config("llama", tie_word_embeddings=True)]
    configs += [tiny_hf_config(a) for a in ("llama", "qwen2", "qwen3")]
    shapes = [ModelShape.from_hf_config(c) for c in configs]
    results = spawn_ranks(_megatron_rank, 4, args=(shapes, [c.to_dict() for c in configs]))
    for i, shape in enumerate(shapes):
        stages = shape.stage_parameters(tp=2, pp=2)
        expected = [stages[0], stages[0], stages[1], stages[1]]
        assert [r["local"][i] for r in results] == expected, shape.model_type
        assert [r["project"][i] for r in results] == expected, shape.model_type  # sdpg_mcore.models builder
        assert sum(r["unique"][i] for r in results) == shape.num_megatron_parameters(tp=2), shape.model_type

    shape = shapes[-1]
    assert results[0]["tp1_count"] == shape.num_megatron_parameters(tp=1)
    assert all(r["stepped"] for r in results)
    # bf16 model, 32 tokens, local kernels (what runs on CPU). The step's loss is Megatron's
    # cross-entropy, which keeps an fp32 softmax of the [T, V] logits (4 bytes each, measured); in
    # SDPG the fused KL head replaces it, so it is added here rather than planned.
    local = dict(kernels="local", sequence_parallel=False)
    estimate = estimate_memory(shape, Layout(tp=1, pp=1, cp=1, dp=4), TrainingShape(32, 32, 32, **local))
    logits = 32 * padded_vocab_size(shape.vocab_size, 1) * 4
    for name, measured in results[0]["bytes"].items():
        planned = getattr(estimate, name) + (logits if name == "activations" else 0)
        assert abs(planned - measured) <= 0.15 * measured, (name, planned, measured)
    for i, shape in enumerate(shapes):  # fp32, TP2 without sequence parallelism, 64 tokens
        train = TrainingShape(64, 64, 64, activation_bytes=4, **local)
        planned = estimate_memory(shape, Layout(tp=2, pp=1, cp=1, dp=2), train).activations
        measured = results[0]["tp2_activations"][i]
        assert abs(planned - measured) <= 0.15 * measured, (shape.model_type, planned, measured)


def test_layout_rules_and_proposals():
    qwen = ModelShape.from_path(REPO / "examples/qwen3_4b/config.json")
    llama = ModelShape.from_path(REPO / "examples/llama3_70b/config.json")
    assert any("num_key_value_heads" in p for p in layout_problems(llama, Layout(tp=16, dp=1), 16, 16))
    assert any(
        "within a node" in p or "inside a node" in p for p in layout_problems(llama, Layout(tp=16), 8, 16)
    )
    assert any("num_hidden_layers" in p for p in layout_problems(llama, Layout(tp=8, pp=3), 8, 24))
    assert layout_problems(llama, Layout(tp=8, pp=2, cp=1, dp=2), 8, 32) == []

    paper = TrainingShape(micro_batch_tokens=6144, teacher_tokens=6144, rollout_seq_len=6144)
    plan = propose_layout(qwen, paper, gpus_per_node=8, world_size=8, gpu_mem_bytes=80 * GIB)
    assert plan.fits and plan.layout == Layout(tp=1, pp=1, cp=1, dp=8)

    long = TrainingShape(micro_batch_tokens=10240, teacher_tokens=10240, rollout_seq_len=10240)
    one_node = propose_layout(llama, long, gpus_per_node=8, world_size=8, gpu_mem_bytes=80 * GIB)
    assert not one_node.fits  # 70B with Adam does not fit 8 x 80 GB
    four_nodes = propose_layout(llama, long, gpus_per_node=8, world_size=32, gpu_mem_bytes=80 * GIB)
    assert four_nodes.fits and four_nodes.layout.tp == 8
    # The proposal is minimal: no valid layout with a smaller model-parallel size fits.
    for smaller in (Layout(tp=8, pp=1, cp=1, dp=4), Layout(tp=4, pp=2, cp=1, dp=4)):
        assert not evaluate(llama, smaller, long, 8, 32, 80 * GIB).fits


def test_memory_components_respond_to_options():
    qwen = ModelShape.from_path(REPO / "examples/qwen3_4b/config.json")
    base = dict(micro_batch_tokens=8192, teacher_tokens=8192, rollout_seq_len=8192)
    layout = Layout(tp=2, pp=1, cp=1, dp=4)
    plain = estimate_memory(qwen, layout, TrainingShape(**base))
    full = estimate_memory(qwen, layout, TrainingShape(**base, recompute="full"))
    materialised = estimate_memory(qwen, layout, TrainingShape(**base, kl_head="materialised"))
    colocated = estimate_memory(qwen, layout, TrainingShape(**base, rollout="colocated"))
    cp2 = estimate_memory(qwen, Layout(tp=2, pp=1, cp=2, dp=2), TrainingShape(**base))
    assert full.activations < plain.activations / 5
    # The materialised head holds [T, V/TP] logits x 16 bytes (~10 GB here); the fused one stays
    # within its workspace budget plus a few [T, H] tensors, as sdpg_mcore.ops plans it.
    from sdpg_mcore.ops.kl_head_math import DEFAULT_CHUNK_BUDGET_BYTES
    from sdpg_mcore.plan.memory import FUSED_HEAD_BUDGET_BYTES

    assert FUSED_HEAD_BUDGET_BYTES == DEFAULT_CHUNK_BUDGET_BYTES
    hidden_TH = 8192 * qwen.hidden_size
    weight_grad = 2 * (qwen.vocab_size // 2) * qwen.hidden_size  # bf16 [V/TP, H] output-layer gradient
    assert materialised.kl_head == 2 * hidden_TH + 16 * 8192 * (qwen.vocab_size // 2) + weight_grad
    assert plain.kl_head == (
        2 * hidden_TH + 4 * hidden_TH + 4 * hidden_TH + DEFAULT_CHUNK_BUDGET_BYTES + weight_grad
    )
    chunked = estimate_memory(qwen, layout, TrainingShape(**base, kl_chunk_tokens=512))
    assert chunked.kl_head == 10 * hidden_TH + 12 * 512 * (qwen.vocab_size // 2) + weight_grad
    assert colocated.rollout_kv_cache == qwen.kv_bytes_per_token() * 8192 * 16 // 2
    assert plain.rollout_kv_cache == 0
    assert cp2.activations == pytest.approx(plain.activations / 2, rel=1e-3)
    assert cp2.optimizer_states == plain.optimizer_states  # sharded over dp*cp = 4 either way
    assert plain.gradients == 2 * plain.parameters
    separate = estimate_memory(qwen, layout, TrainingShape(**base, reference_weights="separate_model"))
    assert plain.reference_model == 0 and separate.reference_model == plain.parameters
    assert separate.total - plain.total == plain.parameters
    with pytest.raises(ValueError, match="recompute"):
        TrainingShape(**base, recompute="some")


def test_teacher_states_on_the_host_leave_one_micro_batch_on_the_gpu():
    """``teacher_states=host``: the GPU line is one micro-batch's states, the mini-batch's share moves
    to a pinned host buffer of a power-of-two elements, and the peak drops by the difference."""
    from sdpg_mcore.plan.memory import TEACHER_STATE_PLACES
    from sdpg_mcore.train.teacher_states import PLACES

    assert TEACHER_STATE_PLACES == PLACES
    qwen = ModelShape.from_path(REPO / "examples/qwen3_4b/config.json")  # H = 2560
    base = dict(micro_batch_tokens=8192, teacher_tokens=8192, rollout_seq_len=8192)
    share = dict(mini_batch_responses=64, response_len=6144)  # 64 / DP4 = 16 responses per rank
    layout = Layout(tp=2, pp=1, cp=1, dp=4)
    device = estimate_memory(qwen, layout, TrainingShape(**base, **share))
    host = estimate_memory(qwen, layout, TrainingShape(**base, **share, teacher_states="host"))
    assert device.teacher_states == 16 * 6144 * 2560 * 2 and device.teacher_states_host == 0
    assert host.teacher_states == 8192 * 2560 * 2  # one micro-batch's tokens
    assert host.teacher_states_host == 2**28 * 2  # 16 x 6144 x 2560 = 251,658,240 elements -> 2^28
    assert device.total - host.total == device.teacher_states - host.teacher_states
    cp2 = estimate_memory(
        qwen, Layout(tp=2, pp=1, cp=2, dp=2), TrainingShape(**base, **share, teacher_states="host")
    )
    assert cp2.teacher_states == 4096 * 2560 * 2  # this CP rank's half of a micro-batch
    assert cp2.teacher_states_host == 2**28 * 2  # 32 responses per DP rank, half of their tokens
    with pytest.raises(ValueError, match="teacher_states='disk' is not one of device, host"):
        TrainingShape(**base, teacher_states="disk")


def _ema_bytes(rank, world_size, hf_dir) -> dict:
    """The real EMA teacher's bytes on a bf16 policy (TP1): device and host places."""
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.ema_weights import EMAWeights
    from sdpg_mcore.train.model_setup import build_policy

    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=1)
    optim = OptimizerConfig(lr=1e-6, lr_warmup_steps=0, use_distributed_optimizer=False)
    policy = build_policy(hf_dir, layout, dtype=torch.bfloat16, optim=optim, total_updates=1, chunk_size=8)
    out = {}
    for place in ("device", "host"):
        ema = EMAWeights(policy, 0.99, place)
        out[place] = (ema.nbytes if place == "device" else 0, ema.host_nbytes)
    state.destroy()
    return out


def test_guarded_teacher_weights_are_counted(tmp_path):
    """``algorithm.teacher=ema``: ``device`` holds the fp32 average on the GPU (4 bytes per parameter
    of the rank) and parks the live bf16 weights there during the teacher pass (2 bytes, counted with
    the teacher pass); ``host`` holds both in pinned host RAM — the bytes of the real ``EMAWeights``
    on a built bf16 policy. ``ema`` and a swapped-in ``initial`` keep the teacher's output-layer
    shard; a resident ``initial`` is the reference model."""
    from sdpg_mcore.algo.config import TEACHERS as ALGO_TEACHERS
    from sdpg_mcore.models.tiny import save_tiny_hf_model
    from sdpg_mcore.plan.memory import EMA_PLACES, TEACHERS
    from sdpg_mcore.train.ema_weights import PLACES

    assert TEACHERS == tuple(ALGO_TEACHERS) and EMA_PLACES == PLACES
    hf_dir = save_tiny_hf_model(tmp_path / "m", "qwen3", num_hidden_layers=2, seed=1)
    shape = ModelShape.from_path(hf_dir / "config.json")
    base = dict(micro_batch_tokens=64, teacher_tokens=64, rollout_seq_len=64, kernels="local")
    layout = Layout(tp=1, pp=1, cp=1, dp=1)
    plans = {
        name: estimate_memory(shape, layout, TrainingShape(**base, **kw))
        for name, kw in {
            "policy": {},
            "ema_device": dict(teacher="ema", ema_weights="device"),
            "ema_host": dict(teacher="ema", ema_weights="host"),
            "initial": dict(teacher="initial"),
            "initial_resident": dict(teacher="initial", reference_weights="separate_model"),
        }.items()
    }
    real = spawn_ranks(_ema_bytes, 1, args=(str(hf_dir),))[0]
    params = shape.rank_parameters(1, 1)
    head = padded_vocab_size(shape.vocab_size, 1) * shape.hidden_size * 2  # the [V/TP, H] bf16 copy
    policy, dev, host = plans["policy"], plans["ema_device"], plans["ema_host"]
    assert policy.teacher_weights == policy.teacher_weights_host == 0
    assert dev.teacher_weights == real["device"][0] + head == 4 * params + head
    assert dev.teacher == policy.teacher + 2 * params and dev.teacher_weights_host == 0
    # The real parked weights: the local spec keeps the norm weights in fp32 (4 bytes, not 2; < 1 %).
    assert host.teacher_weights == head and host.teacher_weights_host == 6 * params
    assert 0 <= real["host"][1] - host.teacher_weights_host <= 0.01 * real["host"][1]
    assert host.total == policy.total + head
    assert plans["initial"].teacher_weights == head and plans["initial"].teacher_weights_host == 0
    assert plans["initial_resident"].teacher_weights == 0
    with pytest.raises(ValueError, match="teacher='frozen' is not one of policy, ema, initial"):
        TrainingShape(**base, teacher="frozen")


def test_cli_json_and_exit_codes(tmp_path, capsys):
    out = tmp_path / "plan.json"
    config = str(REPO / "examples/llama3_70b/config.json")
    common = ["--config", config, "--gpus-per-node", "8", "--gpu-mem-gb", "80", "--json", str(out)]
    assert run_plan([*common, "--nodes", "4", "--max-response-len", "8192"]) == 0
    result = json.loads(out.read_text())
    assert result["num_parameters"] == 70_553_706_496
    assert result["fits"] is True
    assert set(result["layout"]) == {"tp", "pp", "cp", "dp"}
    assert result["per_gpu_bytes"]["total"] <= 80 * GIB
    assert "peak" in capsys.readouterr().out

    assert run_plan([*common, "--nodes", "1", "--tp", "8"]) == 1
    assert json.loads(out.read_text())["fits"] is False
    assert run_plan([*common, "--nodes", "2", "--tp", "16"]) == 2  # TP across nodes
    assert run_plan([*common, "--nodes", "1", "--tp", "3"]) == 2  # does not divide 8 GPUs
    assert "does not divide" in capsys.readouterr().err
    assert run_plan(["--config", str(tmp_path / "missing.json")]) == 2


def test_cli_reads_a_recipe(tmp_path):
    """A YAML recipe supplies lengths, layout and recompute; the command line still wins."""
    out = tmp_path / "plan.json"
    recipe = str(REPO / "examples/llama3_70b/recipe.yaml")
    common = [
        "--config",
        recipe,
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--gpu-mem-gb",
        "80",
        "--json",
        str(out),
    ]
    assert run_plan(common) == 0
    result = json.loads(out.read_text())
    assert result["num_parameters"] == 70_553_706_496  # from examples/llama3_70b/config.json
    assert result["layout"] == {"tp": 8, "pp": 2, "cp": 1, "dp": 2}
    assert result["training"]["recompute"] == "full" and result["training"]["micro_batch_tokens"] == 10240
    assert result["proposed"] is False
    # The teacher states of every response of the rank's mini-batch share (128 / DP2) x 8192 tokens x H.
    assert result["per_gpu_bytes"]["teacher_states"] == 64 * 8192 * 8192 * 2
    # PP4 leaves DP1: one rank keeps all 128 responses' teacher states (16 GiB) and no longer fits.
    assert run_plan([*common, "--recompute", "none", "--tp", "8", "--pp", "4"]) == 1
    result = json.loads(out.read_text())
    assert result["layout"]["pp"] == 4 and result["training"]["recompute"] == "none"
    assert result["per_gpu_bytes"]["teacher_states"] == 128 * 8192 * 8192 * 2 and not result["fits"]
    # ... and the planner says what would fit: the teacher states in pinned host memory.
    (advice,) = result["advice"]
    assert advice.startswith("trainer.teacher_states=host fits: TP8 PP4 CP1 DP1 at 68.80 GiB per GPU")
    assert "16.00 GiB per GPU, 128.0 GiB per last-stage node of 8 GPUs" in advice
    assert (
        run_plan([*common, "--recompute", "none", "--tp", "8", "--pp", "4", "--teacher-states", "host"]) == 0
    )
    result = json.loads(out.read_text())
    assert result["training"]["teacher_states"] == "host" and result["advice"] == []
    per_gpu = result["per_gpu_bytes"]
    assert per_gpu["teacher_states"] == 10240 * 8192 * 2 and per_gpu["teacher_states_host"] == 16 * GIB
    assert per_gpu["total"] == pytest.approx(68.80 * GIB, abs=0.005 * GIB)


def _recipe_70b(tmp_path, **sections) -> tuple[list[str], Path]:
    """The 70B recipe with ``sections``' keys changed, next to its config.json in ``tmp_path``: the
    plan command line for 4 nodes and its JSON output."""
    import shutil

    import yaml

    recipe = yaml.safe_load((REPO / "examples/llama3_70b/recipe.yaml").read_text())
    recipe["model"].pop("path")  # use the config.json next to the recipe
    for section, values in sections.items():
        recipe[section].update(values)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    shutil.copy(REPO / "examples/llama3_70b/config.json", tmp_path / "config.json")
    out = tmp_path / "plan.json"
    return ["--config", str(tmp_path / "recipe.yaml"), "--nodes", "4", "--json", str(out)], out


def test_recipe_teacher_states_reach_the_plan(tmp_path):
    """``trainer.teacher_states`` in a recipe is planned as such (the command line still wins)."""
    common, out = _recipe_70b(tmp_path, trainer={"teacher_states": "host"})
    assert run_plan(common) == 0
    per_gpu = json.loads(out.read_text())["per_gpu_bytes"]
    assert per_gpu["teacher_states"] == 10240 * 8192 * 2 and per_gpu["teacher_states_host"] == 8 * GIB
    assert run_plan([*common, "--teacher-states", "device"]) == 0
    per_gpu = json.loads(out.read_text())["per_gpu_bytes"]
    assert per_gpu["teacher_states"] == 8 * GIB and per_gpu["teacher_states_host"] == 0


def test_colocated_peak_is_the_largest_of_the_three_turns():
    """Colocated engines and the trainer take turns (train/colocate.py): training holds the whole
    training state beside the released engines' residue; the weight push only the trainer's weights
    and the engines' weights; generation only the trainer's residue, the engines' weights and KV."""
    qwen = ModelShape.from_path(REPO / "examples/qwen3_4b/config.json")
    base = dict(micro_batch_tokens=8192, teacher_tokens=8192, rollout_seq_len=8192)
    layout = Layout(tp=1, pp=1, cp=1, dp=8)
    dedicated = estimate_memory(qwen, layout, TrainingShape(**base))
    colocated = estimate_memory(qwen, layout, TrainingShape(**base, rollout="colocated", rollout_kv_seqs=64))
    engines, overhead = 2 * GIB, 3 * GIB
    assert dedicated.phase_peaks is None
    assert colocated.phase_peaks == {
        "training": dedicated.total + engines,
        "weight_push": colocated.parameters + overhead + colocated.rollout_weights + engines,
        "generation": overhead + colocated.rollout_weights + colocated.rollout_kv_cache + engines,
    }
    assert colocated.total == max(colocated.phase_peaks.values())
    # Without the offload, the generation turn would hold the whole training state as well.
    static = colocated.parameters + colocated.gradients + colocated.optimizer_states + overhead
    assert (
        colocated.phase_peaks["generation"] < static + colocated.rollout_weights + colocated.rollout_kv_cache
    )
    separate = estimate_memory(
        qwen, layout, TrainingShape(**base, rollout="colocated", reference_weights="separate_model")
    )
    assert separate.phase_peaks["weight_push"] - colocated.phase_peaks["weight_push"] == colocated.parameters


def test_plan_reads_colocation_and_the_layer_spec_from_the_recipe(tmp_path):
    import shutil

    import yaml

    recipe = yaml.safe_load((REPO / "examples/qwen3_4b/recipe.yaml").read_text())
    recipe["rollout"]["colocated"] = True
    recipe["model"]["transformer_impl"] = "local"
    recipe["model"].pop("path", None)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    shutil.copy(REPO / "examples/qwen3_4b/config.json", tmp_path / "config.json")
    out = tmp_path / "plan.json"
    run_plan(["--config", str(path), "--nodes", "1", "--gpus-per-node", "8", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["training"]["rollout"] == "colocated" and result["training"]["kernels"] == "local"
    assert set(result["per_gpu_bytes"]["phase_peaks"]) == {"training", "weight_push", "generation"}


def test_recipe_ema_teacher_reaches_the_plan_and_the_advice(tmp_path):
    """``algorithm.teacher=ema`` with ``trainer.ema_weights`` in a recipe: on the 70B recipe (TP8 x PP2,
    4.4 B parameters per GPU) the fp32 average on the GPU does not fit, and the planner says the host
    place does (the command line still wins)."""
    common, out = _recipe_70b(tmp_path, algorithm={"teacher": "ema"}, trainer={"ema_weights": "device"})
    assert run_plan(common) == 1
    result = json.loads(out.read_text())
    params = ModelShape.from_path(tmp_path / "config.json").rank_parameters(8, 2)
    head = padded_vocab_size(128256, 8) // 8 * 8192 * 2
    assert result["training"]["teacher"] == "ema" and result["training"]["ema_weights"] == "device"
    assert result["per_gpu_bytes"]["teacher_weights"] == 4 * params + head
    (advice,) = result["advice"]
    assert advice.startswith("trainer.ema_weights=host fits: TP8 PP2 CP1 DP2")
    assert run_plan([*common, "--ema-weights", "host"]) == 0
    per_gpu = json.loads(out.read_text())["per_gpu_bytes"]
    assert per_gpu["teacher_weights"] == head and per_gpu["teacher_weights_host"] == 6 * params
