"""``stepcache demo``: the main job. A DreamZero-style model drives its world closed loop, with every
cache setting a user would consider, and the report says what each costs in task success.

By default the model is ``dreamzero-detour``: reach the instructed target around an obstacle that ends
the episode on contact (see :mod:`stepcache.models.dreamzero_detour.world` and docs/dreamzero.md). There
cutting the work per chunk can cost success. ``--model dreamzero-mini`` runs the older reaching task.

Rows (``--rows`` picks some):

- ``none``: every one of the 16 denoising steps computed;
- ``step_cache``: the seed's rule with its defaults (or ``--cache-config``);
- ``fast`` / ``balanced`` / ``quality``: the presets, which need no calibration;
- ``calibrated``: ``stepcache.calibrate`` at 4 forwards on episodes of ``--calibration-seed``;
- ``static_mask``: DreamZero's released 8-of-16 schedule;
- ``fewer_steps K``: K denoising steps, at the (rounded) forwards each cached row spent.

Every row drives the same ``--episodes`` episodes (world seeds ``1000 * seed + 500 + i``, each
episode's noise seeded by its world seed). They run ``--sessions`` at a time through ``Omni``'s
sessions and batching engine (decisions per session). Reported per row:

- success rate with its 95% Wilson interval, crash rate, mean chunks to success;
- DiT forwards per chunk;
- median latency per chunk and the speedup over ``none``, timed on the first ``--timed-episodes``
  episodes run one at a time, interleaved across rows;
- action MSE and predicted-video PSNR against ``none``, on the same inputs and noise (``none``'s
  observations replayed open loop).

Writes into ``--out``:

- ``success.png``: success against forwards, with the intervals;
- ``episode.png``: one episode's observations, predicted frames and trajectories, none against step_cache;
- ``similarity.png``: the similarity the seed rule reads at each step, its thresholds and decisions.

``--json`` writes the figures as JSON. Each row has the colour of its method family in ``stepcache
bench``'s figures.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepcache.tools.benchmark.closed_loop import EpisodeRecord, replay_episodes, run_episodes, success_summary
from stepcache.tools.common import (
    UsageError,
    add_cache_config_argument,
    add_json_argument,
    add_progress_argument,
    add_threads_argument,
    add_update_docs_figures_argument,
    checked_cache_config,
    format_cache_config,
    format_number,
    positive_int,
    prepare_out_dir,
    prepare_out_file,
    progress_bar,
    run_metadata,
    seed_int,
    set_torch_threads,
    show_progress,
    write_json,
)

logger = logging.getLogger(__name__)

EPISODE_PNG, SIMILARITY_PNG, SUCCESS_PNG = "episode.png", "similarity.png", "success.png"
ROWS = ("none", "step_cache", "fast", "balanced", "quality", "calibrated", "static_mask", "fewer_steps")
PRESET_ROWS = ("fast", "balanced", "quality")
CALIBRATED_FORWARDS = 4  # the budget of the calibrated row: the issue of a robot served at a quarter of the work
# World seeds: like the bench's closed-loop episodes, so that --seed and --calibration-seed never share one.
SEED_STRIDE, FIRST_EPISODE = 1000, 500
MAX_EPISODES = SEED_STRIDE - FIRST_EPISODE


def episode_seeds(seed: int, episodes: int) -> list[int]:
    """The world seeds of the episodes the demo evaluates with ``--seed seed``."""
    return [SEED_STRIDE * seed + FIRST_EPISODE + i for i in range(episodes)]


def _rows(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in ROWS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{unknown[0] if unknown else text!r} is not a row; allowed: "
                                         f"{', '.join(ROWS)} (comma-separated)")
    return names if "none" in names else ("none", *names)  # every comparison is against none


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stepcache.models.dreamzero.weights import BUNDLED_MODELS, DEFAULT_MODEL

    parser.add_argument("--episodes", type=positive_int, default=100, metavar="N",
                        help=f"episodes per row (at most {MAX_EPISODES})")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help=f"seed of the evaluated episodes (world seeds {SEED_STRIDE} * seed + {FIRST_EPISODE} + i)")
    parser.add_argument("--calibration-seed", type=seed_int, default=None, metavar="SEED",
                        help="seed of the episodes the calibrated row is tuned on (default: --seed + 1); never --seed")
    parser.add_argument("--rows", type=_rows, default=ROWS, metavar="NAMES",
                        help=f"comma-separated rows to run (default: all of {', '.join(ROWS)}); none always runs")
    parser.add_argument("--sessions", type=positive_int, default=32, metavar="N",
                        help="episodes run at once through the batching engine (1: one at a time)")
    parser.add_argument("--timed-episodes", type=int, default=20, metavar="N",
                        help="episodes per row run one at a time for latency and speedup (0: none timed)")
    parser.add_argument("--out", type=Path, default=Path("stepcache-demo"), metavar="DIR",
                        help=f"folder for {SUCCESS_PNG}, {EPISODE_PNG} and {SIMILARITY_PNG}")
    add_json_argument(parser, "also write the figures, the cache configs and the run's versions to this JSON file")
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME|DIR",
                        help=f"bundled model (choices: {', '.join(BUNDLED_MODELS)}) or a folder with config.json + "
                             "model.safetensors")
    add_cache_config_argument(parser)
    add_threads_argument(parser, default=1, note="per-chunk tensors are small")
    add_update_docs_figures_argument(parser)
    add_progress_argument(parser)


def validate(args: argparse.Namespace) -> None:
    from stepcache.models.dreamzero.weights import load_model, load_world_config

    args.cache_config = checked_cache_config(args.cache_config)
    if args.episodes > MAX_EPISODES:
        raise UsageError(f"argument --episodes: {args.episodes} is not allowed; allowed: 1..{MAX_EPISODES}")
    if args.timed_episodes < 0:
        raise UsageError(f"argument --timed-episodes: {args.timed_episodes} is not allowed; allowed: >= 0")
    args.timed_episodes = min(args.timed_episodes, args.episodes)
    if args.calibration_seed is None:
        args.calibration_seed = args.seed + 1
    if args.calibration_seed == args.seed:
        raise UsageError(f"argument --calibration-seed: {args.calibration_seed} is the evaluated --seed; calibration "
                         "must use other episodes")
    try:  # the bundled name or the folder, its config, its world and its weights: what Omni will load
        load_model(args.model)
        load_world_config(args.model)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"argument --model: {err}") from None
    args.out = prepare_out_dir(args.out, update_docs_figures=args.update_docs_figures)
    if args.json is not None:
        args.json = prepare_out_file(args.json, update_docs_figures=args.update_docs_figures)


@dataclass
class DemoRow:
    """One row of the report: how the model runs, and the bench family that gives its colour."""

    name: str
    family: str
    num_steps: int
    cache_config: Any = None  # a DiffusionCacheConfig, or None: no cache

    def make_omni(self, model: Any) -> Any:
        from stepcache.omni import Omni

        if self.cache_config is None:
            return Omni(model, cache_backend=None, pipeline_config={"num_inference_steps": self.num_steps})
        return Omni(model, cache_backend="step_cache", cache_config=self.cache_config)


def cache_family(cache_config: Any) -> str:
    """The bench family of a cache config: the seed's rule, a planned budget, an error budget,
    DreamZero's mask, or another fixed schedule (what calibration writes)."""
    from stepcache.config import DREAMZERO_STATIC_RUN_STEPS, StepCacheConfig
    from stepcache.tools.benchmark.report import CALIBRATED, ERROR_BUDGET, PLANNED, STATIC_MASK, STEP_CACHE

    config = StepCacheConfig.from_diffusion_cache_config(cache_config)
    if config.static_run_steps is not None:
        return STATIC_MASK if config.static_run_steps == DREAMZERO_STATIC_RUN_STEPS else CALIBRATED
    return {"planned": PLANNED, "error_budget": ERROR_BUDGET}.get(config.policy, STEP_CACHE)


