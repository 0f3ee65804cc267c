import dataclasses

import pytest
import yaml

from sdpg_mcore.algo import ALGORITHMS, ALPHA_MODES, LOSS_AGG_MODES, GRPOConfig, SDPGConfig, algorithm_of
from sdpg_mcore.config import ConfigError, apply_override, dump_config, load_config, resolve_world

RECIPE = """
model:
  path: /models/tiny
data:
  train_files: [a.jsonl]
  max_prompt_length: 64
  max_response_length: 32
  micro_batch_tokens: 256
  batch_prompts: 8
  mini_batch_prompts: 4
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def test_yaml_and_typed_overrides(recipe):
    cfg = load_config(
        recipe,
        [
            "trainer.total_steps=20",
            "algorithm.beta=2e-3",
            "rollout.dynamic_sampling=true",
            "data.train_files=[x.parquet, y.parquet]",
            "eval.files=a.jsonl,b.jsonl",
            "algorithm.clip_eps_high=0.3",
            "logging.wandb=offline",
            "data.micro_batch_tokens=1e3",
        ],
    )
    assert cfg.model.path == "/models/tiny"
    assert cfg.trainer.total_steps == 20 and isinstance(cfg.trainer.total_steps, int)
    assert cfg.algorithm.beta == pytest.approx(2e-3)
    assert cfg.rollout.dynamic_sampling is True
    assert cfg.data.train_files == ["x.parquet", "y.parquet"]
    assert cfg.eval.files == ["a.jsonl", "b.jsonl"]
    assert cfg.data.micro_batch_tokens == 1000
    assert cfg.algorithm.clip_c == 10.0  # the algorithm's default
    assert cfg.algorithm.clip_eps_high == 0.3
    assert cfg.logging.wandb == "offline"


def test_unknown_key_suggests_and_lists(recipe):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["trainer.totl_steps=3"])
    msg = str(err.value)
    assert "unknown config key 'trainer.totl_steps'" in msg
    assert "did you mean 'trainer.total_steps'?" in msg
    assert "valid keys under trainer:" in msg and "save_interval" in msg
    with pytest.raises(ConfigError, match="unknown config key 'trainr'.*did you mean 'trainer'"):
        apply_override({}, "trainr.total_steps=3")


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  learning_rate: 1e-5\n")
    with pytest.raises(
        ConfigError, match="unknown config key 'optimizer.learning_rate'.*valid keys under optimizer"
    ):
        load_config(path)


@pytest.mark.parametrize(
    "override, match",
    [
        ("algorithm.name=ppo", "choose one of: sdpg, grpo, dapo, opsd, rlsd"),
        ("trainer.total_steps=ten", "expects int"),
        ("trainer.total_steps=1.5", "expects an integer"),
        ("rollout.dynamic_sampling=maybe", "expects true or false"),
        ("trainer=3", "is a section"),
        ("trainer.total_steps", "must look like section.field=value"),
        ("data.mini_batch_prompts=3", "must divide data.batch_prompts=8"),
        ("data.micro_batch_tokens=50", "must fit one full sequence"),
        ("rollout.backend=external", "rollout.urls.*required"),
        ("trainer.total_steps=0", "trainer.total_steps.*>= 1"),
        (
            "trainer.teacher_states=disk",
            "config key 'trainer.teacher_states' got 'disk'; choose one of: device, host",
        ),
        (
            "trainer.ema_weights=gpu",
            "config key 'trainer.ema_weights' got 'gpu'; choose one of: device, host",
        ),
    ],
)
def test_bad_values_name_the_key(recipe, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, [override])


def test_required_fields(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None)


def test_world_size_must_match(recipe):
    cfg = load_config(recipe, ["parallel.tp=2", "parallel.pp=2"])
    assert resolve_world(cfg, 8) == 2
    with pytest.raises(ConfigError, match="not divisible by parallel.tp x parallel.pp x parallel.cp"):
        resolve_world(cfg, 6)
    cfg.parallel.dp = 3
    with pytest.raises(ConfigError, match=r"world size 8 != parallel.tp x pp x cp x dp = 2 x 2 x 1 x 3"):
        resolve_world(cfg, 8)


def test_dump_round_trips(recipe, tmp_path):
    cfg = load_config(recipe, ["algorithm.name=rlsd", "eval.files=[v.jsonl]"])
    dump_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again == cfg


def test_algorithm_clip_defaults_come_from_the_algorithm(recipe):
    grpo = load_config(recipe, ["algorithm.name=grpo"]).algorithm
    assert isinstance(grpo, GRPOConfig)
    assert (grpo.clip_eps_low, grpo.clip_eps_high, grpo.clip_c) == (0.2, 0.2, 1000.0)
    sdpg = load_config(recipe).algorithm
    assert isinstance(sdpg, SDPGConfig)
    assert (sdpg.clip_eps_low, sdpg.clip_eps_high, sdpg.clip_c) == (0.2, 0.28, 10.0)


def _other_value(value):
    """A valid value different from a field's default (for the round trip below)."""
    if value is None:  # rollout_is_cap: resolved from rollout.async_steps unless set
        return 3.0
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value * 0.5 if value else 0.25
    return {"urkl": "fkl", "token-mean": "seq-mean-token-sum", "policy": "ema"}[value]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_option_is_settable_from_yaml(tmp_path, name):
    """Each field of each registered algorithm's config arrives from the YAML section unchanged."""
    config_cls = ALGORITHMS[name].config_cls
    defaults = config_cls()
    values = {f.name: _other_value(getattr(defaults, f.name)) for f in dataclasses.fields(config_cls)}
    path = tmp_path / "a.yaml"
    path.write_text(RECIPE + yaml.safe_dump({"algorithm": {"name": name, **values}}))
    cfg = load_config(path)
    assert cfg.algorithm == config_cls(**values)
    assert algorithm_of(cfg.algorithm).name == name
    for key, value in values.items():  # and from the command line
        other = load_config(recipe_path(tmp_path), [f"algorithm.name={name}", f"algorithm.{key}={value}"])
        assert getattr(other.algorithm, key) == value


