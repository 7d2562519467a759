"""Fixtures every kind of test shares: the model cache, tiny random models of each supported
family, the embedded model's PEFT reference with three adapters, S3 on loopback, and a record
of the files a test's code opens."""

from __future__ import annotations

import builtins
import io
import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run in Triton's interpreter. triton.jit reads this when it
# decorates a kernel, so it is set before anything (tests.helpers imports the server) can import
# a kernel module; the test modules pick their device from how the kernels were decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import ADAPTERS, MODEL_HOME, add_peft_adapter


@pytest.fixture(scope="session")
def model_home(tmp_path_factory):
    """The test session's loraplex home: its models are the machine's shared cache (the
    embedded GGUF is converted once per machine), its tuning and built kernels its own, so
    kernel timings taken under the suite's load never reach a real server's home."""
    models = MODEL_HOME / "models"
    models.mkdir(parents=True, exist_ok=True)
    home = tmp_path_factory.mktemp("home")
    (home / "models").symlink_to(models, target_is_directory=True)
    return home


@pytest.fixture(scope="session")
def tokenizer_dir(model_home):
    """The embedded model's checkpoint dir (its tokenizer serves the tiny test models too)."""
    from loraplex.core.model import embedded_model_dir

    return embedded_model_dir(model_home)


TINY_FAMILIES = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory, tokenizer_dir):
    """tiny_family_dir(family): a tiny random decoder of that family (2 layers, hidden 64,
    heads of 64) with the embedded tokenizer, saved once per session: seconds to load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    made: dict[str, object] = {}

    def make(family: str = "llama"):
        if family not in made:
            config = AutoConfig.for_model(
                family,
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=64,  # a real model's: the native attention kernels' vector paths run
                max_position_embeddings=512,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id,
                tie_word_embeddings=True,
                initializer_range=0.2,
            )
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_family_dir):
    """The tiny random Llama."""
    return tiny_family_dir("llama")


@pytest.fixture
def load_tiny(tiny_family_dir):
    """Load a fresh copy of a tiny model (float32, unquantized unless asked: exact checks)."""
    from loraplex.core.config import ModelConfig
    from loraplex.core.model import load_model

    def load(quantization: str = "none", dtype: str = "float32", family: str = "llama"):
        path = str(tiny_family_dir(family))
        return load_model(
            ModelConfig(model=path, quantization=quantization, dtype=dtype, device="cpu")
        )

    return load


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server on loopback (moto's server mode), once per session; the AWS
    variables point at fake credentials so nothing can reach a real account."""
    import logging
    import os

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    fake = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in fake}
    os.environ.update(fake)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket: (s3://bucket URL, fsspec storage options)."""
    import re

    import fsspec

    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    bucket = f"{name}-{id(request) % 100000}"
    fsspec.filesystem("s3", skip_instance_cache=True, **options).mkdir(bucket)
    return f"s3://{bucket}", options


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def peft_reference(model_home, adapter_root):
    """Stock PEFT on its own NF4 copy of the base, holding the three adapters (saved to disk)."""
    from loraplex.core.config import ModelConfig
    from loraplex.core.model import load_model

    loaded = load_model(ModelConfig(home=model_home))
    model = loaded.model
    for name, (config, seed) in ADAPTERS.items():
        model = add_peft_adapter(model, name, config, seed=seed, b_std=0.03)
    model.eval()
    model.save_pretrained(adapter_root / "peft", selected_adapters=list(ADAPTERS))
    dirs = {name: adapter_root / "peft" / name for name in ADAPTERS}
    return model, loaded.tokenizer, dirs


@pytest.fixture
def opened(monkeypatch):
    """The paths every open (os.open, open, Path.open) is asked for while the test runs."""
    paths: list[str] = []

    def recording(real):
        def open_(file, *args, **kwargs):
            if not isinstance(file, int):  # a descriptor is already open
                paths.append(os.fsdecode(file))
            return real(file, *args, **kwargs)

        return open_

    monkeypatch.setattr(os, "open", recording(os.open))
    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(io, "open", recording(io.open))
    return paths
