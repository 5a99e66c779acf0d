"""The benchmark's outputs: a markdown table, a JSON document and a plot of fidelity against compute."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepcache.tools.benchmark.harness import Row


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[Row]) -> str:
    """One row per method: forwards, time, speedup, fidelity and quality columns."""
    fidelity_keys = list(dict.fromkeys(k for row in rows for k in row.fidelity))
    quality_keys = list(dict.fromkeys(k for row in rows for k in row.quality))
    header = ["method", "config", "steps", "nfe", "wall_s", "speedup", *fidelity_keys, *quality_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        settings = ", ".join(f"{k}={v}" for k, v in row.method.config.items())
        cells = [
            row.method.method,
            settings or "-",
            str(row.method.num_steps),
            f"{row.nfe:.2f}",
            f"{row.wall_s:.4f}",
            f"{row.speedup:.2f}x",
            *(_cell(row.fidelity.get(k)) for k in fidelity_keys),
            *(_cell(row.quality.get(k)) for k in quality_keys),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def benchmark_json(model: str, steps: int, rows: Sequence[Row], **extra: Any) -> dict[str, Any]:
    """``{"model", "steps", "results": [...]}``; non-finite numbers become null."""
    document = {"model": model, "steps": steps, **extra, "results": [row.as_json() for row in rows]}
    return _json_safe(document)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def plot_fidelity(rows: Sequence[Row], path: Path, title: str, metric: str = "psnr_db") -> None:
    """Fidelity against forwards (left) and against wall time (right), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[str, list[Row]] = {}
    for row in rows:
        if row.fidelity.get(metric) is not None:
            families.setdefault(row.method.method, []).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for family, members in families.items():
        for axis, x_of in ((axes[0], lambda r: r.nfe), (axes[1], lambda r: r.wall_s)):
            members_sorted = sorted(members, key=x_of)
            style = "o-" if len(members_sorted) > 1 else "o"
            axis.plot(
                [x_of(r) for r in members_sorted],
                [r.fidelity[metric] for r in members_sorted],
                style,
                label=family,
                alpha=0.85,
            )
    full = [r for r in rows if r.method.method == "full"]
    for axis, xlabel in ((axes[0], "transformer forwards (nfe)"), (axes[1], "wall time per run (s)")):
        if full:
            x = full[0].nfe if axis is axes[0] else full[0].wall_s
            axis.axvline(x, color="grey", linestyle=":", label="full (reference)")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(f"{metric} vs full (higher is better)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
