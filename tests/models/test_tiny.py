import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdpg_mcore.models.tiny import TINY_CONFIGS, save_tiny_hf_model


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_tiny_model_saves_and_loads_with_transformers(tmp_path, arch):
    path = save_tiny_hf_model(tmp_path / arch, arch=arch, seed=3)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch
    assert (path / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(path)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, TINY_CONFIGS[arch]["vocab_size"])
    assert torch.isfinite(logits).all()


def test_tiny_model_rejects_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="arch='gpt2'"):
        save_tiny_hf_model(tmp_path, arch="gpt2")
