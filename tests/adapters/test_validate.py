"""Validation of adapter directories: the directory's entries, the config, and the safetensors
file parsed without torch. A hand-built spec of a 2-layer base; no model is loaded."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.adapters.entries import MAX_ENTRIES
from loraplex.adapters.validate import CONFIG_FILE, WEIGHTS_FILE, check_entries, load_adapter
from loraplex.core.errors import InvalidAdapter
from loraplex.core.types import BaseModelSpec

HIDDEN = 16
SHAPES = {  # module -> (in_features, out_features)
    f"model.layers.{i}.{name}": shape
    for i in range(2)
    for name, shape in (
        ("self_attn.q_proj", (HIDDEN, HIDDEN)),
        ("self_attn.v_proj", (HIDDEN, 8)),
        ("mlp.gate_proj", (HIDDEN, 32)),
    )
}
SPEC = BaseModelSpec(SHAPES, max_rank=8, fingerprint="test")
RANK, ALPHA = 4, 8
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def peft_config(**changes) -> dict:
    """What PEFT's save_pretrained writes (the fields that matter here)."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": ["q_proj", "v_proj"],
        "exclude_modules": None,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
    }
    config.update(changes)
    return config


def lora_tensors(
    dtype: torch.dtype = torch.float32, modules: tuple[str, ...] = ("q_proj", "v_proj")
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (in_features, out_features) in SHAPES.items():
        if name.rsplit(".", 1)[-1] in modules:
            prefix = f"base_model.model.{name}"
            a = torch.randn(RANK, in_features, generator=generator)
            b = torch.randn(out_features, RANK, generator=generator)
            tensors[f"{prefix}.lora_A.weight"] = a.to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = b.to(dtype)
    return tensors


def write_adapter(path, tensors=None, **config_changes):
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(peft_config(**config_changes)))
    save_file(lora_tensors() if tensors is None else tensors, path / WEIGHTS_FILE)
    return path


@pytest.fixture
def adapter(tmp_path):
    return write_adapter(tmp_path / "adapter")


def rejected(path, fragment: str, spec: BaseModelSpec = SPEC) -> None:
    with pytest.raises(InvalidAdapter) as info:
        load_adapter(path, spec)
    assert fragment in str(info.value)


# -- what passes --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_valid_adapter_loads_as_float32_with_scaling_folded(tmp_path, dtype):
    path = write_adapter(tmp_path / "adapter", lora_tensors(dtype))
    weights = load_adapter(path, SPEC)
    assert weights.rank == RANK and weights.lora_alpha == ALPHA
    assert weights.target_modules == ("q_proj", "v_proj")
    assert sorted(weights.modules) == sorted(n for n in SHAPES if "gate" not in n)
    expected = load_file(path / WEIGHTS_FILE)
    for module, (a, b) in weights.modules.items():
        prefix = f"base_model.model.{module}"
        for t in (a, b):
            assert t.dtype == torch.float32 and t.is_contiguous()
        assert torch.equal(a, expected[f"{prefix}.lora_A.weight"].float())
        assert torch.equal(b, expected[f"{prefix}.lora_B.weight"].float() * (ALPHA / RANK))
    assert weights.nbytes == sum(4 * (a.numel() + b.numel()) for a, b in weights.modules.values())


def test_rslora_scales_by_alpha_over_sqrt_rank(tmp_path):
    path = write_adapter(tmp_path / "adapter", use_rslora=True)
    _, b = load_adapter(path, SPEC).modules["model.layers.1.self_attn.v_proj"]
    expected = load_file(path / WEIGHTS_FILE)[
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    ]
    assert torch.equal(b, expected * (ALPHA / RANK**0.5))


@pytest.mark.parametrize(
    "targets",
    [
        None,  # missing: the tensors decide
        ["self_attn.q_proj", "v_proj"],  # a dotted suffix
        ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "v_proj"],
        r".*\.(q_proj|v_proj)",  # a string is a regex, fullmatched
        "all-linear",
    ],
)
def test_target_modules_in_peft_forms_are_accepted(tmp_path, targets):
    path = write_adapter(tmp_path / "adapter", target_modules=targets)
    assert load_adapter(path, SPEC).target_modules == ("q_proj", "v_proj")


