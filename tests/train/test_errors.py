"""User mistakes fail fast with messages that name the problem and the fix."""

import pytest

from sdpg_mcore.cli import main
from sdpg_mcore.parallel.spawn import find_free_port
from sdpg_mcore.train.rollout_io import RolloutUnreachableError, check_reachable

RECIPE = """
model: {path: /models/tiny}
data: {train_files: [a.jsonl], max_prompt_length: 16, max_response_length: 8, micro_batch_tokens: 64,
       batch_prompts: 4, mini_batch_prompts: 2}
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return str(path)


def test_unreachable_rollout_server_names_url_and_fix():
    url = f"http://127.0.0.1:{find_free_port()}"
    with pytest.raises(
        RolloutUnreachableError, match=f"rollout server {url} is unreachable.*rollout.backend=builtin"
    ):
        check_reachable([url], timeout_s=2)


def test_cli_rejects_world_size_mismatch(recipe, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--config", recipe, "--nproc", "3", "parallel.tp=2"])
    assert err.value.code == 2
    assert (
        "world size 3 is not divisible by parallel.tp x parallel.pp x parallel.cp" in capsys.readouterr().err
    )


def test_cli_rejects_unknown_key(recipe, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--config", recipe, "trainer.totl_steps=3"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "unknown config key 'trainer.totl_steps'; did you mean 'trainer.total_steps'?" in msg


def test_cli_print_config(recipe, capsys):
    assert main(["--config", recipe, "--print-config", "algorithm.name=grpo"]) == 0
    out = capsys.readouterr().out
    assert "name: grpo" in out and "clip_c: 1000.0" in out
