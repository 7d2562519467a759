"""Draw the benchmark figure from the JSON results, one PNG:

    throughput  tok/s against distinct adapters in the batch (benchmarks/throughput.py);
                base-only systems as horizontal lines, PEFT one at a time dashed (extrapolated)
    online      TTFT p50/p99 and ITL p50/p99 against offered load (benchmarks/online.py),
                with the unloaded latency and the 3x-unloaded TTFT target for reference

A missing results file leaves its panels out.

    python benchmarks/plot.py [--throughput benchmarks/results/throughput.json]
        [--online benchmarks/results/online.json] [--out benchmarks/results/benchmark.png]
"""

from __future__ import annotations

import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

from harness import RESULTS, make_parser, prepare_output, setup_logging

matplotlib.use("Agg")  # before pyplot: no display needed

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import FixedLocator, NullLocator

log = logging.getLogger("plot")

TTFT_TARGET = 3.0  # p99 TTFT within 3x the unloaded TTFT (benchmarks/online.py)
# Fixed colours per system, so figures from different runs read the same.
STYLES: dict[str, dict[str, Any]] = {
    "loraplex mixed": {"color": "tab:blue", "marker": "o"},
    "PEFT mixed batch": {"color": "tab:orange", "marker": "s"},
    "PEFT one at a time": {"color": "tab:red", "marker": "^", "linestyle": "--"},
    "loraplex base": {"color": "tab:blue", "linestyle": ":"},
    "HF generate base": {"color": "tab:gray", "linestyle": "-."},
}


def load_json(path: Path) -> Any | None:
    if not path.exists():
        log.warning("%s not found: its panels are left out", path)
        return None
    return json.loads(path.read_text())


def plot_offline(ax: Axes, data: Any) -> None:
    rows: list[dict[str, Any]] = data["rows"] if isinstance(data, dict) else data
    by_system: dict[str, list[tuple[int, float, str]]] = defaultdict(list)
    for row in rows:
        by_system[row["system"]].append(
            (int(row["adapters"]), float(row["tokens_per_s"]), str(row.get("note", "")))
        )
    counts = sorted({k for points in by_system.values() for k, _, _ in points if k > 0})
    for system, points in by_system.items():
        style = dict(STYLES.get(system, {}))
        if all(k == 0 for k, _, _ in points):  # base only: one level, whatever K
            style.pop("marker", None)
            tok_s = points[-1][1]
            ax.axhline(tok_s, lw=1.5, label=f"{system}, no adapter ({tok_s:.0f})", **style)
            continue
        points = sorted(p for p in points if p[0] > 0)
        extrapolated = system == "PEFT one at a time" or any(
            "extrapolat" in n for _, _, n in points
        )
        if extrapolated:
            style["linestyle"] = "--"
        label = f"{system} (extrapolated)" if extrapolated else system
        xs = [k for k, _, _ in points]
        ys = [t for _, t, _ in points]
        ax.plot(xs, ys, lw=1.8, ms=6, label=label, **style)
        if system == "loraplex mixed":
            for x, y in zip(xs, ys, strict=True):
                ax.annotate(
                    f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center"
                )
    ax.set_xscale("log", base=2)
    if counts:
        ax.xaxis.set_major_locator(FixedLocator(counts))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(k) for k in counts])
        ax.set_xlim(counts[0] / 1.4, counts[-1] * 1.4)
    top = max((t for points in by_system.values() for _, t, _ in points), default=0.0)
    ax.set_ylim(0, top * 1.12 if top > 0 else None)
    ax.set_xlabel("distinct adapters in the batch")
    ax.set_ylabel("output tokens / s")
    engine = isinstance(data, dict) and data.get("via") == "engine"
    title = "Throughput" + (" (in-process engine)" if engine else "")
    if isinstance(data, dict) and "requests" in data and "new_tokens" in data:
        title += f"\n{data['requests']} requests x {data['new_tokens']} new tokens"
        if "rank" in data:
            title += f", r={data['rank']} all-linear"
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _load_axis(ax: Axes, loads: list[dict[str, Any]]) -> list[float]:
    xs = [float(r["load"]) for r in loads]
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{r['load']:.2f}\n{r['offered_rps']:.2f}/s" for r in loads])
    ax.set_xlabel("offered load (fraction of burst capacity, requests/s)")
    ax.margins(x=0.12)
    ax.grid(True, alpha=0.3)
    return xs


def _percentile_lines(
    ax: Axes, xs: list[float], loads: list[dict[str, Any]], key: str, color: str
) -> list[float]:
    values: list[float] = []
    for pct, style in (("p50", "-"), ("p99", "--")):
        pairs = [(x, r[key][pct]) for x, r in zip(xs, loads, strict=True) if r.get(key)]
        if pairs:
            ax.plot(*zip(*pairs, strict=True), style, color=color, marker="o", label=pct)
            values += [v for _, v in pairs]
    return values