def test_readme_and_training_manifest_are_ignored(adapter):
    (adapter / "README.md").write_text("# model card\n")
    (adapter / "training_manifest.json").write_text("{}")
    assert len(load_adapter(adapter, SPEC).modules) == 4


# -- the config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "not a LoRA adapter: peft_type is 'PREFIX_TUNING'"),
        ({"peft_type": "lora"}, "not a LoRA adapter"),
        ({"r": 16}, "rank 16 exceeds the server's max rank 8"),
        ({"r": 0}, "r must be a positive integer"),
        ({"lora_alpha": "big"}, "lora_alpha must be a finite number"),
        ({"target_modules": ["q_proj", "c_attn"]}, "target module 'c_attn' matches no supported"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target module 'lm_head' matches no supported"),
        ({"target_modules": ["embed_tokens"]}, "'embed_tokens' matches no supported"),
        ({"target_modules": ".*lm_head"}, "regex '.*lm_head' matches no supported"),
        ({"target_modules": "(q_proj"}, "target_modules is not a valid regex"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": [1]}, "target_modules must be a string or a list"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save is not supported"),
        ({"use_dora": True}, "DoRA adapters are not supported"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern is not supported"),
        ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern is not supported"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"bias": "all"}, "bias must be 'none'"),
        ({"lora_bias": True}, "LoRA bias terms"),
        ({"layers_to_transform": 0}, "layers_to_transform is not supported"),
        ({"layers_to_transform": [0]}, "layers_to_transform is not supported"),
        ({"layers_pattern": "layers"}, "layers_pattern is not supported"),
        ({"layer_replication": [[0, 2]]}, "layer_replication is not supported"),
        ({"alora_invocation_tokens": [1, 2]}, "activated LoRA"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    ],
)
def test_invalid_configs_are_rejected(tmp_path, changes, fragment):
    rejected(write_adapter(tmp_path / "adapter", **changes), fragment)


def test_tensors_of_modules_the_config_does_not_target_are_rejected(tmp_path):
    path = write_adapter(tmp_path / "adapter", target_modules=["q_proj"])
    rejected(path, "v_proj' is not selected by target_modules")
    path = write_adapter(tmp_path / "excluded", exclude_modules=["model.layers.1.self_attn.v_proj"])
    rejected(path, "module 'model.layers.1.self_attn.v_proj' is not selected by target_modules")


def test_config_over_the_size_limit_is_rejected(adapter):
    config = peft_config(padding="x" * (1 << 20))
    (adapter / CONFIG_FILE).write_text(json.dumps(config))
    rejected(adapter, "adapter_config.json is")
    rejected(adapter, "bytes, over the limit of 1048576")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "adapter_config.json is not valid JSON"),
        (b"\xff", "adapter_config.json is not valid JSON"),
        (b"[" * 100_000, "adapter_config.json is not valid JSON"),  # too deep to parse
        (b"[1, 2]", "adapter_config.json must hold a JSON object"),
    ],
)
def test_config_that_is_not_a_json_object_is_rejected(adapter, content, fragment):
    (adapter / CONFIG_FILE).write_bytes(content)
    rejected(adapter, fragment)


# -- the tensors --------------------------------------------------------------------------------
def edited(path, fn):
    tensors = load_file(path / WEIGHTS_FILE)
    fn(tensors)
    save_file(tensors, path / WEIGHTS_FILE)
    return path


@pytest.mark.parametrize(
    "name",
    [
        f"{Q0}.lora_A.default.weight",  # an adapter name: PEFT does not save one
        f"{Q0}.lora_magnitude_vector",  # DoRA
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "model.layers.0.self_attn.q_proj.weight",  # a base weight
    ],
)
def test_tensors_not_named_as_peft_saves_lora_weights_are_rejected(adapter, name):
    edited(adapter, lambda t: t.update({name: torch.zeros(RANK, HIDDEN)}))
    rejected(adapter, f"unexpected tensor {name!r}")


def test_tensor_for_a_layer_the_base_lacks_is_rejected(adapter):
    name = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    edited(adapter, lambda t: t.update({name: torch.zeros(RANK, 32)}))
    rejected(adapter, "target module 'model.layers.0.mlp.down_proj' is not a supported layer")


