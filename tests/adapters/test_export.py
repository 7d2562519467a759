"""`loraplex adapters export --merged`: the saved checkpoint is the served NF4 base with the
adapter merged, as stock transformers loads it, and it computes what stock PEFT computes on
that base."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from loraplex.adapters import export
from loraplex.adapters.export import MANIFEST_FILE, export_merged, export_spec
from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.store import AdapterStore, digest_files
from loraplex.adapters.validate import load_adapter
from loraplex.core.config import ModelConfig
from loraplex.core.model import LoadedModel, load_model, lora_target_shapes
from loraplex.core.types import BaseModelSpec
from loraplex.server.cli import main
from tests.helpers import add_peft_adapter

ADAPTERS = {
    "qv-down": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "all-rslora": LoraConfig(r=8, lora_alpha=3, use_rslora=True, target_modules="all-linear"),
}
PROMPTS = [[5, 17, 300, 42, 7], [9, 8, 7], [100, 200, 300, 400, 500, 600]]
# Exported (W + s·B@A) x against PEFT's W x + s·B(A x), both float32 on the same dequantized W:
# only the order of float32 roundings differs (measured: at most ~1e-5 on these logits, of
# magnitude up to ~8), so 1e-4 (+1e-4 relative) leaves a 10x margin, while the adapter moves
# the logits by ~10 and NF4 quantization moves them by ~3 (the adapter's effect is asserted
# below, and that the untargeted weights are the NF4 ones, not the checkpoint's).
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def load_nf4(model_dir: Path) -> LoadedModel:
    """The tiny base as the export loads it: the server's loader, NF4, float32 compute."""
    return load_model(
        ModelConfig(model=str(model_dir), quantization="nf4", dtype="float32", device="cpu")
    )


@pytest.fixture(scope="module")
def tiny_dir(tiny_family_dir) -> Path:
    return tiny_family_dir("llama")


@pytest.fixture(scope="module")
def adapter_dirs(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """Random PEFT adapters made by stock PEFT on the tiny Llama, one directory each."""
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        add_peft_adapter(model, "default", config, seed=seed, b_std=0.5).save_pretrained(
            root / name
        )
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def references(tiny_dir, adapter_dirs) -> dict[str, PeftModel]:
    """Per adapter: the same NF4 base dequantized to float32 by transformers' own
    `dequantize`, with the adapter applied (unmerged) by stock `PeftModel.from_pretrained`."""
    refs = {}
    for name, path in adapter_dirs.items():
        base = load_nf4(tiny_dir).model.dequantize(dtype=torch.float32)
        refs[name] = PeftModel.from_pretrained(base, path).eval()
    return refs


def logits(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([prompt])).logits[0]


def greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    with torch.inference_mode():
        ids = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            pad_token_id=0,
        )
    return ids[0, len(prompt) :].tolist()


def cli(*args: str | Path) -> None:
    assert main(["adapters", "export", *map(str, args)]) == 0


@pytest.mark.cpu_isa
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_the_export_loads_stock_and_computes_what_peft_does(
    tiny_dir, adapter_dirs, references, tmp_path, name
):
    loaded = load_nf4(tiny_dir)
    weights = load_adapter(adapter_dirs[name], export_spec(loaded))
    out = export_merged(loaded, weights, tmp_path / "merged", torch.float32)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()  # stock: no bnb, no PEFT
    assert not any(hasattr(p, "quant_state") for p in exported.parameters())

    reference = references[name]
    for prompt in PROMPTS:
        got, want = logits(exported, prompt), logits(reference, prompt)
        torch.testing.assert_close(got, want, **TOLERANCE)
        with reference.disable_adapter():
            base = logits(reference, prompt)
        assert (got - base).abs().max() > 1.0  # the adapter is in there
        assert greedy(exported, prompt) == greedy(reference, prompt)

    # Modules the adapter leaves alone hold the dequantized NF4 weight exactly, not the
    # checkpoint's original one.
    dequantized = reference.get_base_model().state_dict()
    original = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).state_dict()
    saved = exported.state_dict()
    untouched = [k for k in saved if k in dequantized]  # not wrapped by PEFT
    assert untouched
    for key in untouched:
        assert torch.equal(saved[key], dequantized[key]), key
    linears = [k for k in untouched if k.endswith("proj.weight")]
    assert len(linears) == (8 if name == "qv-down" else 0)  # k, o, gate, up in 2 layers
    assert all(not torch.equal(dequantized[k], original[k]) for k in linears)


