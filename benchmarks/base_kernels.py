"""The base layers' kernels, one layer at a time: what `--base-kernel auto` chooses between.

For each 4-bit linear shape of the served model (the embedded SmolLM2 by default), at a few row
counts, the median time of one call of:

    bnb bf16 / bnb fp32   bitsandbytes' 4-bit module, compute dtype bf16 / float32
    bnb dequant fp32      bitsandbytes' dequantize_4bit, then one float32 matmul
    lut fp32 / lut bf16   loraplex's lookup-table dequantization, then one matmul
    dense bf16 / fp32     a dense copy of the weight: one matmul
    packed bf16 / fp32    the copy in oneDNN's blocked layout (where this CPU can pack it)

and what the server's own measurement picks (server/engine/linear.py). Run it natively and with
benchmarks/avx2 (see its sitecustomize.py) for the AVX2 columns (emulated).

    python benchmarks/base_kernels.py [--rows 1,64,512]
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit

from loraplex.core.config import ModelConfig
from loraplex.core.machine import capability, median_seconds
from loraplex.core.model import load_model
from loraplex.server.engine.linear import (
    BaseLinears,
    Nf4Weight,
    _Tables,
    pack,
    packed_linear,
    packing_available,
)

from harness import add_common_args, format_table, make_parser, publish, run_main, setup_logging

log = logging.getLogger("benchmark")

SYSTEMS = ("bnb bf16", "bnb fp32", "bnb dequant fp32", "lut fp32", "lut bf16", "dense bf16",
           "dense fp32", "packed bf16", "packed fp32")  # fmt: skip


def first_of_each_shape(model: torch.nn.Module) -> dict[tuple[int, int], torch.nn.Module]:
    found: dict[tuple[int, int], torch.nn.Module] = {}
    for module in model.modules():
        if hasattr(getattr(module, "weight", None), "quant_state"):
            found.setdefault((int(module.in_features), int(module.out_features)), module)
    return found


def _bnb_dequantized(x: torch.Tensor, data: torch.Tensor, state: object) -> torch.Tensor:
    return F.linear(x, dequantize_4bit(data, state))


def _lut(x: torch.Tensor, nf4: Nf4Weight) -> torch.Tensor:
    return F.linear(x, nf4.dequantize(x.dtype))


def _choice(c: dict) -> str:
    return f"{c['shape'][0]}x{c['shape'][1]} from {c['min_rows']} rows {c['kernel']}"


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--rows", default="1,64,512")
    add_common_args(parser, "base_kernels")
    args = parser.parse_args()
    setup_logging()
    rows_list = [int(r) for r in args.rows.split(",")]
    home = Path(args.home).expanduser()
    device = torch.device("cpu")
    models = {
        dtype: load_model(ModelConfig(home=home, dtype=dtype)).model
        for dtype in ("bfloat16", "float32")
    }
    shapes = {dtype: first_of_each_shape(m) for dtype, m in models.items()}
    tables = _Tables.build(device)
    rows_out = []
    for shape, module16 in shapes["bfloat16"].items():
        module32 = shapes["float32"][shape]
        nf4 = Nf4Weight(module32, tables)  # (before any forward repacks the weights)
        data = module32.weight.data.clone()
        state = copy.deepcopy(module32.weight.quant_state)
        state.dtype = torch.float32
        dense32 = nf4.dequantize(torch.float32)
        dense16 = dense32.to(torch.bfloat16)
        for rows in rows_list:
            x32 = torch.randn(rows, shape[0])
            x16 = x32.to(torch.bfloat16)
            calls = {
                "bnb bf16": partial(module16, x16),
                "bnb fp32": partial(module32, x32),
                "bnb dequant fp32": partial(_bnb_dequantized, x32, data, state),
                "lut fp32": partial(_lut, x32, nf4),
                "lut bf16": partial(_lut, x16, nf4),
                "dense bf16": partial(F.linear, x16, dense16),
                "dense fp32": partial(F.linear, x32, dense32),
            }
            for name, x, dense in (("packed bf16", x16, dense16), ("packed fp32", x32, dense32)):
                if packing_available(device, dense.dtype):
                    calls[name] = partial(packed_linear, x, pack(dense), None)
            with torch.inference_mode():
                ms = {
                    k: 1e3 * median_seconds(f, device, budget_s=0.3, most=15)
                    for k, f in calls.items()
                }
            rows_out.append({"shape": list(shape), "rows": rows, "ms": ms})
            log.info("%s rows %d: %s", shape, rows, {k: round(v, 3) for k, v in ms.items()})
    chosen = {}
    for dtype in ("bfloat16", "float32"):
        fresh = load_model(ModelConfig(home=home, dtype=dtype)).model
        linears = BaseLinears(fresh, getattr(torch, dtype), device, "auto", 1 << 40)
        chosen[dtype] = [dataclasses.asdict(c) for c in linears.choices()]
    cols = [("in x out", 9, ""), ("rows", 5, ""), *((s, max(9, len(s)), ".3f") for s in SYSTEMS)]
    table_rows = [
        [f"{r['shape'][0]}x{r['shape'][1]}", r["rows"], *(r["ms"].get(s) for s in SYSTEMS)]
        for r in rows_out
    ]
    lines = [
        f"one layer, median ms per call, {capability(device)}, torch threads "
        f"{torch.get_num_threads()}",
        *format_table(cols, table_rows),
        "auto's choice (no memory limit): "
        + "; ".join(f"{d}: " + ", ".join(map(_choice, cs)) for d, cs in chosen.items()),
    ]
    report = {"rows": rows_out, "chosen": chosen, "capability": capability(device)}
    publish(report, lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