@pytest.mark.parametrize(
    ("kind", "shape", "fragment"),
    [
        ("lora_A", (RANK, HIDDEN - 1), "q_proj.lora_A has shape (4, 15), expected (4, 16)"),
        ("lora_A", (RANK, HIDDEN, 1), "q_proj.lora_A has shape (4, 16, 1)"),
        ("lora_B", (HIDDEN, RANK + 1), "q_proj.lora_B has shape (16, 5), expected (16, 4)"),
        ("lora_B", (RANK, HIDDEN), "q_proj.lora_B has shape (4, 16), expected (16, 4)"),
    ],
)
def test_wrong_shapes_are_rejected(adapter, kind, shape, fragment):
    edited(adapter, lambda t: t.update({f"{Q0}.{kind}.weight": torch.zeros(shape)}))
    rejected(adapter, fragment)


@pytest.mark.parametrize("kind", ["lora_A", "lora_B"])
def test_a_module_needs_both_a_and_b(adapter, kind):
    edited(adapter, lambda t: t.pop(f"{Q0}.{kind}.weight"))
    rejected(adapter, f"model.layers.0.self_attn.q_proj: {kind} weight is missing")


@pytest.mark.parametrize(
    ("dtype", "code"),
    [(torch.int8, "I8"), (torch.int32, "I32"), (torch.bool, "BOOL"), (torch.float64, "F64")],
)
def test_non_float_dtypes_are_rejected(adapter, dtype, code):
    edited(
        adapter, lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(RANK, HIDDEN, dtype=dtype)})
    )
    rejected(adapter, f"tensor '{Q0}.lora_A.weight' has dtype '{code}', expected a float dtype")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected(tmp_path, dtype, value):
    tensors = lora_tensors(dtype)
    tensors[f"{Q0}.lora_B.weight"][3, 1] = value
    rejected(write_adapter(tmp_path / "adapter", tensors), "q_proj.lora_B contains NaN or Inf")


def test_b_that_overflows_when_scaled_is_rejected(tmp_path):
    tensors = lora_tensors()
    tensors[f"{Q0}.lora_B.weight"][0, 0] = 3e38  # finite, but not once doubled
    rejected(write_adapter(tmp_path / "adapter", tensors), "q_proj.lora_B overflows float32")


def test_file_without_tensors_is_rejected(tmp_path):
    rejected(write_adapter(tmp_path / "adapter", {}), "holds no LoRA weights")


def test_weights_over_the_size_limit_are_rejected(adapter):
    size = (adapter / WEIGHTS_FILE).stat().st_size
    small = BaseModelSpec(SHAPES, max_rank=8, fingerprint="test", max_bytes=size - 1)
    rejected(adapter, f"adapter_model.safetensors is {size} bytes, larger than the limit", small)


# -- the safetensors format ---------------------------------------------------------------------
A_BYTES, B_BYTES = RANK * HIDDEN * 4, HIDDEN * RANK * 4  # q_proj's A and B in F32


def raw_weights(path, header: dict, data: bytes, header_len: int | None = None) -> None:
    encoded = json.dumps(header).encode()
    length = len(encoded) if header_len is None else header_len
    (path / WEIGHTS_FILE).write_bytes(struct.pack("<Q", length) + encoded + data)


def q0_header(a=(0, A_BYTES), b=(A_BYTES, A_BYTES + B_BYTES), **extra) -> dict:
    return {
        f"{Q0}.lora_A.weight": {"dtype": "F32", "shape": [RANK, HIDDEN], "data_offsets": list(a)},
        f"{Q0}.lora_B.weight": {"dtype": "F32", "shape": [HIDDEN, RANK], "data_offsets": list(b)},
        **extra,
    }


@pytest.fixture
def q0_adapter(tmp_path):
    """An adapter on layer 0's q_proj whose safetensors file the tests write byte by byte."""
    return write_adapter(
        tmp_path / "adapter", {}, target_modules=["model.layers.0.self_attn.q_proj"]
    )


