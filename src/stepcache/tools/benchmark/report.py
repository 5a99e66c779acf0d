"""The benchmark's outputs: the markdown tables (every row; the frontier per forward budget), a JSON
document, and plots of fidelity against compute and of the frontier."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepcache.tools.benchmark.harness import (
    CALIBRATED,
    ERROR_BUDGET,
    FEWER_STEPS,
    FULL,
    ORACLE,
    PLANNED,
    STATIC_MASK,
    STEP_CACHE,
    Row,
)
from stepcache.tools.common import format_number


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _settings(row: Row) -> str:
    return ", ".join(f"{k}={v}" for k, v in row.method.config.items()) or "-"


def markdown_table(rows: Sequence[Row]) -> str:
    """One row per method: forwards, time, speedup, fidelity and quality columns (config fields in the
    user-facing names, as a config file spells them)."""
    fidelity_keys = list(dict.fromkeys(k for row in rows for k in row.fidelity))
    quality_keys = list(dict.fromkeys(k for row in rows for k in row.quality))
    header = ["method", "config", "steps", "nfe", "wall_s", "speedup", *fidelity_keys, *quality_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.method.method,
            _settings(row),
            str(row.method.num_steps),
            f"{row.nfe:.2f}",
            format_number(row.wall_s),
            f"{row.speedup:.2f}x",
            *(_cell(row.fidelity.get(k)) for k in fidelity_keys),
            *(_cell(row.quality.get(k)) for k in quality_keys),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier(rows: Sequence[Row], budgets: Sequence[int], metric: str = "psnr_db") -> dict[int, dict[str, Row]]:
    """For each forward budget, the best row (by ``metric``) of each method family. A row counts at
    the smallest budget at or above its forwards (one at 4.56 counts at 5); rows above the largest
    budget, the reference and rows without the metric are left out."""
    budgets = sorted(budgets)
    best: dict[int, dict[str, Row]] = {b: {} for b in budgets}
    for row in rows:
        value = row.fidelity.get(metric)
        if row.method.method == FULL or value is None or not math.isfinite(row.nfe):
            continue
        bucket = next((b for b in budgets if row.nfe <= b + 1e-6), None)
        if bucket is None:
            continue
        current = best[bucket].get(row.method.method)
        if current is None or value > current.fidelity[metric]:
            best[bucket][row.method.method] = row
    return best


def frontier_table(rows: Sequence[Row], budgets: Sequence[int], metric: str = "psnr_db") -> str:
    """Markdown: one line per budget, one column per family (its best ``metric`` there, with its
    forwards), the winner last."""
    table = frontier(rows, budgets, metric)
    families = list(dict.fromkeys(r.method.method for r in rows if r.method.method != FULL))
    families = [f for f in families if any(f in table[b] for b in table)]
    header = ["forwards", *families, "best"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for budget, by_family in table.items():
        cells = [f"<= {budget}"]
        for family in families:
            row = by_family.get(family)
            cells.append("-" if row is None else f"{_cell(row.fidelity[metric])} ({row.nfe:.2f})")
        winner = max(by_family.values(), key=lambda r: r.fidelity[metric], default=None)
        cells.append("-" if winner is None else winner.method.method)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_json(rows: Sequence[Row], budgets: Sequence[int], metric: str = "psnr_db") -> dict[str, Any]:
    return {
        str(budget): {
            family: {"nfe": round(row.nfe, 4), metric: row.fidelity[metric], "config": row.method.config}
            for family, row in by_family.items()
        }
        for budget, by_family in frontier(rows, budgets, metric).items()
    }


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


# One colour per method family in every figure the project draws (bench, frontier, demo).
FAMILY_COLOURS = {
    FULL: "#7f7f7f",
    FEWER_STEPS: "#000000",
    STEP_CACHE: "#1f77b4",
    PLANNED: "#d62728",
    ERROR_BUDGET: "#ff7f0e",
    CALIBRATED: "#9467bd",
    STATIC_MASK: "#8c564b",
    ORACLE: "#2ca02c",
    "first_block_cache": "#17becf",
    "mag_cache": "#bcbd22",
    "taylorseer_cache": "#e377c2",
    "pyramid_attention_broadcast": "#aec7e8",
    "faster_cache": "#c49c94",
}
METRIC_LABELS = {
    "psnr_db": "PSNR against the full-step output (dB, higher is better)",
    "ssim": "SSIM against the full-step output (1 = identical)",
    "action_mse": "action MSE against the full-step actions (squared longest moves)",
}


def family_colour(family: str) -> str:
    return FAMILY_COLOURS.get(family, "#333333")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fidelity(rows: Sequence[Row], path: Path, title: str, metric: str = "psnr_db") -> None:
    """Fidelity against forwards (left) and against wall time (right), one colour per method family;
    each point is labelled with its settings' short form."""
    plt = _pyplot()
    families: dict[str, list[Row]] = {}
    for row in rows:
        if row.fidelity.get(metric) is not None:
            families.setdefault(row.method.method, []).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.6), constrained_layout=True)
    for family, members in families.items():
        for axis, x_of in ((axes[0], lambda r: r.nfe), (axes[1], lambda r: r.wall_s)):
            members_sorted = sorted(members, key=x_of)
            style = "o-" if len(members_sorted) > 1 else "o"
            axis.plot(
                [x_of(r) for r in members_sorted],
                [r.fidelity[metric] for r in members_sorted],
                style,
                color=family_colour(family),
                label=family,
                alpha=0.85,
            )
            if axis is axes[0]:
                for r in members_sorted:
                    axis.annotate(_short_label(r), (x_of(r), r.fidelity[metric]), fontsize=6, alpha=0.7,
                                  xytext=(3, 3), textcoords="offset points")
    full = [r for r in rows if r.method.method == FULL]
    for axis, xlabel in ((axes[0], "transformer forwards per generation (full-step units)"),
                         (axes[1], "wall time per run (s)")):
        if full:
            x = full[0].nfe if axis is axes[0] else full[0].wall_s
            axis.axvline(x, color=family_colour(FULL), linestyle=":", label="full (reference)")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(METRIC_LABELS.get(metric, metric))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(rows: Sequence[Row], budgets: Sequence[int], path: Path, title: str, metric: str = "psnr_db") -> None:
    """The frontier: per forward budget, each family's best fidelity (grouped bars)."""
    plt = _pyplot()
    table = frontier(rows, budgets, metric)
    families = [f for f in dict.fromkeys(r.method.method for r in rows) if any(f in table[b] for b in table)]
    width = 0.8 / max(len(families), 1)
    fig, axis = plt.subplots(figsize=(12, 5), constrained_layout=True)
    for i, family in enumerate(families):
        xs = [j + i * width for j, b in enumerate(table) if family in table[b]]
        ys = [table[b][family].fidelity[metric] for b in table if family in table[b]]
        axis.bar(xs, ys, width=width, color=family_colour(family), label=family)
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(table))], [f"<= {b}" for b in table])
    axis.set_xlabel("forward budget (transformer forwards per generation; rows count at the next budget up)")
    axis.set_ylabel(METRIC_LABELS.get(metric, metric))
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, ncol=3)
    axis.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short_label(row: Row) -> str:
    """A few characters that tell the points of one family apart on a plot."""
    config = row.method.config
    for key in ("step_cache_dit_forward_budget", "velocity_error_budget", "num_steps", "threshold",
                "cache_interval", "spatial_attention_block_skip_range"):
        if key in config:
            return str(config[key])
    if "velocity_sim_thresholds" in config:
        return "/".join(str(t) for t in config["velocity_sim_thresholds"])
    if "step_cache_dit_static_steps" in config:
        return ",".join(str(s) for s in config["step_cache_dit_static_steps"])
    return ""