def run_colours(cache_config: Any) -> dict[str, str]:
    """The colours of ``none`` and of a ``step_cache`` row running ``cache_config``."""
    from stepcache.tools.benchmark.report import FULL, family_colour

    return {"none": family_colour(FULL), "step_cache": family_colour(cache_family(cache_config))}


def cached_rows(args: argparse.Namespace, steps: int, calibrate: Any) -> list[DemoRow]:
    """The rows that run a cache, in report order; ``calibrate()`` returns the calibrated config."""
    from stepcache.config import DREAMZERO_STATIC_RUN_STEPS, DiffusionCacheConfig
    from stepcache.tools.benchmark.report import CALIBRATED, PLANNED, STATIC_MASK

    rows = []
    if "step_cache" in args.rows:
        rows.append(DemoRow("step_cache", cache_family(args.cache_config), steps, args.cache_config))
    rows += [DemoRow(name, PLANNED, steps, DiffusionCacheConfig.preset(name)) for name in PRESET_ROWS
             if name in args.rows]
    if "calibrated" in args.rows:
        rows.append(DemoRow("calibrated", CALIBRATED, steps, calibrate()))
    if "static_mask" in args.rows:
        rows.append(DemoRow("static_mask", STATIC_MASK, steps,
                            DiffusionCacheConfig(step_cache_dit_static_steps=list(DREAMZERO_STATIC_RUN_STEPS))))
    return rows