def test_hand_written_safetensors_file_loads(q0_adapter):
    data = struct.pack("<64f", *range(64)) + struct.pack("<64f", *range(64, 128))
    raw_weights(q0_adapter, {"__metadata__": {"format": "pt"}, **q0_header()}, data)
    a, b = load_adapter(q0_adapter, SPEC).modules["model.layers.0.self_attn.q_proj"]
    assert torch.equal(a, torch.arange(64.0).reshape(RANK, HIDDEN))
    assert torch.equal(b, torch.arange(64.0, 128.0).reshape(HIDDEN, RANK) * (ALPHA / RANK))


ZEROS = bytes(A_BYTES + B_BYTES)


@pytest.mark.parametrize(
    ("header", "data", "header_len", "fragment"),
    [
        ({}, b"", 1 << 40, "header length 1099511627776 is invalid"),
        (q0_header(), ZEROS, 10, "header is not valid JSON"),
        ([1, 2], b"", None, "header is not a JSON object"),
        (q0_header(a=(0, A_BYTES + 8)), ZEROS, None, "spans 264 bytes; F32 [4, 16] needs 256"),
        (q0_header(b=(A_BYTES, A_BYTES + B_BYTES + 4)), ZEROS, None, "are outside the 512-byte"),
        (q0_header(b=(A_BYTES, -1)), ZEROS, None, "invalid data_offsets"),
        (q0_header(b=(A_BYTES, 512.0)), ZEROS, None, "invalid data_offsets"),
        (q0_header(a=(0, A_BYTES), b=(8, 8 + B_BYTES)), ZEROS, None, "overlaps another tensor"),
        (q0_header(b=(A_BYTES + 4, A_BYTES + 4 + B_BYTES)), ZEROS + bytes(4), None, "no tensor"),
        (q0_header(), ZEROS + b"junk", None, "4 trailing bytes after the last tensor"),
        ({"__metadata__": {"n": 1}, **q0_header()}, ZEROS, None, "__metadata__ must map"),
        (
            q0_header(**{"x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "y": 1}}),
            ZEROS,
            None,
            "entry 'x' must have exactly dtype, shape and data_offsets",
        ),
        (q0_header(**{"x": {"dtype": "F32", "shape": [True]}}), ZEROS, None, "entry 'x' must"),
    ],
)
def test_malformed_safetensors_files_are_rejected(q0_adapter, header, data, header_len, fragment):
    raw_weights(q0_adapter, header, data, header_len)
    rejected(q0_adapter, "adapter_model.safetensors is not a readable safetensors file")
    rejected(q0_adapter, fragment)


def test_invalid_shape_in_header_is_rejected(q0_adapter):
    header = q0_header()
    header[f"{Q0}.lora_A.weight"]["shape"] = [RANK, True]
    raw_weights(q0_adapter, header, ZEROS)
    rejected(q0_adapter, f"tensor '{Q0}.lora_A.weight' has an invalid shape [4, True]")


def test_duplicate_tensor_names_are_rejected(q0_adapter):
    entry = json.dumps({"dtype": "F32", "shape": [RANK, HIDDEN], "data_offsets": [0, A_BYTES]})
    text = f'{{"{Q0}.lora_A.weight": {entry}, "{Q0}.lora_A.weight": {entry}}}'.encode()
    (q0_adapter / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(text)) + text + bytes(A_BYTES))
    rejected(q0_adapter, "duplicate keys")


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"])
def test_file_too_short_for_a_header_is_rejected(adapter, content):
    (adapter / WEIGHTS_FILE).write_bytes(content)
    rejected(adapter, "too short for a header")


# -- the directory ------------------------------------------------------------------------------
# What `trainer.save_model()` and PEFT's `save_pretrained` leave beside an adapter. The pickles
# would fail to unpickle: opening one at all is what the tests catch.
SIDE_FILES = {
    "README.md": b"# model card\n",
    "training_manifest.json": b"{}",
    "tokenizer.json": b"{}",
    "special_tokens_map.json": b"{}",
    "vocab.json": b"{}",
    "merges.txt": b"#version: 0.2\n",
    "tokenizer.model": b"\x0a\x0b",
    "added_tokens.json": b"{}",
    "generation_config.json": b"{}",
    "config.json": b"{}",
    "trainer_state.json": b"{}",
    "training_args.bin": b"\x80\x05 not a pickle: unpickling this raises",
    "optimizer.pt": b"\x80\x05 not a pickle",
    "scheduler.pt": b"\x80\x05 not a pickle",
    "rng_state.pth": b"\x80\x05 not a pickle",
    "rng_state_1.pth": b"\x80\x05 not a pickle",
    "scaler.pt": b"\x80\x05 not a pickle",
    "notes.txt": b"anything else is ignored too",
}


def write_side_files(path):
    """A trainer's output around the adapter at `path`: its side files, a checkpoint
    subdirectory, and entries nothing may open (an executable, a FIFO, a link to a secret,
    a name that is not UTF-8)."""
    path.mkdir(parents=True, exist_ok=True)
    for name, data in SIDE_FILES.items():
        (path / name).write_bytes(data)
    (path / "checkpoint-10").mkdir()
    (path / "checkpoint-10" / "optimizer.pt").write_bytes(b"\x80\x05")
    (path / "run.sh").write_bytes(b"#!/bin/sh\n")
    (path / "run.sh").chmod(0o755)
    os.mkfifo(path / "events.fifo")  # opening it would block
    (path / "secret").symlink_to("/etc/shadow")
    (path / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"")  # Latin-1, not UTF-8
    return path


IGNORED = sorted(
    [*SIDE_FILES, "checkpoint-10/", "run.sh", "events.fifo", "secret", repr("caf\udce9.txt")]
)


def test_a_trainers_side_files_are_ignored_unopened(adapter, opened):
    write_side_files(adapter)
    opened.clear()
    entries = check_entries(adapter)
    assert entries.staged == (CONFIG_FILE, WEIGHTS_FILE)
    assert list(entries.ignored) == IGNORED
    assert len(load_adapter(adapter, SPEC).modules) == 4
    assert opened and not [p for p in opened if os.path.basename(p) not in entries.staged]


@pytest.mark.parametrize("name", ["adapter_model.bin", "pytorch_model.bin"])
def test_pickled_weights_are_refused_unopened(adapter, opened, name):
    (adapter / name).write_bytes(b"\x80\x04 this would fail to unpickle")
    opened.clear()
    rejected(adapter, f"{name} is a pickle file and is never loaded; save with safetensors")
    (adapter / WEIGHTS_FILE).unlink()  # in place of the safetensors, the same
    rejected(adapter, f"{name} is a pickle file and is never loaded")
    assert not [p for p in opened if p.endswith(name)]


def test_a_directory_of_too_many_entries_is_refused(adapter):
    for i in range(MAX_ENTRIES):
        (adapter / f"f-{i}").touch()
    rejected(adapter, f"holds more than {MAX_ENTRIES} entries")


def test_without_the_safetensors_side_files_are_no_adapter(tmp_path):
    path = write_side_files(tmp_path / "adapter")
    (path / CONFIG_FILE).write_text(json.dumps(peft_config()))
    rejected(path, f"{WEIGHTS_FILE} is missing from 'adapter'")


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE, "chat_template.jinja"])
def test_executable_files_are_rejected(adapter, name):
    (adapter / name).touch()
    (adapter / name).chmod(0o744)
    rejected(adapter, f"{name} is executable")


