"""What `loraplex train` writes is what the server serves: an adapter trained on the embedded
model registers through the API (the CLI's --register path) and generates what stock PEFT
generates with it on the same NF4 base."""

from __future__ import annotations

import json

import pytest
from peft import PeftModel

from loraplex.server.cli import main
from loraplex.server.client import LoraplexClient
from loraplex.training.config import TrainConfig
from loraplex.training.train import MANIFEST, train
from loraplex.v1 import inference_pb2 as pb
from tests.integration.test_peft_equivalence import (
    NEW_TOKENS,
    PROMPTS,
    agreeing_prefix,
    chat_ids,
    peft_greedy,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(model_home, adapter_root):
    """A few real QLoRA steps on the embedded model, with a learning rate high enough that
    the adapter visibly changes what the model says."""
    data = adapter_root / "train-data.jsonl"
    rows = [{"prompt": p, "completion": "Arr, matey! " + p.lower()} for p in PROMPTS * 4]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(
        data=str(data),
        home=str(model_home),
        output_dir=str(adapter_root / "trained"),
        eval_fraction=0,
        r=8,
        lora_alpha=16,
        target_modules="q_proj,v_proj,o_proj",
        max_steps=6,
        batch_size=4,
        learning_rate=5e-3,
        max_length=128,
        gradient_checkpointing=False,
        eval_generate=0,
        save_steps=1000,
        logging_steps=1,
    )
    adapter = train(config)
    assert adapter is not None
    return adapter


def test_a_trained_adapter_serves_what_peft_generates(server, peft_reference, trained):
    model, tokenizer, _ = peft_reference
    manifest = json.loads((trained / MANIFEST).read_text())
    with LoraplexClient(server.address, timeout=120) as client:
        info = client.push("trained", trained).adapter  # validation accepts it as written
        assert info.base_model_fingerprint == manifest["base_model_fingerprint"]
        served = [
            client.generate(
                pb.GenerateRequest(
                    adapter_id="trained",
                    max_new_tokens=NEW_TOKENS,
                    messages=[pb.ChatMessage(role="user", content=p)],
                )
            )
            for p in PROMPTS
        ]
    assert isinstance(model, PeftModel)
    model.load_adapter(str(trained), adapter_name="trained")  # stock PEFT loading
    changed = 0
    for prompt, response in zip(PROMPTS, served, strict=True):
        ids = chat_ids(tokenizer, prompt)
        ref, gaps = peft_greedy(model, ids, "trained")
        must, agree = agreeing_prefix(list(response.token_ids), ref, gaps)
        assert agree >= must, (prompt, list(response.token_ids), ref)
        changed += ref != peft_greedy(model, ids, None)[0]
    assert changed, "the trained adapter generates what the base does: the test proves nothing"


def test_train_register_pushes_the_adapter(server, trained, adapter_root, monkeypatch, capsys):
    """`loraplex train --register ADDRESS` pushes what training wrote (training itself is the
    fixture's: the CLI's train step is replaced by its result)."""
    import loraplex.training.train as train_module

    monkeypatch.setattr(train_module, "train", lambda config: trained)
    argv = ["train", "--data", str(adapter_root / "train-data.jsonl"),
            "--output-dir", str(adapter_root / "cli-run"), "--register", server.address,
            "--adapter-id", "cli-trained"]  # fmt: skip
    assert main(argv) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["adapter"]["adapter_id"] == "cli-trained" and reply["created"]
    with LoraplexClient(server.address) as client:
        assert client.get("cli-trained").digest == reply["adapter"]["digest"]