def summarise(records: list[EpisodeRecord]) -> dict[str, Any]:
    forwards = [f for r in records for f in r.forwards]
    return {
        **success_summary(records),
        "chunks": len(forwards),
        "chunks_per_episode": float(np.mean([r.chunks for r in records])),
        "dit_forwards_per_chunk": float(np.mean(forwards)),
        "mean_final_distance": float(np.mean([r.final_distance for r in records])),
    }


def fidelity(reference: list[EpisodeRecord], replayed: list[EpisodeRecord], action_scale: float) -> dict[str, float]:
    """Action MSE (in units of the largest move, i.e. model units) and mean per-chunk video PSNR."""
    from stepcache.tools.benchmark.metrics import psnr_db

    action_errors, psnrs = [], []
    for ref, rep in zip(reference, replayed):
        for a_ref, a_rep, f_ref, f_rep in zip(ref.actions, rep.actions, ref.frames, rep.frames):
            action_errors.append(float(np.mean(((a_ref - a_rep) / action_scale) ** 2)))
            psnrs.append(psnr_db(torch.from_numpy(f_rep), torch.from_numpy(f_ref), data_range=1.0))
    finite = [p for p in psnrs if p is not None]  # None: the chunk is bit-identical
    return {
        "action_mse_vs_none": float(np.mean(action_errors)),
        "video_psnr_vs_none": float(np.mean(finite)) if finite else math.inf,
        "identical_chunks": int(len(psnrs) - len(finite)),
    }


def threshold_lines(cache_config: Any) -> list[tuple[float, str]]:
    """``(threshold, label)`` for each threshold the config's rule compares the similarity with (none for
    a fixed schedule or another policy)."""
    from stepcache.config import StepCacheConfig

    config = StepCacheConfig.from_diffusion_cache_config(cache_config)
    if not config.enabled or config.static_run_steps is not None or config.policy != "similarity":
        return []
    return [
        (threshold, f"velocity_sim_thresholds[{i}] = {threshold:g}: above it, skip {countdown} "
                    f"step{'' if countdown == 1 else 's'}")
        for i, (threshold, countdown) in enumerate(zip(config.sim_thresholds, config.skip_countdowns))
    ]


