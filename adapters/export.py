"""`loraplex adapters export NAME --merged OUT`: one adapter folded into a full model.

For users who want one plain model per adapter (another runtime, an offline evaluation, a
hand-off): OUT is a Hugging Face checkpoint in safetensors that
`AutoModelForCausalLM.from_pretrained(OUT)` loads with no quantization config and no PEFT.

The base is the one the server serves: loaded by the server's loader with the same NF4
quantization (so the same fingerprint), then every 4-bit linear is swapped for a plain
`nn.Linear` holding its dequantized weight, and each targeted module gets the adapter's delta:

    W_merged (out, in) = dequantize(W_nf4) + B (out, r) @ A (r, in)    (scaling already in B)

all in float32, rounded once to the saved dtype. The base is loaded with float32 compute, so
the dequantized NF4 values are not rounded before the merge; the 4-bit codes are still those
the server holds (the compute dtype does not enter the quantization of a bfloat16 checkpoint,
and the fingerprint leaves it out). training/frozen_base.py also dequantizes once, but keeps
the 4-bit parameter and patches the forward, on CPU only; a checkpoint needs the module itself
replaced, so that the state dict holds plain weights, on any device.

OUT is written into a temporary directory beside it and renamed into place at the end, so a
failure leaves nothing half-written; `loraplex_export.json` in OUT says what was merged.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from loraplex.adapters.config import DEFAULT_MAX_ADAPTER_BYTES, ExportConfig
from loraplex.adapters.registry import AdapterRegistry, check_adapter_id
from loraplex.adapters.store import AdapterStore, digest_files
from loraplex.adapters.validate import check_entries, load_adapter
from loraplex.core.errors import AdapterNotFound
from loraplex.core.model import LoadedModel, dense_weight, load_model, lora_target_shapes
from loraplex.core.types import AdapterVersion, AdapterWeights, BaseModelSpec

log = logging.getLogger(__name__)

MANIFEST_FILE = "loraplex_export.json"
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_VERSIONED = ("loraplex", "torch", "transformers", "peft", "bitsandbytes", "safetensors")


@dataclass(frozen=True)
class AdapterOrigin:
    """Where the merged adapter came from, for the export's manifest."""

    adapter_id: str
    digest: str  # "sha256:<hex>" over the adapter files, as the store computes it
    version: int | None = None  # None: a local directory, not a stored version
    source: str = ""  # the directory, or where the stored version was registered from
    base_model_fingerprint: str | None = None  # the base it was registered against


# -- OUT ----------------------------------------------------------------------------------------
def check_out(out: Path, force: bool = False) -> None:
    """Refuse an OUT that holds something, unless `force` (then it is replaced at the end)."""
    if force or not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; pass --force to replace it")
    if any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists and is not empty; choose another OUT or pass --force to replace it"
        )


def _move_into_place(staging: Path, out: Path, force: bool) -> None:
    """Rename the finished staging directory to OUT; an old OUT goes only once it is replaced."""
    check_out(out, force)  # again: something may have appeared while the model was merged
    old = None
    if os.path.lexists(out):
        if not out.is_symlink() and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:  # --force: set the old one aside, so OUT is never missing a finished export
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / "old"
            os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


# -- the merge ----------------------------------------------------------------------------------
def _is_4bit(module: nn.Module) -> bool:
    # bitsandbytes' Params4bit carries its quant_state; no import of bnb.nn needed to tell.
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def _merged_linear(
    module: nn.Module, update: tuple[torch.Tensor, torch.Tensor] | None, dtype: torch.dtype
) -> nn.Linear:
    """A plain linear with the module's weight, plus B @ A when given, rounded once to dtype."""
    weight = dense_weight(module).float()  # (out, in)
    if update is not None:
        a, b = update  # A (r, in), B (out, r) with the scaling folded in; float32
        weight += b.to(weight.device) @ a.to(weight.device)
    bias = module.bias if isinstance(module.bias, torch.Tensor) else None
    with torch.device("meta"):  # no throwaway initialisation of a weight about to be replaced
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return linear