def recipe_path(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(RECIPE)
    return path


def test_config_choices_are_the_registries(recipe):
    """Every choice a user can make in the algorithm section is its registry, not a copy of it."""
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["algorithm.name=ppo"])
    assert f"choose one of: {', '.join(ALGORITHMS)}" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["algorithm.alpha_mode=kl"])
    assert f"choose one of: {', '.join(ALPHA_MODES)}" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["algorithm.loss_agg_mode=token-sum"])
    assert f"choose one of: {', '.join(LOSS_AGG_MODES)}" in str(err.value)
    for mode in ALPHA_MODES:
        assert load_config(recipe, [f"algorithm.alpha_mode={mode}"]).algorithm.alpha_mode == mode
    for mode in LOSS_AGG_MODES:
        assert load_config(recipe, [f"algorithm.loss_agg_mode={mode}"]).algorithm.loss_agg_mode == mode
    for name in ALGORITHMS:
        assert algorithm_of(load_config(recipe, [f"algorithm.name={name}"]).algorithm).name == name


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["algorithm.name=grpo", "algorithm.beta=0.1"],
            r"'algorithm.beta' is not an option of algorithm.name=grpo \(only of sdpg\)",
        ),
        (["algorithm.kl_clamp=0"], r"'algorithm.kl_clamp': must be > 0"),
        (["algorithm.beta=-1"], r"'algorithm.beta': must be >= 0"),
        (["algorithm.alpha=-1"], r"'algorithm.alpha': must be >= 0"),
        (["algorithm.beta_warmup_steps=-1"], r"'algorithm.beta_warmup_steps': must be >= 0"),
        (["algorithm.beta_decay_steps=-1"], r"'algorithm.beta_decay_steps': must be >= 0"),
        (["algorithm.clip_eps_low=1"], r"'algorithm.clip_eps_low': must be in \[0, 1\)"),
        (["algorithm.clip_eps_high=-0.1"], r"'algorithm.clip_eps_high': must be >= 0"),
        (["algorithm.clip_c=1"], r"'algorithm.clip_c': must be > 1"),
        (["algorithm.entropy_coef=-0.1"], r"'algorithm.entropy_coef': must be >= 0"),
        (
            ["algorithm.name=grpo", "algorithm.kl_penalty_coef=-1"],
            r"'algorithm.kl_penalty_coef': must be >= 0",
        ),
        (
            ["algorithm.name=opsd", "algorithm.teacher_temperature=0"],
            r"'algorithm.teacher_temperature': must be > 0",
        ),
        (
            ["algorithm.name=opsd", "algorithm.weight_clamp_max=0"],
            r"'algorithm.weight_clamp_max': must be > 0",
        ),
        (
            ["algorithm.name=rlsd", "algorithm.lambda_base=1.5"],
            r"'algorithm.lambda_base': must be in \[0, 1\]",
        ),
        (
            ["algorithm.name=rlsd", "algorithm.lambda_decay_steps=-1"],
            r"'algorithm.lambda_decay_steps': must be >= 0",
        ),
        (["algorithm.name=rlsd", "algorithm.eps_w=1"], r"'algorithm.eps_w': must be in \[0, 1\)"),
        (
            ["algorithm.teacher=frozen"],
            r"'algorithm.teacher': got 'frozen'; choose one of: policy, ema, initial",
        ),
        (["algorithm.teacher_ema_decay=1"], r"'algorithm.teacher_ema_decay': must be in \(0, 1\)"),
        (["algorithm.teacher_ema_decay=0"], r"'algorithm.teacher_ema_decay': must be in \(0, 1\)"),
        (
            ["algorithm.name=grpo", "algorithm.teacher=ema"],
            r"'algorithm.teacher' is not an option of algorithm.name=grpo \(only of sdpg\)",
        ),
        (
            ["algorithm.name=rlsd", "algorithm.distill_is_ratio=true"],
            r"'algorithm.distill_is_ratio' is not an option of algorithm.name=rlsd \(only of sdpg\)",
        ),
        (["algorithm.distill_is_ratio=sometimes"], r"'algorithm.distill_is_ratio' expects true or false"),
        (["algorithm.bta=1"], r"'algorithm.bta' is unknown; did you mean 'algorithm.beta'"),
        (["algorithm.beta.x=1"], r"algorithm options are values, not sections"),
    ],
)
def test_bad_algorithm_values_name_the_key(recipe, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, overrides)