def test_fifo_is_rejected_without_being_read(adapter):
    os.mkfifo(adapter / "tokenizer_config.json")  # read for its chat template
    rejected(adapter, "tokenizer_config.json is not a regular file")


def test_a_chat_template_over_the_size_limit_is_rejected(adapter):
    (adapter / "chat_template.jinja").write_bytes(b"x" * ((64 << 10) + 1))
    rejected(adapter, "chat_template.jinja is 65537 bytes, over the limit of 65536")


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE])
def test_missing_adapter_files_are_rejected(adapter, name):
    (adapter / name).unlink()
    rejected(adapter, f"{name} is missing from 'adapter'")


def test_missing_directory_is_rejected(tmp_path):
    rejected(tmp_path / "nowhere", "'nowhere' is not a readable directory")


@pytest.fixture
def linked(tmp_path):
    """An adapter under root/ whose weights file is a symlink to root/blobs/weights."""
    root = tmp_path / "root"
    path = write_adapter(root / "adapter")
    (root / "blobs").mkdir()
    target = root / "blobs" / "weights.safetensors"
    (path / WEIGHTS_FILE).rename(target)
    (path / WEIGHTS_FILE).symlink_to(target)
    return root, path


def test_any_symlink_is_rejected_without_allowed_roots(linked):
    _, path = linked
    rejected(path, "adapter_model.safetensors is a symlink")
    with pytest.raises(InvalidAdapter, match="is a symlink"):
        check_entries(path)