def merge_into_base(model: nn.Module, weights: AdapterWeights, dtype: torch.dtype) -> int:
    """Swap every 4-bit linear (and every targeted one) of `model` for a plain `nn.Linear` in
    `dtype`, with the adapter merged into the targeted ones; the rest of the model is cast to
    `dtype`. Returns how many 4-bit linears were dequantized."""
    modules = dict(model.named_modules())
    missing = sorted(set(weights.modules) - set(modules))
    if missing:
        raise ValueError(f"the adapter targets modules the base lacks: {', '.join(missing[:4])}")
    quantized = [n for n, m in modules.items() if _is_4bit(m)]
    log.info(
        "dequantizing %d 4-bit linear layers, merging the adapter into %d modules "
        "(float32, saved as %s)",
        len(quantized),
        len(weights.modules),
        str(dtype).removeprefix("torch."),
    )
    # One module at a time, each old one dropped once swapped: a float32 copy of the whole
    # model never exists at once.
    for name in sorted(set(quantized) | set(weights.modules)):
        old = modules.pop(name)
        model.set_submodule(name, _merged_linear(old, weights.modules.get(name), dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the saved config must not ask for bitsandbytes again
        quantizer.remove_quantization_config(model)  # (and transformers refuses .to(dtype) before)
    model.to(dtype)  # embeddings, norms and the head
    return len(quantized)


# -- the checkpoint -----------------------------------------------------------------------------
def export_merged(
    loaded: LoadedModel,
    weights: AdapterWeights,
    out: Path,
    dtype: torch.dtype = torch.bfloat16,
    origin: AdapterOrigin | None = None,
    force: bool = False,
) -> Path:
    """Merge `weights` into the loaded base and save it to `out` as a plain checkpoint; returns
    `out`. The model is consumed (its linears are swapped): load a fresh one for anything else.
    A failure leaves `out` as it was."""
    out = Path(out).expanduser().absolute()
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        dequantized = merge_into_base(loaded.model, weights, dtype)
        log.info("saving the merged model to %s", out)
        loaded.model.save_pretrained(staging, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)  # type: ignore[attr-defined]
        manifest = export_manifest(loaded, weights, dtype, origin, dequantized)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(staging, out, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported the merged model to %s", out)
    return out


def export_manifest(
    loaded: LoadedModel,
    weights: AdapterWeights,
    dtype: torch.dtype,
    origin: AdapterOrigin | None,
    dequantized: int,
) -> dict[str, object]:
    """What OUT holds: which adapter (id, version, digest) on which base, in which dtype, made
    by which library versions: enough to tell two exports apart and to redo one."""
    return {
        "adapter": dataclasses.asdict(origin) if origin is not None else None,
        "rank": weights.rank,
        "lora_alpha": weights.lora_alpha,
        "scaling": weights.scaling,
        "merged_modules": sorted(weights.modules),
        "base": {
            "model": loaded.model_id,
            "fingerprint": loaded.fingerprint,
            "quantization": loaded.quantization,
            "dequantized_linears": dequantized,
        },
        "dtype": str(dtype).removeprefix("torch."),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {name: _version(name) for name in _VERSIONED},
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- from a name or a directory -----------------------------------------------------------------
def export_spec(loaded: LoadedModel) -> BaseModelSpec:
    """The validation spec for an export. Rank is a serving limit (slot sizes), not one of the
    merge: any rank up to the widest layer is accepted."""
    shapes = lora_target_shapes(loaded.model)
    widest = max((max(shape) for shape in shapes.values()), default=1)
    return BaseModelSpec(
        linear_shapes=shapes,
        max_rank=widest,
        fingerprint=loaded.fingerprint,
        max_bytes=DEFAULT_MAX_ADAPTER_BYTES,
    )


def stored_version(store: AdapterStore, adapter_id: str, version: int | None) -> AdapterVersion:
    """The stored version to export: `version`, or the latest."""
    check_adapter_id(adapter_id)
    versions = store.versions(adapter_id)  # AdapterNotFound names the id
    if version is None:
        return versions[-1]
    for candidate in versions:
        if candidate.version == version:
            return candidate
    live = ", ".join(str(v.version) for v in versions)
    raise AdapterNotFound(f"adapter {adapter_id!r} has no version {version} (live: {live})")


def open_store(config: ExportConfig) -> AdapterStore:
    """The server's adapter store; a local one must exist (an export never creates a store)."""
    url = config.store.store_location(config.model.home)
    if "://" not in url and not Path(url).expanduser().is_dir():
        raise AdapterNotFound(f"no adapter store at {url} (see --home and --adapter-store)")
    return AdapterStore(url, config.store.storage_options)


def export_adapter(config: ExportConfig) -> Path:
    """The CLI's export: `config.adapter` names a stored adapter (or, with `from_dir`, is a
    PEFT directory). What can be refused cheaply (OUT, the name, the directory) is refused
    before the model loads."""
    out = Path(config.merged).expanduser().absolute()
    check_out(out, config.force)
    store, stored = None, None
    directory = Path(config.adapter).expanduser().absolute()
    if config.from_dir:
        if config.version is not None:
            raise ValueError("--version selects a stored version; it does not apply to --from-dir")
        check_entries(directory)
    else:
        store = open_store(config)
        stored = stored_version(store, config.adapter, config.version)
    # float32 compute: the NF4 values dequantized as they are, rounded once after the merge.
    loaded = load_model(dataclasses.replace(config.model, dtype="float32"))
    spec = export_spec(loaded)
    if store is not None and stored is not None:
        weights, origin = _stored_weights(store, stored, spec)
    else:
        weights = load_adapter(directory, spec)
        origin = AdapterOrigin(
            adapter_id=directory.name, digest=digest_files(directory), source=str(directory)
        )
    return export_merged(loaded, weights, out, EXPORT_DTYPES[config.dtype], origin, config.force)


def _stored_weights(
    store: AdapterStore, stored: AdapterVersion, spec: BaseModelSpec
) -> tuple[AdapterWeights, AdapterOrigin]:
    log.info("adapter %s version %d (%s)", stored.adapter_id, stored.version, stored.digest)
    if stored.base_model_fingerprint != spec.fingerprint:
        # Shapes are validated; whether the weights are the same base only the fingerprint says.
        log.warning(
            "adapter %s v%d was registered against base %s, not the loaded one (%s): check "
            "--model and --home",
            stored.adapter_id,
            stored.version,
            stored.base_model_fingerprint,
            spec.fingerprint,
        )
    weights = AdapterRegistry(store, spec, ()).load_weights(stored)
    origin = AdapterOrigin(
        adapter_id=stored.adapter_id,
        digest=stored.digest,
        version=stored.version,
        source=stored.source,
        base_model_fingerprint=stored.base_model_fingerprint,
    )
    return weights, origin