def test_a_non_empty_out_is_refused_and_a_failure_leaves_nothing(
    tiny_dir, adapter_dirs, tmp_path, monkeypatch
):
    loaded = load_nf4(tiny_dir)
    weights = load_adapter(adapter_dirs["qv-down"], export_spec(loaded))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        export_merged(loaded, weights, out, torch.float32)
    assert os.listdir(tmp_path) == ["merged"] and os.listdir(out) == ["mine.txt"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loaded.tokenizer, "save_pretrained", disk_full)  # after the weights
    with pytest.raises(OSError, match="No space"):
        export_merged(loaded, weights, out, torch.float32, force=True)
    assert os.listdir(tmp_path) == ["merged"] and os.listdir(out) == ["mine.txt"]

    export_merged(load_nf4(tiny_dir), weights, out, torch.float32, force=True)
    assert os.listdir(tmp_path) == ["merged"] and not (out / "mine.txt").exists()
    assert (out / "config.json").is_file() and (out / MANIFEST_FILE).is_file()


@pytest.mark.cpu_isa
def test_cli_exports_a_directory_in_bfloat16(tiny_dir, adapter_dirs, tmp_path, capsys):
    out = tmp_path / "merged"
    adapter = adapter_dirs["qv-down"]
    common = ["--model", tiny_dir, "--home", tmp_path / "home", "--device", "cpu"]
    cli(adapter, "--from-dir", "--merged", out, *common)

    shown = json.loads(capsys.readouterr().out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert shown["out"] == str(out) and shown["dtype"] == manifest["dtype"] == "bfloat16"
    assert manifest["adapter"]["adapter_id"] == "qv-down"
    assert manifest["adapter"]["digest"] == digest_files(adapter)
    assert manifest["adapter"]["version"] is None
    assert manifest["base"]["fingerprint"] == load_nf4(tiny_dir).fingerprint
    assert manifest["base"]["dequantized_linears"] == 14  # 2 layers x 7 projections
    merged = manifest["merged_modules"]
    assert len(merged) == 6 and {m.rsplit(".", 1)[-1] for m in merged} == {
        "q_proj", "v_proj", "down_proj"
    }  # fmt: skip
    assert manifest["versions"]["transformers"] == transformers.__version__
    with safe_open(out / "model.safetensors", "pt") as f:
        names = f.keys()
        assert {f.get_slice(name).get_dtype() for name in names} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    AutoModelForCausalLM.from_pretrained(out)

    with pytest.raises(SystemExit, match="not empty"):  # again: OUT holds the first export
        cli(adapter, "--from-dir", "--merged", out, *common)
    with pytest.raises(SystemExit, match="not a readable directory"):
        cli(tmp_path / "missing", "--from-dir", "--merged", tmp_path / "other", *common)
    assert os.listdir(tmp_path) == ["merged"]


def test_cli_exports_a_stored_adapter_by_name(tiny_dir, adapter_dirs, references, tmp_path):
    loaded = load_nf4(tiny_dir)
    spec = BaseModelSpec(lora_target_shapes(loaded.model), 8, loaded.fingerprint)
    store = AdapterStore(tmp_path / "store")
    registry = AdapterRegistry(store, spec, [next(iter(adapter_dirs.values())).parent])
    versions = [registry.register("tiny", str(adapter_dirs[n]))[0] for n in ADAPTERS]
    common = ["--adapter-store", tmp_path / "store", "--model", tiny_dir, "--device", "cpu"]
    common += ["--home", tmp_path / "home", "--dtype", "float32"]

    latest, first = ((), "all-rslora", versions[1]), (("--version", "1"), "qv-down", versions[0])
    for flags, name, version in (latest, first):
        out = tmp_path / f"v{version.version}"
        cli("tiny", "--merged", out, *flags, *common)
        manifest = json.loads((out / MANIFEST_FILE).read_text())["adapter"]
        assert (manifest["adapter_id"], manifest["version"], manifest["digest"]) == (
            "tiny", version.version, version.digest
        )  # fmt: skip
        assert manifest["base_model_fingerprint"] == loaded.fingerprint
        exported = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(
            logits(exported, PROMPTS[0]), logits(references[name], PROMPTS[0]), **TOLERANCE
        )


def test_cli_refuses_a_bad_name_before_loading_the_model(tiny_dir, tmp_path, monkeypatch):
    AdapterStore(tmp_path / "store")

    def no_model(config):
        raise AssertionError("the model was loaded for a request refused by name")

    monkeypatch.setattr(export, "load_model", no_model)
    common = ["--adapter-store", tmp_path / "store", "--model", tiny_dir, "--device", "cpu"]
    with pytest.raises(SystemExit, match="adapter 'nope' is not registered"):
        cli("nope", "--merged", tmp_path / "out", *common)
    with pytest.raises(SystemExit, match="not a valid id"):
        cli("../etc", "--merged", tmp_path / "out", *common)
    with pytest.raises(SystemExit, match="no adapter store at"):
        cli("nope", "--merged", tmp_path / "out", "--adapter-store", tmp_path / "typo")
    assert sorted(os.listdir(tmp_path)) == ["store"]
