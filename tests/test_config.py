import pytest

from sdpg_mcore.config import Config, ConfigError, apply_override, dump_config, load_config, resolve_world

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
            "algorithm.clip_c=None",
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
    # None -> algorithm default filled by validation; explicit value kept.
    assert cfg.algorithm.clip_c == 10.0
    assert cfg.algorithm.clip_eps_high == 0.3
    assert cfg.logging.wandb == "offline"


def test_algorithm_clip_defaults(recipe):
    grpo = load_config(recipe, ["algorithm.name=grpo"]).algorithm
    assert (grpo.clip_eps_low, grpo.clip_eps_high, grpo.clip_c) == (0.2, 0.2, 1000.0)
    sdpg = load_config(recipe).algorithm
    assert (sdpg.clip_eps_low, sdpg.clip_eps_high, sdpg.clip_c) == (0.2, 0.28, 10.0)


def test_unknown_key_suggests_and_lists(recipe):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["trainer.totl_steps=3"])
    msg = str(err.value)
    assert "unknown config key 'trainer.totl_steps'" in msg
    assert "did you mean 'trainer.total_steps'?" in msg
    assert "valid keys under trainer:" in msg and "save_interval" in msg
    with pytest.raises(ConfigError, match="unknown config key 'trainr'.*did you mean 'trainer'"):
        apply_override(Config(), "trainr.total_steps=3")


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
