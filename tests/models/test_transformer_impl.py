"""model.transformer_impl: ``auto`` says which spec it chose and why; ``te`` raises naming the key
without a working Transformer-Engine (sdpg-train's exit 2 for it: tests/test_cli_node.py)."""

import logging

import pytest

from sdpg_mcore.models.spec import TransformerImplError, resolve_transformer_impl


def test_auto_and_local_log_the_spec_they_chose(caplog):
    with caplog.at_level(logging.INFO, logger="sdpg_mcore.models.spec"):
        assert resolve_transformer_impl("auto") is False
        assert resolve_transformer_impl("local") is False
    messages = [r.getMessage() for r in caplog.records]
    assert any("local spec (model.transformer_impl=auto: no CUDA device" in m for m in messages), messages
    assert any("local spec (model.transformer_impl=local)" in m for m in messages), messages
    with pytest.raises(
        TransformerImplError, match="'model.transformer_impl' got 'fast'; choose one of: auto, te, local"
    ):
        resolve_transformer_impl("fast")
    with pytest.raises(TransformerImplError, match="no CUDA device is visible.*model.transformer_impl=auto"):
        resolve_transformer_impl("te")


def test_the_70b_recipe_demands_transformer_engine():
    from pathlib import Path

    import yaml

    recipe = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "examples/llama3_70b/recipe.yaml").read_text()
    )
    assert recipe["model"]["transformer_impl"] == "te"