def test_symlink_inside_the_allowed_roots_is_accepted(linked):
    root, path = linked
    check_entries(path, [root])


def test_symlink_leaving_the_allowed_roots_is_rejected(linked):
    root, path = linked
    with pytest.raises(InvalidAdapter, match="links outside the allowed roots"):
        check_entries(path, [root / "adapter"])


def test_symlink_to_a_directory_or_nothing_is_rejected(linked):
    root, path = linked
    (path / "chat_template.jinja").symlink_to(root / "blobs")
    with pytest.raises(InvalidAdapter, match=r"chat_template\.jinja is not a regular file"):
        check_entries(path, [root])
    (path / "chat_template.jinja").unlink()
    (path / "chat_template.jinja").symlink_to(root / "missing")
    with pytest.raises(InvalidAdapter, match=r"chat_template\.jinja is a broken symlink"):
        check_entries(path, [root])
    (path / "chat_template.jinja").unlink()
    (path / "README.md").symlink_to(root / "missing")  # ignored: never followed
    assert check_entries(path, [root]).ignored == ("README.md",)


# -- bounded work whatever the adapter says ----------------------------------
class Ticker:
    """Counts how often another thread gets to run while the block runs: a thread holding the
    GIL (Python's `re` backtracking) would starve it."""

    def __enter__(self):
        import threading
        import time

        self.ticks, self._stop = 0, threading.Event()

        def tick():
            while not self._stop.is_set():
                self.ticks += 1
                time.sleep(0.001)

        self._thread = threading.Thread(target=tick, daemon=True)
        self._thread.start()
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc):
        import time

        self.elapsed = time.monotonic() - self.started
        self._stop.set()
        self._thread.join()


# Patterns that backtrack exponentially in `re` on these names (minutes on the old code).
CATASTROPHIC = [
    (r"([\w.]+)+X", ("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj")),
    (r"model\.(a+)+$", ("model." + "a" * 40 + ".q_proj",)),
    (r"(.*a){25}", ("model." + "a" * 30 + ".q_proj",)),
]


@pytest.mark.parametrize(("pattern", "modules"), CATASTROPHIC)
@pytest.mark.parametrize("key", ["target_modules", "exclude_modules"])
def test_a_catastrophic_regex_is_refused_quickly_without_stalling_other_threads(
    tmp_path, monkeypatch, pattern, modules, key
):
    from loraplex.adapters import patterns

    monkeypatch.setattr(patterns, "_cache", type(patterns._cache)())
    monkeypatch.setattr(patterns, "MATCH_TIMEOUT_S", 0.5)
    spec = BaseModelSpec(dict.fromkeys(modules, (HIDDEN, 32)), max_rank=8, fingerprint="slow")
    changes = {key: pattern} if key == "target_modules" else {key: pattern, "target_modules": None}
    path = write_adapter(tmp_path / "adapter", {}, **changes)
    with Ticker() as ticker, pytest.raises(InvalidAdapter, match=f"{key}.*took over"):
        load_adapter(path, spec)
    assert ticker.elapsed < patterns.MATCH_TIMEOUT_S + 3
    assert ticker.ticks > 50  # the other thread ran all along


def test_a_catastrophic_regex_fails_a_registration_in_bounded_time(tmp_path):
    from loraplex.adapters.registry import AdapterRegistry
    from loraplex.adapters.store import AdapterStore

    pattern, modules = CATASTROPHIC[0]
    spec = BaseModelSpec(dict.fromkeys(modules, (HIDDEN, 32)), max_rank=8, fingerprint="slow")
    path = write_adapter(tmp_path / "adapter", {}, target_modules=pattern)
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), spec, [tmp_path])
    with Ticker() as ticker, pytest.raises(InvalidAdapter, match="took over"):
        registry.register("slow", str(path))
    assert ticker.elapsed < 10 and ticker.ticks > 50
    assert registry.store.latest_versions() == []


