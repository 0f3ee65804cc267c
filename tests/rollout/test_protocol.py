"""Pure pieces of the contract: sampling-param parsing, the sampler, seeds, drift metric (no servers)."""

from __future__ import annotations

import math

import pytest
import torch

from sdpg_mcore.rollout.client import sample_seed
from sdpg_mcore.rollout.engine import sample_token
from sdpg_mcore.rollout.protocol import SamplingParams, parse_dtype_name


def test_sampling_params_round_trip_and_defaults():
    params = SamplingParams.from_json(
        {"temperature": 0.5, "stop": "##", "stop_token_ids": [3], "sampling_seed": 7}
    )
    assert params.stop == ["##"] and params.top_k == -1 and params.max_new_tokens == 128
    assert SamplingParams.from_json(params.to_json()) == params
    assert "sampling_seed" not in SamplingParams().to_json()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"max_new_tokens": 1.5}, "max_new_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ([], "sampling_params"),
    ],
)
def test_sampling_params_errors_name_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_json(data)


def test_dtype_names():
    assert parse_dtype_name("torch.bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="unsupported dtype"):
        parse_dtype_name("complex32")


def test_sampler_logprob_is_of_the_tempered_distribution_in_fp64():
    logits_V = torch.tensor([2.0, 1.0, 0.5, -1.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5, 2.0):
        token, logprob = sample_token(
            logits_V, SamplingParams(temperature=temperature), gen, original_logprob=False
        )
        expected = logits_V[token] / temperature - torch.logsumexp(logits_V / temperature, 0)
        assert math.isclose(logprob, float(expected), rel_tol=1e-6)
        token, original = sample_token(
            logits_V, SamplingParams(temperature=temperature), gen, original_logprob=True
        )
        assert math.isclose(original, float(torch.log_softmax(logits_V, 0)[token]), rel_tol=1e-6)
    token, logprob = sample_token(logits_V, SamplingParams(temperature=0), None, original_logprob=False)
    assert token == 0 and math.isclose(logprob, float(torch.log_softmax(logits_V, 0)[0]), rel_tol=1e-6)


def test_top_k_and_top_p_restrict_the_support():
    logits_V = torch.tensor([3.0, 2.9, 0.0, -5.0])
    gen = torch.Generator().manual_seed(1)
    top_k = {sample_token(logits_V, SamplingParams(top_k=2), gen, False)[0] for _ in range(200)}
    assert top_k == {0, 1}
    top_p = {sample_token(logits_V, SamplingParams(top_p=0.5), gen, False)[0] for _ in range(200)}
    assert top_p == {0}  # token 0 alone holds > 50% of the mass


def test_seed_depends_only_on_coordinates():
    assert sample_seed(3, 1, 2) == sample_seed(3, 1, 2)
    assert len({sample_seed(3, i, j, b) for i in range(4) for j in range(4) for b in range(3)}) == 48