def _y_scale(ax: Axes, values: list[float]) -> None:
    """Log when the values span more than 30x, else linear from 0 with headroom for labels."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 30:
        ax.set_yscale("log")
    elif positive:
        ax.set_ylim(0, max(positive) * 1.25)


def plot_ttft(ax: Axes, data: dict[str, Any]) -> None:
    loads = data["loads"]
    xs = _load_axis(ax, loads)
    values = _percentile_lines(ax, xs, loads, "ttft_ms", "tab:blue")
    unloaded = (data.get("unloaded") or {}).get("ttft_ms")
    if unloaded:
        base = unloaded["p50"]
        ax.axhline(base, color="tab:green", ls=":", label=f"unloaded p50 ({base:.0f} ms)")
        ax.axhline(
            TTFT_TARGET * base,
            color="tab:red",
            ls=":",
            label=f"target: p99 <= {TTFT_TARGET:.0f}x unloaded",
        )
        values += [base, TTFT_TARGET * base]
    _y_scale(ax, values)
    ax.set_ylabel("time to first token (ms)")
    capacity = data.get("capacity") or {}
    title = "Online: TTFT, Poisson arrivals"
    if capacity:
        title += (
            f"\ncapacity {capacity['requests_per_s']:.2f} req/s, "
            f"{capacity['output_tokens_per_s']:.0f} tok/s (burst)"
        )
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")


def plot_itl(ax: Axes, data: dict[str, Any]) -> None:
    loads = data["loads"]
    xs = _load_axis(ax, loads)
    values = _percentile_lines(ax, xs, loads, "itl_ms", "tab:purple")
    unloaded = (data.get("unloaded") or {}).get("itl_ms")
    if unloaded:
        base = unloaded["p50"]
        ax.axhline(base, color="tab:green", ls=":", label=f"unloaded p50 ({base:.0f} ms)")
        values.append(base)
    for x, row in zip(xs, loads, strict=True):  # what each load level achieved
        if row.get("itl_ms"):
            ax.annotate(
                f"{row['output_tokens_per_s']:.0f} tok/s",
                (x, row["itl_ms"]["p99"]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=7,
                color="tab:gray",
            )
    _y_scale(ax, values)
    ax.set_ylabel("inter-token latency (ms)")
    ax.set_title("Online: ITL per token\n(achieved output tok/s above p99)")
    ax.legend(fontsize=8, loc="best")


def online_caption(data: dict[str, Any]) -> str:
    cfg = data.get("config") or {}
    info = cfg.get("model_info") or {}
    parts = [
        f"{cfg.get('adapters', '?')} adapters round-robin",
        f"{cfg.get('requests', '?')} requests per load",
        f"<= {cfg.get('new_tokens', '?')} new tokens",
    ]
    if info:
        parts.append(
            f"{info.get('model_id', '')} on {info.get('device', '?')}, "
            f"max_batch_size {info.get('max_batch_size', '?')}, "
            f"max_loras {info.get('max_loras', '?')}"
        )
    return "online: " + "; ".join(parts)


def machine_caption(data: dict[str, Any]) -> str | None:
    """The machine a result was measured on (its "machine" record), in one line."""
    machine = data.get("machine") if isinstance(data, dict) else None
    if not machine:
        return None
    return (
        f"{machine.get('cpu_model', '?')}, {machine.get('cpus', '?')} CPUs "
        f"({machine.get('cpu_capability', '?')}), torch {machine.get('torch', '?')} with "
        f"{machine.get('torch_threads', '?')} threads"
    )


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--throughput", default=str(RESULTS / "throughput.json"))
    parser.add_argument("--online", default=str(RESULTS / "online.json"))
    parser.add_argument("--out", default=str(RESULTS / "benchmark.png"))
    parser.add_argument("--dpi", type=int, default=120)
    args = parser.parse_args(argv)
    setup_logging()

    offline = load_json(Path(args.throughput))
    online = load_json(Path(args.online))
    if online is not None and not online.get("loads"):
        log.warning("%s has no load levels: its panels are left out", args.online)
        online = None
    panels = ([plot_offline] if offline is not None else []) + (
        [plot_ttft, plot_itl] if online is not None else []
    )
    if not panels:
        log.error("nothing to plot: neither %s nor %s", args.throughput, args.online)
        return 1

    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.8), squeeze=False)
    for ax, draw in zip(axes[0], panels, strict=True):
        draw(ax, offline if draw is plot_offline else online)
    captions = [online_caption(online)] if online is not None else []
    machines = {
        name: machine_caption(data)
        for name, data in (("offline", offline), ("online", online))
        if data is not None
    }
    if len(set(machines.values())) == 1 and None not in machines.values():
        captions.append(f"machine: {next(iter(machines.values()))}")
    else:
        captions += [f"{name} machine: {line}" for name, line in machines.items() if line]
    if captions:
        text = "\n".join(captions)
        fig.text(0.5, 0.01, text, ha="center", va="bottom", fontsize=8, color="dimgray")
    fig.tight_layout(rect=(0, 0.03 * len(captions), 1, 1))
    out = prepare_output(args.out)
    fig.savefig(out, dpi=args.dpi)
    plt.close(fig)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
