"""The benchmark's outputs: the markdown tables (every row; the frontier per forward budget), a JSON
document, and plots of fidelity against compute and of the frontier."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepcache.tools.benchmark.harness import (
    CALIBRATED,
    ERROR_BUDGET,
    FEWER_STEPS,
    FULL,
    NFE_40_BLOCKS,
    ORACLE,
    PLANNED,
    STATIC_MASK,
    STEP_CACHE,
    Method,
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
    block_costs = any(row.nfe_40_blocks is not None for row in rows)  # a column only where a row has one
    header = ["method", "config", "steps", "nfe", *([NFE_40_BLOCKS] if block_costs else []), "wall_s", "speedup",
              *fidelity_keys, *quality_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.method.method,
            _settings(row),
            str(row.method.num_steps),
            f"{row.nfe:.2f}",
            *(["-" if row.nfe_40_blocks is None else f"{row.nfe_40_blocks:.2f}"] if block_costs else []),
            format_number(row.wall_s),
            f"{row.speedup:.2f}x",
            *(_cell(row.fidelity.get(k)) for k in fidelity_keys),
            *(_cell(row.quality.get(k)) for k in quality_keys),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def at_40_blocks(family: str) -> str:
    """The frontier column of ``family``'s rows costed as on a 40-block model."""
    return f"{family} (40 blocks)"


def _frontier_rows(rows: Sequence[Row]) -> list[Row]:
    """``rows``, and each row with a 40-block cost once more, under :func:`at_40_blocks` of its family
    with that cost as its forwards (the frontier counts it both ways)."""
    costed = []
    for row in rows:
        costed.append(row)
        if row.nfe_40_blocks is not None:
            family = at_40_blocks(row.method.method)
            costed.append(dataclasses.replace(row, method=dataclasses.replace(row.method, method=family),
                                              nfe=row.nfe_40_blocks, nfe_40_blocks=None))
    return costed


def frontier(rows: Sequence[Row], budgets: Sequence[int], metric: str = "psnr_db") -> dict[int, dict[str, Row]]:
    """For each forward budget, the best row (by ``metric``) of each method family. A row counts at
    the smallest budget at or above its forwards (one at 4.56 counts at 5); rows above the largest
    budget, the reference and rows without the metric are left out. A row with a 40-block cost also
    counts, at that cost, in the column :func:`at_40_blocks` of its family."""
    budgets = sorted(budgets)
    best: dict[int, dict[str, Row]] = {b: {} for b in budgets}
    for row in _frontier_rows(rows):
        value = _metric(row, metric)
        if row.method.method == FULL or value is None or not math.isfinite(row.nfe):
            continue
        bucket = next((b for b in budgets if row.nfe <= b + 1e-6), None)
        if bucket is None:
            continue
        current = best[bucket].get(row.method.method)
        if current is None or value > _metric(current, metric):
            best[bucket][row.method.method] = row
    return best


def _metric(row: Row, metric: str) -> float | None:
    """A fidelity score (against the full-step output) or a quality score (closed-loop success ...)."""
    value = row.fidelity.get(metric)
    return row.quality.get(metric) if value is None else value


