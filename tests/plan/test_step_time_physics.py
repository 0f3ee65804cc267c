"""The step-time model behaves physically: closed forms where they exist, and the directions that must hold.

- more GPUs for the same batch: faster, never more than linearly;
- longer responses: longer generation;
- no prediction above a hardware peak (FLOP/s, memory bandwidth), even with every efficiency at 1.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from sdpg_mcore.plan.compute_time import Machine, PassSpec, pass_time
from sdpg_mcore.plan.generation_time import EngineShape, decode_step, generation_time
from sdpg_mcore.plan.hardware import EFFICIENCY, HARDWARE, Efficiency
from sdpg_mcore.plan.lengths import ResponseLengths
from sdpg_mcore.plan.memory import Layout
from sdpg_mcore.plan.shape import ModelShape
from sdpg_mcore.plan.step_time import predict_step
from sdpg_mcore.plan.workload import SDPG_MCORE, Rollout, TrainSettings, Workload, with_head_bytes

REPO = Path(__file__).resolve().parents[2]
SHAPE_70B = ModelShape.from_path(REPO / "examples/llama3_70b/config.json")
H100 = Machine(HARDWARE["h100"], EFFICIENCY, 8)
IDEAL = Machine(
    HARDWARE["h100"], Efficiency(gemm=1, memory=1, link=1, collective_latency_s=0, decode_step_s=0), 8
)
SETTINGS = TrainSettings(micro_batch_tokens=10240, recompute="full", sequence_parallel=True)


def sdpg_work(mean: float = 2731, cap: int = 8192) -> Workload:
    return Workload(
        prompts=128,
        n=8,
        prompt_len=256,
        lengths=ResponseLengths(mean, cap),
        teacher_extra_len=64,
        teacher_pass=True,
        reference_pass=True,
        mini_batches=8,
    )


def step(layout: Layout, rollout_gpus: int, work: Workload | None = None, machine: Machine = H100):
    work = work or sdpg_work()
    return predict_step(
        SHAPE_70B, layout, work, SETTINGS, Rollout(gpus=rollout_gpus, tp=8), SDPG_MCORE, machine
    )


def test_more_gpus_for_the_same_batch_is_faster_but_not_superlinear():
    previous = None
    for k in (1, 2, 4):  # trainer DP and rollout engines both grow k-fold
        now = step(Layout(tp=8, pp=2, dp=2 * k), rollout_gpus=16 * k)
        if previous is not None:
            speedup = previous.total / now.total
            assert 1 < speedup <= 2, speedup
            for phase in ("generation", "old_logprob", "teacher", "train"):
                assert now.phases[phase] <= previous.phases[phase]
                assert previous.phases[phase] / now.phases[phase] <= 2 + 1e-9, phase
        previous = now


def test_dp_beyond_the_mini_batch_groups_leaves_ranks_idle():
    """16 prompt groups per mini-batch, dealt whole: DP 16 and DP 32 train the same rows per rank."""
    work = sdpg_work()
    assert work.rows_per_rank(16, whole_groups=True) == work.rows_per_rank(32, whole_groups=True) == 8
    a, b = step(Layout(tp=8, pp=1, dp=16), 64), step(Layout(tp=8, pp=1, dp=32), 64)
    assert b.phases["train"] == pytest.approx(a.phases["train"], rel=0.02)


def test_longer_responses_take_longer_generation():
    rollout = Rollout(gpus=16, tp=8)
    times = [generation_time(SHAPE_70B, sdpg_work(mean), rollout, H100).total for mean in (500, 1500, 2731)]
    assert times == sorted(times) and times[0] < times[-1]
    capped = [
        generation_time(SHAPE_70B, sdpg_work(1000, cap), rollout, H100).total for cap in (2048, 4096, 8192)
    ]
    assert capped == sorted(capped) and capped[0] < capped[-1]


def test_generation_lasts_at_least_the_longest_response_at_the_fastest_step():
    gen = generation_time(SHAPE_70B, sdpg_work(), Rollout(gpus=64, tp=8), H100)
    floor = gen.longest * decode_step(EngineShape.of(SHAPE_70B, 8), 8, H100, running=1, context=256)
    assert gen.longest == pytest.approx(8192, rel=1e-3)  # 1,024 responses: a capped one is certain
    assert gen.decode >= floor


def test_decode_step_closed_forms():
    """One sequence: weights read at memory speed; a huge batch: matmul FLOPs at GEMM speed."""
    engine = EngineShape.of(SHAPE_70B, 8)
    streamed = SHAPE_70B.num_hf_parameters() - SHAPE_70B.vocab_size * SHAPE_70B.hidden_size
    assert engine.weight_bytes == 2 * streamed / 8
    h100 = HARDWARE["h100"]
    # two all-reduces per layer of one token's hidden state over 8 GPUs: 2 * 7/8 * H * 2 bytes each
    all_reduce = 2 * SHAPE_70B.num_layers * 2 * 7 / 8 * SHAPE_70B.hidden_size * 2 / h100.nvlink_bytes_per_s
    one = decode_step(engine, 8, IDEAL, running=1, context=0)
    assert one == pytest.approx(engine.weight_bytes / h100.memory_bytes_per_s + all_reduce, rel=1e-9)
    many = decode_step(engine, 8, IDEAL, running=1e5, context=0)
    assert many == pytest.approx(1e5 * (engine.flops_per_token / h100.peak_flops + all_reduce), rel=1e-9)


def test_pipeline_bubble_is_pp_minus_one_micro_batch_slots():
    spec = PassSpec(tokens=16 * 4096, budget=4096, context=1000)
    for pp in (2, 4, 8):
        t = pass_time(SHAPE_70B, Layout(tp=1, pp=pp), spec, IDEAL)
        assert t.micro_batches == 16
        assert t.bubble == pytest.approx((pp - 1) * (t.compute + t.pp_p2p) / 16)


@pytest.mark.parametrize(
    "layout", [Layout(8, 2, 1, 4), Layout(4, 4, 1, 4), Layout(8, 1, 2, 4), Layout(2, 8, 4, 1)]
)
def test_no_pass_runs_above_peak_flops(layout):
    """Model FLOPs of the train pass (forward, backward, recompute) over its time never exceed the peak."""
    work = sdpg_work()
    for machine in (H100, IDEAL):
        s = step(layout, 16, work, machine)
        rows = work.rows_per_rank(layout.dp, whole_groups=True) * work.mini_batches
        layer = 2 * SHAPE_70B.layer_sharded_parameters() * SHAPE_70B.num_layers
        flops = 4 * rows * work.row_len * layer / layout.model_parallel_size  # per GPU, 4 forward-equivalents
        assert flops / s.phases["train"] <= HARDWARE["h100"].peak_flops


def test_decode_never_reads_faster_than_hbm():
    gen = generation_time(SHAPE_70B, sdpg_work(), Rollout(gpus=16, tp=8), IDEAL)
    engine = EngineShape.of(SHAPE_70B, 8)
    assert gen.decode * HARDWARE["h100"].memory_bytes_per_s >= gen.longest * engine.weight_bytes


def test_head_bytes_are_a_named_input():
    """More elementwise bytes per (token, vocabulary) pair (``--head-bytes``, e.g. the torch path's
    130 against the Triton kernels' 38): the train pass grows by exactly their memory time on the
    last stage."""
    layout, work = Layout(tp=8, pp=2, dp=4), sdpg_work()
    triton = predict_step(SHAPE_70B, layout, work, SETTINGS, Rollout(16, 8), SDPG_MCORE, H100)
    torch_bytes = with_head_bytes(SDPG_MCORE, 130.0)
    slow = predict_step(SHAPE_70B, layout, work, SETTINGS, Rollout(16, 8), torch_bytes, H100)
    assert SDPG_MCORE.head_bytes_train + SDPG_MCORE.head_bytes_teacher == 38.0
    assert torch_bytes.head_bytes_train + torch_bytes.head_bytes_teacher == pytest.approx(130.0)
    pairs = work.rows_per_rank(4, True) * work.mini_batches * work.lengths.mean * 129024 / 8
    added = pairs * (130 - 38) / (HARDWARE["h100"].memory_bytes_per_s * EFFICIENCY.memory)
    assert slow.phases["train"] - triton.phases["train"] == pytest.approx(added, rel=1e-6)


def test_sdpg_costs_a_teacher_pass_and_two_head_matmuls_more_than_grpo():
    layout = Layout(tp=8, pp=2, dp=4)
    grpo_work = replace(sdpg_work(), teacher_pass=False, teacher_extra_len=0)
    sdpg, grpo = step(layout, 16), step(layout, 16, grpo_work)
    assert "teacher" in sdpg.phases and "teacher" not in grpo.phases
    assert sdpg.phases["train"] > grpo.phases["train"]
    assert sdpg.phases["generation"] == grpo.phases["generation"]
    assert 1 < sdpg.total / grpo.total < 1.4


def test_guarded_teacher_pays_its_swaps_per_teacher_pass_and_its_ema_update_per_optimizer_step():
    """``algorithm.teacher=ema | initial`` on the 70B layout TP8 x PP2 (4.4 B parameters per GPU, 8
    mini-batches): at link and memory speed (IDEAL) the EMA on the host moves 8 bytes per parameter
    over the host link per teacher pass and per update, on the GPU ~14 and ~10 bytes of device memory;
    the initial teacher swaps as the reference pass (two exchanges of the bf16 shard)."""
    layout, work = Layout(tp=8, pp=2, dp=4), sdpg_work()
    params = SHAPE_70B.rank_parameters(8, 2)
    link, memory = IDEAL.hw.host_link_bytes_per_s, IDEAL.hw.memory_bytes_per_s

    def guarded(teacher: str, host: bool = True):
        settings = replace(SETTINGS, teacher_weights=teacher, ema_weights_host=host)
        rollout = Rollout(gpus=16, tp=8)
        return predict_step(SHAPE_70B, layout, work, settings, rollout, SDPG_MCORE, IDEAL)

    policy = guarded("policy")
    for teacher, host, swap_bytes, update_bytes, rate in (
        ("ema", True, 8, 8, link),
        ("ema", False, 14, 10, memory),
        ("initial", True, 2 * 2, 0, link),
    ):
        got = guarded(teacher, host)
        want_swap, want_update = 8 * swap_bytes * params / rate, 8 * update_bytes * params / rate
        assert got.phases["teacher"] - policy.phases["teacher"] == pytest.approx(want_swap, rel=1e-9)
        assert got.phases["optimizer"] - policy.phases["optimizer"] == pytest.approx(want_update, rel=1e-9)
        assert got.details["teacher_swap"] == pytest.approx(want_swap + want_update, rel=1e-9)
        assert got.phases["train"] == policy.phases["train"]
    assert policy.details["teacher_swap"] == 0.0
    grpo = replace(work, teacher_pass=False, teacher_extra_len=0)
    no_teacher = predict_step(  # no teacher pass: nothing to swap, whatever the setting says
        SHAPE_70B, layout, grpo, replace(SETTINGS, teacher_weights="ema"), Rollout(16, 8), SDPG_MCORE, IDEAL
    )
    assert no_teacher.details["teacher_swap"] == 0.0
    with pytest.raises(ValueError, match="teacher_weights"):
        replace(SETTINGS, teacher_weights="frozen")


def test_response_lengths_keep_their_mean():
    for mean, cap in ((398, 3967), (1019, 3969), (2731, 8192)):
        lengths = ResponseLengths(mean, cap)
        integral = sum(lengths.survival(t + 0.5) for t in range(cap))
        assert integral == pytest.approx(mean, rel=2e-3)
        assert lengths.survival(cap - 1) >= 0.02  # the capped share
    fixed = ResponseLengths.fixed(64)
    assert fixed.survival(63) == 1 and fixed.survival(64) == 0 and fixed.mean_square() == 64 * 64


def test_async_rollout_hides_generation_behind_training():
    work, layout = sdpg_work(), Layout(tp=8, pp=2, dp=4)
    sync = step(layout, 16, work)
    overlapped = predict_step(
        SHAPE_70B, layout, work, SETTINGS, Rollout(16, 8, async_steps=1), SDPG_MCORE, H100
    )
    busy = sum(v for k, v in sync.phases.items() if k != "generation")
    assert overlapped.phases.get("generation", 0.0) == pytest.approx(
        max(0.0, sync.phases["generation"] - busy)
    )
    assert overlapped.total == pytest.approx(
        max(sync.total - sync.phases["generation"], sync.phases["generation"])
    )


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="mini_batches"):
        Workload(prompts=10, n=8, prompt_len=10, lengths=ResponseLengths(10, 20), mini_batches=3)
    with pytest.raises(ValueError, match="rollout GPUs"):
        Rollout(gpus=12, tp=8)
    with pytest.raises(ValueError, match="mean response length"):
        ResponseLengths(100, 50)
    assert math.isinf(ResponseLengths.fixed(8).scale)
