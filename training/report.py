"""The training report: report.json (everything), report.md (for people) and loss.png (train
and eval loss against steps), written next to the adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraplex.training.evaluate import Scores


def write_report(
    out: Path, summary: dict[str, Any], log_history: list[dict[str, Any]], scores: Scores | None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {**summary, "log_history": log_history}
    if scores is not None:
        report["generation_eval"] = {
            "base": scores.base_mean,
            "adapter": scores.adapter_mean,
            "examples": len(scores.base),
            "samples": scores.samples,
        }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(summary, scores))
    plot_loss(log_history, out / "loss.png")


def markdown(summary: dict[str, Any], scores: Scores | None) -> str:
    lines = ["# Training report", ""]
    for key in ("base_model", "train_examples", "eval_examples", "length_report"):
        if key in summary:
            lines.append(f"- **{key.replace('_', ' ')}**: {summary[key]}")
    metrics = summary.get("metrics", {})
    for key in ("train_loss", "eval_loss", "train_tokens_per_second", "peak_memory_mb"):
        if key in metrics:
            lines.append(f"- **{key.replace('_', ' ')}**: {metrics[key]:.4g}")
    if scores is not None:
        lines += [
            "",
            f"## Held-out score ({len(scores.base)} examples)",
            "",
            "| model | score |",
            "|---|---|",
            f"| base | {scores.base_mean:.3f} |",
            f"| adapter | {scores.adapter_mean:.3f} |",
            "",
        ]
        for s in scores.samples:
            lines += [
                f"**prompt**: {s['prompt']!r}  ",
                f"**reference**: {s['reference']!r}  ",
                f"**base**: {s['base']!r}  ",
                f"**adapter**: {s['adapter']!r}",
                "",
            ]
    lines += ["", "![loss](loss.png)", ""]
    return "\n".join(lines)


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