def frontier_table(rows: Sequence[Row], budgets: Sequence[int], metric: str = "psnr_db") -> str:
    """Markdown: one line per budget, one column per family (its best ``metric`` there, with its
    forwards), the winner last."""
    table = frontier(rows, budgets, metric)
    families = list(dict.fromkeys(r.method.method for r in _frontier_rows(rows) if r.method.method != FULL))
    families = [f for f in families if any(f in table[b] for b in table)]
    header = ["forwards", *families, "best"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for budget, by_family in table.items():
        cells = [f"<= {budget}"]
        for family in families:
            row = by_family.get(family)
            cells.append("-" if row is None else f"{_cell(_metric(row, metric))} ({row.nfe:.2f})")
        winner = max(by_family.values(), key=lambda r: _metric(r, metric), default=None)
        cells.append("-" if winner is None else winner.method.method)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_json(rows: Sequence[Row], budgets: Sequence[int], metric: str = "psnr_db") -> dict[str, Any]:
    return {
        str(budget): {
            family: {"nfe": round(row.nfe, 4), metric: _metric(row, metric), "config": row.method.config}
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
    "cache_dit": "#393b79",
    at_40_blocks("cache_dit"): "#9c9ede",
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


def rows_from_json(document: Any) -> list[Row]:
    """The rows of a :func:`benchmark_json` document, enough to redraw its plots (no timing samples,
    nothing to run). Raises ``ValueError`` naming what is missing."""
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise ValueError("not a bench JSON: expected an object with a \"results\" list (stepcache bench --json)")
    rows = []
    for i, entry in enumerate(document["results"]):
        missing = [k for k in ("method", "config", "num_steps", "nfe", "wall_s", "speedup") if k not in entry]
        if missing:
            raise ValueError(f"bench JSON results[{i}] lacks {missing}")
        known = {"method", "config", "num_steps", "nfe", "wall_s", "speedup", "run_steps", NFE_40_BLOCKS}
        rows.append(Row(
            method=Method(entry["method"], dict(entry["config"]), int(entry["num_steps"])),
            nfe=float(entry["nfe"]),
            wall_s=float(entry["wall_s"]),
            speedup=float(entry["speedup"]),
            fidelity={k: entry[k] for k in METRIC_LABELS if k in entry},
            quality={k: v for k, v in entry.items() if k not in known and k not in METRIC_LABELS},
            run_steps=entry.get("run_steps"),
            nfe_40_blocks=None if entry.get(NFE_40_BLOCKS) is None else float(entry[NFE_40_BLOCKS]),
        ))
    return rows


def labelled_rows(rows: Sequence[Row], budgets: Sequence[int], metric: str = "psnr_db") -> list[Row]:
    """The rows worth a label on a plot: per forward budget, the best row of any family but the
    oracle (an upper bound found on the evaluated inputs, not a method one can run)."""
    chosen, measured = [], {id(row) for row in rows}
    for winners in frontier(rows, budgets, metric).values():
        runnable = [r for f, r in winners.items() if f != ORACLE and id(r) in measured]  # not a 40-block recount
        if runnable:
            chosen.append(max(runnable, key=lambda r: r.fidelity[metric]))
    return chosen


def _outside_legend(fig: Any, handles: Sequence[Any], labels: Sequence[str]) -> Any:
    # Outside the axes so no curve is hidden; constrained layout makes room for it on the right.
    return fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)


def plot_fidelity(
    rows: Sequence[Row], path: Path, title: str, budgets: Sequence[int] = (), metric: str = "psnr_db"
) -> Any:
    """Fidelity against forwards (left) and against wall time (right), one colour per method family,
    one legend for both panels outside them; only the best runnable row of each forward budget is
    labelled (family and setting; no labels without ``budgets``). Returns the figure's legend (for tests)."""
    plt = _pyplot()
    families: dict[str, list[Row]] = {}
    for row in rows:
        if row.fidelity.get(metric) is not None:
            families.setdefault(row.method.method, []).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.6), layout="constrained", sharey=True)
    handles, labels = [], []
    for family, members in families.items():
        for axis, x_of in ((axes[0], lambda r: r.nfe), (axes[1], lambda r: r.wall_s)):
            members_sorted = sorted(members, key=x_of)
            (line,) = axis.plot(
                [x_of(r) for r in members_sorted],
                [r.fidelity[metric] for r in members_sorted],
                "o-" if len(members_sorted) > 1 else "o",
                color=family_colour(family),
                alpha=0.85,
                markersize=4,
            )
        handles.append(line)
        labels.append(family)
    chosen = labelled_rows(rows, budgets, metric) if budgets else []
    for k, row in enumerate(sorted(chosen, key=lambda r: r.nfe)):
        setting = _short_label(row)
        axes[0].annotate(
            f"{row.method.method} {setting}".strip(), (row.nfe, row.fidelity[metric]),
            xytext=(-8, 12 + 12 * (k % 2)), textcoords="offset points", ha="right", fontsize=7,
            color=family_colour(row.method.method), arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.6},
        )
    full = [r for r in rows if r.method.method == FULL]
    for axis, xlabel in ((axes[0], "transformer forwards per generation (full-step units)"),
                         (axes[1], "wall time per run (s)")):
        if full:
            x = full[0].nfe if axis is axes[0] else full[0].wall_s
            reference = axis.axvline(x, color=family_colour(FULL), linestyle=":")
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(METRIC_LABELS.get(metric, metric))  # shared by both panels
    if chosen:
        # The labels sit up and to the left of their points, above the curves: room for the outermost.
        low, high = axes[0].get_xlim()
        axes[0].set_xlim(low - 0.15 * (high - low), high)
        low, high = axes[0].get_ylim()
        axes[0].set_ylim(low, high + 0.08 * (high - low))
    axes[0].set_title("labelled: the best row per forward budget (oracle aside)", fontsize=9)
    axes[1].set_title("the same rows against measured wall time (same y axis)", fontsize=9)
    if full:
        handles.append(reference)
        labels.append("full (reference)")
    legend = _outside_legend(fig, handles, labels)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return legend


