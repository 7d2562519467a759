"""The base model's configuration, shared by `serve`, `train` and `adapters export`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEFAULT_HOME = Path("~/.cache/loraplex")
HOME_ENV = "LORAPLEX_HOME"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZATIONS = ("nf4", "none")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None
    """HF model id or local directory (default: the embedded SmolLM2-135M-Instruct)."""
    home: Path = field(
        default_factory=DEFAULT_HOME.expanduser,
        metadata={"env": HOME_ENV, "shown": "~/.cache/loraplex"},
    )
    """Where converted models and the adapter store live."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = CUDA when present, else CPU."""
    quantization: Literal["nf4", "none"] = "nf4"
    """nf4 = bitsandbytes 4-bit NF4 with double quantization; none = the compute dtype."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Compute dtype of the base model; auto = bf16 on CUDA, and on a CPU bf16 unless float32
    matmuls are measured much faster (CPUs without native bf16), cached per machine."""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be nf4 or none, got {self.quantization!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