def interval_text(summary: dict[str, Any]) -> str:
    low, high = summary["success_interval"]
    return f"{100 * summary['success_rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    header = ("run", "success [95% CI]", "crashed", "chunks to success", "DiT fwd/chunk", "median latency/chunk",
              "speedup", "action MSE vs none", "video PSNR vs none")
    rows = [header]
    for name, r in results.items():
        timed = "latency_per_chunk_s" in r
        rows.append((
            name,
            interval_text(r),
            f"{100 * r['crash_rate']:.1f}%",
            format_number(r["mean_chunks_to_success"], 3),
            f"{r['dit_forwards_per_chunk']:.2f} / {r['num_inference_steps']}",
            f"{format_number(1000 * r['latency_per_chunk_s'], 3)} ms" if timed else "-",
            f"{r['speedup']:.2f}x" if timed else "-",
            "-" if name == "none" else format_number(r["action_mse_vs_none"]),
            "-" if name == "none" else f"{format_number(r['video_psnr_vs_none'], 3)} dB",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot_success(path: Path, results: dict[str, dict[str, Any]], colours: dict[str, str], title: str) -> None:
    """Success rate against DiT forwards per chunk, one point per row with its 95% Wilson interval;
    the fewer-steps rows joined as the line every cache must stay above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    fewer = sorted(((r["dit_forwards_per_chunk"], 100 * r["success_rate"]) for name, r in results.items()
                    if name.startswith("fewer_steps") or name == "none"))
    if len(fewer) > 1:
        ax.plot(*zip(*fewer), "-", color=colours["fewer_steps"], lw=1, alpha=0.6, zorder=1)
    for name, r in results.items():
        low, high = (100 * v for v in r["success_interval"])
        y = 100 * r["success_rate"]
        ax.errorbar([r["dit_forwards_per_chunk"]], [y], yerr=[[y - low], [high - y]], fmt="o", capsize=3,
                    color=colours[name], label=name, zorder=2)
    ax.set_xlabel("DiT forwards per chunk (of 16 steps)")
    ax.set_ylabel("episode success (%), 95% Wilson interval")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_episode(path: Path, none: EpisodeRecord, cached: EpisodeRecord, success_radius: float,
                 colours: dict[str, str], obstacle_radius: float = 0.0) -> None:
    """Observations and predicted frames per chunk (both runs), and both trajectories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stepcache.models.dreamzero.world import TARGET_KINDS

    columns = max(none.chunks, cached.chunks)
    fig = plt.figure(figsize=(2.0 * (columns * 1.6 + 3), 7.2))
    grid = fig.add_gridspec(4, columns * 2 + 3)
    for row, (record, name) in enumerate(((none, "none"), (cached, "step_cache"))):
        for c in range(record.chunks):
            ax = fig.add_subplot(grid[2 * row, 2 * c : 2 * c + 2])
            ax.imshow(record.observations[c], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{name}: observed, chunk {c}", fontsize=7, color=colours[name])
            ax.axis("off")
            ax = fig.add_subplot(grid[2 * row + 1, 2 * c])
            ax.imshow(record.frames[c][0], cmap="gray", vmin=0, vmax=1)
            ax.set_title("predicted +4", fontsize=6)
            ax.axis("off")
            ax = fig.add_subplot(grid[2 * row + 1, 2 * c + 1])
            ax.imshow(record.frames[c][-1], cmap="gray", vmin=0, vmax=1)
            ax.set_title("predicted +8", fontsize=6)
            ax.axis("off")
    ax = fig.add_subplot(grid[:, columns * 2 :])
    for index, (x, y) in enumerate(none.targets):
        ax.scatter([x], [y], marker="s" if index == 0 else ("P" if index == 1 else "o"), s=120,
                   facecolors="none" if index == 2 else "grey", edgecolors="k")
        ax.annotate(TARGET_KINDS[index] + (" (goal)" if index == none.goal else ""), (x, y), fontsize=8,
                    xytext=(5, 5), textcoords="offset points")
    if none.obstacle is not None:
        ax.add_patch(plt.Circle(tuple(none.obstacle), obstacle_radius, color="#bbbbbb", label="obstacle"))
    goal = none.targets[none.goal]
    ax.add_patch(plt.Circle(tuple(goal), success_radius, fill=False, ls=":", color="g",
                            label=f"success radius {success_radius:g}"))
    for record, name in ((none, "none"), (cached, "step_cache")):
        outcome = "reached" if record.success else ("crashed" if record.crashed else "missed")
        ax.plot(record.trajectory[:, 0], record.trajectory[:, 1], ".-", ms=3, color=colours[name],
                label=f"{name} ({outcome})")
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)  # image convention: y grows downwards
    ax.set_aspect("equal")
    ax.set_xlabel("x (arena widths, 0-1)")
    ax.set_ylabel("y (arena heights, 0-1, downwards)")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"episode seed {none.seed}: trajectories (one dot per action)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_similarity(
    path: Path,
    none: list[EpisodeRecord],
    replayed: list[EpisodeRecord],
    thresholds: list[tuple[float, str]],
    colours: dict[str, str],
) -> None:
    """Left: per step ``i``, the similarity the rule reads there (cosine of the last two computed video
    velocities before step ``i``): every chunk of the uncached run (faint; episode 0's first chunk bold)
    and the cached run on that chunk's inputs, with the config's thresholds. Right: per step, the share
    of chunks in which the cached run computed the forward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))

    def points(sims: list[float | None]) -> tuple[list[int], list[float]]:
        xs = [i for i, s in enumerate(sims) if s is not None]
        return xs, [sims[i] for i in xs]

    for record in none:
        for sims in record.similarity:
            left.plot(*points(sims), color=colours["none"], alpha=0.08, lw=0.8)
    left.plot(*points(none[0].similarity[0]), "o-", color=colours["none"], lw=1.5, ms=3,
              label="none (every step computed), episode 0, chunk 0")
    left.plot(*points(replayed[0].similarity[0]), "s--", color=colours["step_cache"], lw=1.2, ms=3,
              label="step_cache, same inputs and noise")
    ran = replayed[0].ran[0]
    for i, r in enumerate(ran):
        left.axvspan(i - 0.5, i + 0.5, color="tab:green" if r else "tab:red", alpha=0.10, lw=0)
    styles = ("--", ":", "-.")
    for index, (threshold, label) in enumerate(thresholds):
        left.axhline(threshold, ls=styles[index % len(styles)], color="k", lw=0.9, label=label)
    handles, _ = left.get_legend_handles_labels()
    handles += [Patch(color="tab:green", alpha=0.25, label="step_cache computed the step"),
                Patch(color="tab:red", alpha=0.25, label="step_cache reused a velocity")]
    left.legend(handles=handles, fontsize=7, loc="lower left")
    left.set_xlabel("denoising step i (0 = pure noise)")
    left.set_ylabel("similarity read at step i\n(cosine of the last two computed velocities, 1 = parallel)")
    title = "video velocity similarity"
    left.set_title(title if thresholds else f"{title} (this config has no thresholds)")
    runs = np.array([r for record in replayed for r in record.ran], dtype=float)
    right.bar(np.arange(runs.shape[1]), runs.mean(axis=0), color=colours["step_cache"])
    right.set_ylim(0, 1.05)
    right.set_xlabel("denoising step i (0 = pure noise)")
    right.set_ylabel("share of chunks that computed step i (0-1)")
    right.set_title(f"step_cache decisions over {runs.shape[0]} chunks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """The demo; ``validate(args)`` has checked and converted the arguments first (``stepcache`` runs both)."""
    from stepcache.tools.benchmark.report import FEWER_STEPS, FULL, family_colour
    from stepcache.tools.calibrate import calibrate_bundled

    set_torch_threads(args.threads)
    cache_config = checked_cache_config(args.cache_config)  # already converted when stepcache ran validate()
    args.cache_config = cache_config
    start = time.perf_counter()
    seeds = episode_seeds(args.seed, args.episodes)
    from stepcache.models.dreamzero.pipeline import DreamZeroPipelineConfig
    from stepcache.models.dreamzero.weights import load_model, load_world_config

    steps = DreamZeroPipelineConfig().num_inference_steps
    world_config = load_world_config(args.model)
    action_scale = load_model(args.model).config.action_scale
    none_row = DemoRow("none", FULL, steps)

    def calibrate() -> Any:
        print(f"stepcache demo: calibrating at {CALIBRATED_FORWARDS} forwards on the episodes of seed "
              f"{args.calibration_seed} ...", flush=True)
        result = calibrate_bundled(str(args.model), seed=args.calibration_seed, held_out_seed=args.seed,
                                   target_forwards=[CALIBRATED_FORWARDS])
        return result.config

    try:
        rows = cached_rows(args, steps, calibrate)
        for row in rows:  # every config against the model, before anything long runs
            with contextlib.closing(row.make_omni(args.model)):
                pass
    except ValueError as err:  # the model was checked in validate(): what is left is a config against it
        raise UsageError(f"argument --cache-config: {err}") from None
    print(f"stepcache demo: {args.model} ({world_config.task} world), {len(rows) + 1} rows", flush=True)
    print(f"stepcache demo: step_cache row's cache config {format_cache_config(cache_config)}", flush=True)

    records: dict[str, list[EpisodeRecord]] = {}
    replayed: dict[str, list[EpisodeRecord]] = {}
    results: dict[str, dict[str, Any]] = {}
    planned = 1 + len(rows) + (len(rows) if "fewer_steps" in args.rows else 0)  # upper bound of rows
    with progress_bar(total=planned * args.episodes, desc="demo", unit="episodes",
                      enabled=show_progress(args)) as bar:

        def closed_loop(row: DemoRow) -> None:
            bar.set_postfix_str(row.name)
            with contextlib.closing(row.make_omni(args.model)) as omni:
                records[row.name] = run_episodes(omni, world_config, seeds, sessions=args.sessions,
                                                 on_done=lambda _record: bar.update())
                if row.name != "none":
                    replayed[row.name] = replay_episodes(omni, records["none"], sessions=args.sessions)
            results[row.name] = {**summarise(records[row.name]), "num_inference_steps": row.num_steps,
                                 "family": row.family}
            if row.cache_config is not None:
                results[row.name]["cache_config"] = row.cache_config.to_dict()
            if row.name != "none":
                results[row.name].update(fidelity(records["none"], replayed[row.name], action_scale))

        closed_loop(none_row)
        for row in rows:
            closed_loop(row)
        fewer: list[DemoRow] = []
        if "fewer_steps" in args.rows:  # at the forwards each cache spent
            budgets = sorted({round(results[row.name]["dit_forwards_per_chunk"]) for row in rows})
            fewer = [DemoRow(f"fewer_steps {k}", FEWER_STEPS, k) for k in budgets if 1 <= k < steps]
        bar.total = (1 + len(rows) + len(fewer)) * args.episodes  # now known
        for row in fewer:
            closed_loop(row)
    all_rows = [none_row, *rows, *fewer]
    if args.timed_episodes:
        time_rows(args, all_rows, world_config, seeds[: args.timed_episodes], results)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = {row.name: family_colour(row.family) for row in all_rows}
    success_png = out_dir / SUCCESS_PNG
    plot_success(success_png, results, {**colours, "fewer_steps": family_colour(FEWER_STEPS)},
                 f"{args.model}: {args.episodes} held-out episodes per row (seed {args.seed})")
    written = [success_png]
    if "step_cache" in records:
        episode_png, similarity_png = out_dir / EPISODE_PNG, out_dir / SIMILARITY_PNG
        pair = {"none": colours["none"], "step_cache": colours["step_cache"]}
        plot_episode(episode_png, records["none"][0], records["step_cache"][0], world_config.success_radius, pair,
                     getattr(world_config, "obstacle_radius", 0.0))
        plot_similarity(similarity_png, records["none"], replayed["step_cache"], threshold_lines(cache_config), pair)
        written += [episode_png, similarity_png]
    elapsed = time.perf_counter() - start

    print(f"stepcache demo: {args.model}, {args.episodes} episodes per row (world seeds {seeds[0]}..{seeds[-1]}), "
          f"{steps} denoising steps per chunk, {elapsed:.0f} s")
    print(format_table(results))
    print(f"success: share of episodes that reached the target (95% Wilson interval); latency and speedup timed on "
          f"{args.timed_episodes} episodes run one at a time; action MSE in units of the largest move; PSNR over "
          "predicted frames in [0, 1], same inputs and noise as none")
    print("wrote " + ", ".join(str(path) for path in written))
    if args.json is not None:
        payload = {"model": str(args.model), "task": world_config.task, "episodes": args.episodes, "seed": args.seed,
                   "calibration_seed": args.calibration_seed, "world_seeds": [seeds[0], seeds[-1]],
                   "sessions": args.sessions, "timed_episodes": args.timed_episodes, "elapsed_s": elapsed,
                   "runs": results, "run": run_metadata(args)}
        print(f"wrote {write_json(args.json, payload)}")
    return 0


def time_rows(args: argparse.Namespace, rows: list[DemoRow], world_config: Any, seeds: list[int],
              results: dict[str, dict[str, Any]]) -> None:
    """Median chunk latency of each row on ``seeds``, every episode run alone; rows interleaved per episode
    so that a change of load on a shared machine hits every row alike."""
    latencies: dict[str, list[float]] = {row.name: [] for row in rows}
    with contextlib.ExitStack() as stack:
        omnis = {row.name: stack.enter_context(contextlib.closing(row.make_omni(args.model))) for row in rows}
        with progress_bar(total=len(seeds), desc="demo timing", unit="episodes", enabled=show_progress(args)) as bar:
            for seed in seeds:
                for row in rows:
                    record = run_episodes(omnis[row.name], world_config, [seed], sessions=1)[0]
                    latencies[row.name] += record.latencies
                bar.update()
    for row in rows:
        results[row.name]["latency_per_chunk_s"] = float(np.median(latencies[row.name]))
        results[row.name]["mean_latency_per_chunk_s"] = float(np.mean(latencies[row.name]))
    base = results["none"]["latency_per_chunk_s"]
    for row in rows:
        results[row.name]["speedup"] = base / results[row.name]["latency_per_chunk_s"]