def test_algorithm_in_yaml_is_checked_against_its_own_name(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text(RECIPE + "algorithm:\n  name: grpo\n  beta: 0.1\n")
    with pytest.raises(ConfigError, match="'algorithm.beta' is not an option of algorithm.name=grpo"):
        load_config(path)


def test_switching_algorithm_on_the_command_line_leaves_the_recipes_own_keys(tmp_path, caplog):
    path = tmp_path / "sdpg.yaml"
    path.write_text(RECIPE + "algorithm:\n  name: sdpg\n  beta: 0.05\n  loss_agg_mode: seq-mean-token-sum\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(path, ["algorithm.name=grpo"])
    # Shared keys carry over; rollout_is_cap resolves to off (synchronous rollouts).
    assert cfg.algorithm == GRPOConfig(loss_agg_mode="seq-mean-token-sum", rollout_is_cap=0.0)
    assert "recipe's sdpg keys beta do not apply to grpo" in caplog.text


def test_opsd_entropy_bonus_can_be_turned_off(recipe):
    assert load_config(recipe, ["algorithm.name=opsd"]).algorithm.entropy_coef == 0.02
    assert (
        load_config(recipe, ["algorithm.name=opsd", "algorithm.entropy_coef=0"]).algorithm.entropy_coef == 0.0
    )


def test_dynamic_sampling_needs_groups(recipe):
    with pytest.raises(ConfigError, match="rollout.dynamic_sampling.*rollout.n >= 2"):
        load_config(recipe, ["rollout.dynamic_sampling=true", "rollout.n=1"])
