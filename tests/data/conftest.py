import pytest

from sdpg_mcore.data.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="session")
def qwen_tokenizer():
    return build_tiny_tokenizer("qwen")


@pytest.fixture(scope="session")
def llama_tokenizer():
    return build_tiny_tokenizer("llama")


@pytest.fixture(scope="session", params=["qwen", "llama"])
def tokenizer(request, qwen_tokenizer, llama_tokenizer):
    return qwen_tokenizer if request.param == "qwen" else llama_tokenizer