def test_regexes_keep_peft_semantics_lookarounds_included(tmp_path):
    tensors = {k: v for k, v in lora_tensors().items() if "layers.0." in k}
    path = write_adapter(
        tmp_path / "adapter", tensors, target_modules=r"^(?!.*layers\.1\.).*\.(q_proj|v_proj)$"
    )
    weights = load_adapter(path, SPEC)
    assert sorted(weights.modules) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    path = write_adapter(tmp_path / "excluded", tensors, exclude_modules=r".*layers\.1\..*")
    assert len(load_adapter(path, SPEC).modules) == 2
    rejected(write_adapter(tmp_path / "all", exclude_modules=r".*layers\.1\..*"), "not selected")


def test_a_regex_is_matched_once_per_base(tmp_path, monkeypatch):
    from loraplex.adapters import patterns

    runs = []
    real = patterns._run_child
    monkeypatch.setattr(patterns, "_cache", type(patterns._cache)())
    monkeypatch.setattr(patterns, "_run_child", lambda *a: runs.append(a) or real(*a))
    path = write_adapter(tmp_path / "adapter", target_modules=r".*\.(q|v)_proj")
    for _ in range(3):  # a stored adapter loaded again costs no child process
        load_adapter(path, SPEC)
    assert len(runs) == 1


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"target_modules": "q_proj|" * 200}, "over the limit of 1024"),
        ({"target_modules": ["q_proj"] * 5000}, "lists 5000 names, over the limit"),
        ({"exclude_modules": ["x"] * 5000}, "exclude_modules lists 5000 names"),
        ({"target_modules": "(" * 100}, "target_modules is not a valid regex"),
        ({"exclude_modules": "[z-a]"}, "exclude_modules is not a valid regex"),
    ],
)
def test_oversized_or_invalid_target_settings_are_refused(tmp_path, changes, fragment):
    rejected(write_adapter(tmp_path / "adapter", **changes), fragment)


def test_long_lists_of_targets_are_matched_by_lookups(tmp_path):
    import time

    many = [f"model.layers.{i}.self_attn.q_proj" for i in range(4000)]  # layers 0, 1 among them
    start = time.monotonic()
    rejected(
        write_adapter(tmp_path / "excluded", exclude_modules=many),
        "model.layers.0.self_attn.q_proj' is not selected",
    )
    path = write_adapter(tmp_path / "listed", target_modules=["q_proj"] * 4000 + ["v_proj"])
    assert len(load_adapter(path, SPEC).modules) == 4
    assert time.monotonic() - start < 2


def test_an_oversized_safetensors_header_is_refused_unparsed(q0_adapter, monkeypatch):
    """A header far beyond what this base's tensors need is never handed to the JSON parser
    (parsing tens of MB would hold the GIL on a shared thread)."""
    from loraplex.adapters import validate

    header = {"__metadata__": {"pad": "x" * (16 << 20)}, **q0_header()}
    raw_weights(q0_adapter, header, ZEROS)
    parsed = []
    real = json.loads
    monkeypatch.setattr(validate.json, "loads", lambda s, **kw: parsed.append(len(s)) or real(s))
    rejected(q0_adapter, "the header is")
    rejected(q0_adapter, "over the limit of")
    assert max(parsed, default=0) < (1 << 20)  # only the config was parsed


def test_the_header_limit_fits_every_tensor_of_the_base(tmp_path):
    """An adapter on every supported layer, with metadata, stays well within the limit."""
    from loraplex.adapters.validate import max_header_bytes

    names = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(80) for p in "qkvo"]
    spec = BaseModelSpec(dict.fromkeys(names, (HIDDEN, HIDDEN)), max_rank=8, fingerprint="big")
    tensors = {}
    for name in names:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(RANK, HIDDEN)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(HIDDEN, RANK)
    path = tmp_path / "adapter"
    path.mkdir()
    (path / CONFIG_FILE).write_text(
        json.dumps(peft_config(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    )
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": "pt", "note": "y" * 4096})
    (size,) = struct.unpack("<Q", (path / WEIGHTS_FILE).read_bytes()[:8])
    assert size < max_header_bytes(spec) / 2
    assert len(load_adapter(path, spec).modules) == len(names)