def plot_frontier(
    rows: Sequence[Row], budgets: Sequence[int], path: Path, title: str, metric: str = "psnr_db"
) -> Any:
    """The frontier: per forward budget, each family's best fidelity (grouped bars), the legend
    outside the axes. Returns the figure's legend (for tests)."""
    plt = _pyplot()
    table = frontier(rows, budgets, metric)
    families = [f for f in dict.fromkeys(r.method.method for r in _frontier_rows(rows))
                if any(f in table[b] for b in table)]
    width = 0.8 / max(len(families), 1)
    fig, axis = plt.subplots(figsize=(13, 5), layout="constrained")
    for i, family in enumerate(families):
        xs = [j + i * width for j, b in enumerate(table) if family in table[b]]
        ys = [table[b][family].fidelity[metric] for b in table if family in table[b]]
        axis.bar(xs, ys, width=width, color=family_colour(family), label=family)
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(table))], [f"<= {b}" for b in table])
    axis.set_xlabel("forward budget (transformer forwards per generation; rows count at the next budget up)")
    axis.set_ylabel(METRIC_LABELS.get(metric, metric))
    axis.grid(axis="y", alpha=0.3)
    legend = _outside_legend(fig, *axis.get_legend_handles_labels())
    axis.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return legend


def _short_label(row: Row) -> str:
    """A few words that tell the points of one family apart on a plot (a schedule as its length, not
    its step list, which would not fit)."""
    config = row.method.config
    if "cache" in config:  # cache-dit: which cache, its compute blocks, its threshold or step mask
        detail = f"mask {config['mask']}" if "mask" in config else f"{config.get('threshold')}"
        return f"{config['cache']} F{config.get('Fn')}B{config.get('Bn')} {detail}"
    named = (("step_cache_dit_forward_budget", "budget {}"), ("velocity_error_budget", "error {}"),
             ("num_steps", "{} steps"), ("threshold", "threshold {}"), ("cache_interval", "interval {}"),
             ("spatial_attention_block_skip_range", "skip range {}"))
    for key, text in named:
        if key in config:
            return text.format(config[key])
    if "velocity_sim_thresholds" in config:
        return "sim " + "/".join(str(t) for t in config["velocity_sim_thresholds"])
    if "step_cache_dit_static_steps" in config:
        return f"{len(config['step_cache_dit_static_steps'])} of {row.method.num_steps} steps"
    return ""
