"""The benchmark's equal tuning: the same grid size for every method, the choice read off training reward."""

import math

import pytest

from sdpg_mcore.bench.tuning import BENCH_ALGOS, GRID, choose, grid_points, train_reward


def _rows(train, heldout):
    """A grid run's metric rows: training steps with their reward, evaluation rows with held-out accuracy."""
    rows = [{"step": i + 1, "reward_mean": r, "acc": (r + 1) / 2} for i, r in enumerate(train)]
    rows += [{"step": len(train), "eval/heldout/avg@8": heldout, "mech/heldout/student_acc": heldout}]
    return rows


def test_every_method_gets_the_same_number_of_grid_runs():
    chosen = {"sdpg": ["optimizer.lr=0.001", "algorithm.beta=0.2"]}
    sizes = {algo: len(grid_points(algo, chosen)) for algo in BENCH_ALGOS}
    assert set(sizes) == set(GRID) and len(set(sizes.values())) == 1
    points = grid_points("grpo")
    assert len({tuple(p) for p in points}) == len(points)  # no point twice
    assert all(
        p[0].startswith("optimizer.lr=") and p[1].startswith("algorithm.kl_penalty_coef=") for p in points
    )
    guarded = grid_points("sdpg_guarded", chosen)
    assert all("algorithm.beta=0.2" in p for p in guarded)  # at SDPG's chosen beta
    with pytest.raises(ValueError, match="tune sdpg first"):
        grid_points("sdpg_guarded", {})
    with pytest.raises(ValueError, match="no tuning grid"):
        grid_points("ppo")


def test_choice_follows_training_reward_not_held_out_accuracy():
    train = {
        "0": [0.0, 0.1, 0.2, 0.3],  # the best held-out accuracy below, a worse training reward
        "1": [0.0, 0.0, 0.5, 0.5],
        "2": [0.9, 0.9, 0.1, 0.1],  # the best early, worse over the last two steps
    }
    pick = choose({k: _rows(v, heldout) for (k, v), heldout in zip(train.items(), (0.9, 0.1, 0.5))}, window=2)
    assert pick.key == "1" and pick.train_reward == pytest.approx(0.5)
    assert pick.scores == pytest.approx({"0": 0.25, "1": 0.5, "2": 0.1})
    # Other held-out numbers change nothing; a run with evaluation rows only never wins.
    flipped = {k: _rows(v, heldout) for (k, v), heldout in zip(train.items(), (0.0, 0.0, 1.0))}
    flipped["3"] = [{"step": 4, "eval/heldout/avg@8": 1.0}]
    again = choose(flipped, window=2)
    assert again.key == "1" and math.isnan(again.scores["3"])
    assert choose({"a": _rows([0.4], 0.0), "b": _rows([0.4], 1.0)}, window=5).key == "a"  # tie: first
    with pytest.raises(ValueError, match="reward_mean"):
        choose({"a": [{"step": 1}]}, window=2)
    assert math.isnan(train_reward([], 3))
