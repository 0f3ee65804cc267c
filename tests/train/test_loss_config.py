"""The run config reaches the algorithm's loss config: every option that the algorithm has is honoured."""

from sdpg_mcore.algo import GRPOConfig, OPSDConfig, SDPGConfig
from sdpg_mcore.config import load_config
from sdpg_mcore.train.trainer import loss_config

RECIPE = "examples/tiny/sdpg.yaml"


def test_sdpg_options_reach_the_loss():
    cfg = loss_config(load_config(RECIPE, ["algorithm.positive_advantage_only=true", "algorithm.clip_c=7"]))
    assert isinstance(cfg, SDPGConfig)
    assert cfg.positive_advantage_only is True
    assert cfg.clip_c == 7.0
    assert cfg.clip_eps_high == 0.28  # unset clip settings keep the algorithm's default


def test_grpo_kl_penalty_coef_reaches_the_loss():
    cfg = loss_config(load_config(RECIPE, ["algorithm.name=grpo", "algorithm.kl_penalty_coef=0.005"]))
    assert isinstance(cfg, GRPOConfig)
    assert cfg.kl_penalty_coef == 0.005
    assert cfg.needs().kl_in_reward_coef == 0.005


def test_opsd_keeps_its_entropy_bonus_unless_set():
    assert loss_config(load_config(RECIPE, ["algorithm.name=opsd"])).entropy_coef == 0.02
    cfg = loss_config(load_config(RECIPE, ["algorithm.name=opsd", "algorithm.entropy_coef=0.05"]))
    assert isinstance(cfg, OPSDConfig) and cfg.entropy_coef == 0.05
