"""Shared test helpers: the in-process server on a thread, and PEFT-made adapters."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loraplex.server.app import LoraplexServer
from loraplex.server.config import ServerConfig

MODEL_HOME = Path(os.environ.get("LORAPLEX_HOME") or "~/.cache/loraplex").expanduser()


class ServerThread:
    """A LoraplexServer running on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.server = LoraplexServer(config)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self, ready: bool = True) -> ServerThread:
        self._thread.start()
        self.call(self.server.start())
        if ready:
            self.call(self.server.wait_ready(), timeout=600)
        return self

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (the server's config sets http_port)."""
        return f"http://127.0.0.1:{self.server.http_port}/v1"

    @property
    def runtime(self):
        return self.server.runtime

    @property
    def engine(self):
        return self.server.runtime.engine

    def state(self):
        """The engine's state, as its thread sees it between two steps."""
        return self.engine.snapshot().result(30)

    def stop(self) -> None:
        self.call(self.server.stop(grace=2.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def write_key_file(
    path: Path, roles: dict[str, tuple[str, str]], extra: str = ""
) -> dict[str, str]:
    """An API key file at `path` with a new key per name in `roles` (name: (tenant, role)),
    then `extra` (e.g. [tenants.*] tables); returns the keys by name."""
    from loraplex.server.runtime.auth import hash_key, new_key

    keys = {name: new_key() for name in roles}
    path.write_text(
        "".join(
            f'[[keys]]\nname = "{name}-key"\ntenant = "{roles[name][0]}"\n'
            f'role = "{roles[name][1]}"\nsha256 = "{hash_key(key)}"\n'
            for name, key in keys.items()
        )
        + extra
    )
    path.chmod(0o600)  # as the server wants a key file (it warns about looser modes)
    return keys


def randomize_lora(model: torch.nn.Module, adapter_name: str, seed: int, b_std: float) -> None:
    """Give an adapter random non-zero A and B (PEFT initialises B to zero)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if f".{adapter_name}." not in name or "lora_" not in name:
            continue
        with torch.no_grad():
            std = param.shape[1] ** (-0.5) if "lora_A" in name else b_std
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def add_peft_adapter(
    model: torch.nn.Module | PeftModel,
    name: str,
    config: LoraConfig,
    seed: int,
    b_std: float = 0.02,
) -> PeftModel:
    """Add a randomly initialised LoRA adapter with stock PEFT; returns the PeftModel."""
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    randomize_lora(model, name, seed, b_std)
    return model


def peft_logits(reference: PeftModel, ids: list[int], adapter: str | None) -> torch.Tensor:
    """Stock PEFT's float32 next-token logits after `ids`, with `adapter` (None: the base)."""
    with torch.inference_mode():
        if adapter is None:
            with reference.disable_adapter():
                return reference(torch.tensor([ids])).logits[0, -1].float()
        reference.set_adapter(adapter)
        return reference(torch.tensor([ids])).logits[0, -1].float()


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Three adapters of different ranks and targets, as tenants would bring them.
ADAPTERS = {
    "attn-r8": (LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION), 1),
    "all-r16": (LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), 2),
    "mix-r32": (
        LoraConfig(
            r=32,
            lora_alpha=32,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        ),
        3,
    ),
}
