from __future__ import annotations

import pytest

from tests.helpers import MODEL_HOME


@pytest.fixture(scope="session")
def model_home():
    """Shared cache of converted models (the embedded GGUF is converted once per machine)."""
    MODEL_HOME.mkdir(parents=True, exist_ok=True)
    return MODEL_HOME


@pytest.fixture(scope="session")
def tokenizer_dir(model_home):
    """The embedded model's checkpoint dir (its tokenizer serves the tiny test models too)."""
    from loraplex.server.model_loader import embedded_model_dir

    return embedded_model_dir(model_home)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama (2 layers, hidden 64) with the embedded tokenizer: seconds to load."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def load_tiny(tiny_model_dir):
    """Load a fresh copy of the tiny model (float32, unquantized unless asked: exact checks)."""
    from loraplex.server.config import ModelConfig
    from loraplex.server.model_loader import load_model

    def load(quantization: str = "none", dtype: str = "float32"):
        return load_model(
            ModelConfig(
                model=str(tiny_model_dir), quantization=quantization, dtype=dtype, device="cpu"
            )
        )

    return load
