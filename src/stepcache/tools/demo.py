"""``stepcache demo``: the bundled DreamZero-style model, closed loop, with StepCache off and on.

For every episode (same world seed and noise seed in both runs) the agent is driven by the model's
action chunks, replanning every chunk, once without a cache and once with ``step_cache`` (the seed's
defaults unless ``--cache-config`` says otherwise). A third, open-loop pass replays the uncached
run's observations through the cached pipeline with the same noise, so the cached run's action
error and predicted-video PSNR are measured against the uncached outputs on identical inputs.

Prints a table (success rate, DiT forwards per chunk, median latency per chunk, wall-clock speedup,
action MSE and video PSNR vs the uncached run), and writes into ``--out``: ``episode.png`` (one
episode's observations, predicted frames and trajectories) and ``similarity.png`` (the similarity the
rule reads at each step, with the config's thresholds and the skip decisions). ``--json`` writes the
figures as JSON. Each run has the colour of its method family in ``stepcache bench``'s figures.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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

RUNS = ("none", "step_cache")
EPISODE_PNG, SIMILARITY_PNG = "episode.png", "similarity.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--episodes", type=positive_int, default=100, metavar="N", help="episodes per run")
    parser.add_argument("--seed", type=seed_int, default=0, help="first episode seed")
    parser.add_argument("--out", type=Path, default=Path("stepcache-demo"), metavar="DIR",
                        help=f"folder for {EPISODE_PNG} and {SIMILARITY_PNG}")
    add_json_argument(parser, "also write the figures, the cache config and the run's versions to this JSON file")
    parser.add_argument("--model", default="dreamzero-mini", metavar="NAME|DIR",
                        help="bundled model (choices: dreamzero-mini) or a folder with config.json + model.safetensors")
    add_cache_config_argument(parser)
    add_threads_argument(parser, default=1, note="per-chunk tensors are small")
    add_update_docs_figures_argument(parser)
    add_progress_argument(parser)


def validate(args: argparse.Namespace) -> None:
    from stepcache.models.dreamzero.weights import load_model

    args.cache_config = checked_cache_config(args.cache_config)
    try:  # the bundled name or the folder, its config and its weights: what Omni will load
        load_model(args.model)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"argument --model: {err}") from None
    args.out = prepare_out_dir(args.out, update_docs_figures=args.update_docs_figures)
    if args.json is not None:
        args.json = prepare_out_file(args.json, update_docs_figures=args.update_docs_figures)


@dataclass
class EpisodeRecord:
    """One closed-loop episode of one run."""

    seed: int
    success: bool
    chunks: int
    final_distance: float
    latencies: list[float] = field(default_factory=list)
    forwards: list[int] = field(default_factory=list)
    observations: list[np.ndarray] = field(default_factory=list)  # frame at each chunk start
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)  # (H, 2) per chunk
    frames: list[np.ndarray] = field(default_factory=list)  # (F, S, S) predicted per chunk
    ran: list[list[bool]] = field(default_factory=list)
    similarity: list[list[float | None]] = field(default_factory=list)
    trajectory: np.ndarray | None = None
    targets: np.ndarray | None = None
    goal: int = 0


def run_episode(omni: Any, seed: int, world_config: Any = None) -> EpisodeRecord:
    """Drive one episode closed loop: observe, generate a chunk, execute it, until done."""
    from stepcache.models.dreamzero.world import ReachingWorld

    world = ReachingWorld(world_config)
    frame, state = world.reset(seed)
    omni.start_episode(seed)
    record = EpisodeRecord(seed=seed, success=False, chunks=0, final_distance=math.nan)
    while not world.done:
        out = omni.generate(frame, world.instruction, state)
        record.observations.append(frame)
        record.states.append(state)
        record.actions.append(out.actions)
        record.frames.append(out.frames)
        record.latencies.append(out.stats.latency_s)
        record.forwards.append(out.stats.dit_forwards)
        record.ran.append(out.stats.ran)
        record.similarity.append(out.stats.velocity_similarity)
        frame, state = world.execute(out.actions)
    record.success, record.chunks = world.success, world.chunks_done
    record.final_distance = world.distance_to_goal
    record.trajectory = np.asarray(world.trajectory)
    record.targets, record.goal = world.targets.copy(), world.goal
    return record


def replay_episode(omni: Any, reference: EpisodeRecord, instruction: str) -> EpisodeRecord:
    """Open loop: feed ``reference``'s observations and states, same noise seed; record the outputs."""
    omni.start_episode(reference.seed)
    record = EpisodeRecord(seed=reference.seed, success=reference.success, chunks=reference.chunks,
                           final_distance=reference.final_distance)
    for frame, state in zip(reference.observations, reference.states):
        out = omni.generate(frame, instruction, state)
        record.actions.append(out.actions)
        record.frames.append(out.frames)
        record.ran.append(out.stats.ran)
        record.similarity.append(out.stats.velocity_similarity)
    return record


def summarise(records: list[EpisodeRecord]) -> dict[str, Any]:
    latencies = [t for r in records for t in r.latencies]
    forwards = [f for r in records for f in r.forwards]
    return {
        "success_rate": float(np.mean([r.success for r in records])),
        "chunks": len(latencies),
        "chunks_per_episode": float(np.mean([r.chunks for r in records])),
        "dit_forwards_per_chunk": float(np.mean(forwards)),
        "latency_per_chunk_s": float(np.median(latencies)),
        "mean_latency_per_chunk_s": float(np.mean(latencies)),
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


def run_colours(cache_config: Any) -> dict[str, str]:
    """Each run's colour: the bench's colour of its method family (``full`` for the uncached run; the
    cached run's by its config: the seed's rule, a planned budget, an error budget, DreamZero's mask,
    or another fixed schedule, which is what calibration writes)."""
    from stepcache.config import DREAMZERO_STATIC_RUN_STEPS, StepCacheConfig
    from stepcache.tools.benchmark.report import (
        CALIBRATED,
        ERROR_BUDGET,
        FULL,
        PLANNED,
        STATIC_MASK,
        STEP_CACHE,
        family_colour,
    )

    config = StepCacheConfig.from_diffusion_cache_config(cache_config)
    if config.static_run_steps is not None:
        family = STATIC_MASK if config.static_run_steps == DREAMZERO_STATIC_RUN_STEPS else CALIBRATED
    else:
        family = {"planned": PLANNED, "error_budget": ERROR_BUDGET}.get(config.policy, STEP_CACHE)
    return {"none": family_colour(FULL), "step_cache": family_colour(family)}


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


def format_table(results: dict[str, dict[str, Any]]) -> str:
    header = ("run", "success", "DiT fwd/chunk", "median latency/chunk", "speedup", "action MSE vs none",
              "video PSNR vs none")
    rows = [header]
    for name in RUNS:
        r = results[name]
        rows.append((
            name,
            f"{100 * r['success_rate']:.0f}%",
            f"{r['dit_forwards_per_chunk']:.2f} / {r['num_inference_steps']}",
            f"{format_number(1000 * r['latency_per_chunk_s'], 3)} ms",
            f"{r.get('speedup', 1.0):.2f}x",
            "-" if name == "none" else format_number(r["action_mse_vs_none"]),
            "-" if name == "none" else f"{format_number(r['video_psnr_vs_none'], 3)} dB",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot_episode(path: Path, none: EpisodeRecord, cached: EpisodeRecord, success_radius: float,
                 colours: dict[str, str]) -> None:
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
    goal = none.targets[none.goal]
    ax.add_patch(plt.Circle(tuple(goal), success_radius, fill=False, ls=":", color="g",
                            label=f"success radius {success_radius:g}"))
    for record, name in ((none, "none"), (cached, "step_cache")):
        outcome = "reached" if record.success else "missed"
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
    from stepcache.models.dreamzero.world import INSTRUCTIONS, WorldConfig
    from stepcache.omni import Omni

    set_torch_threads(args.threads)
    cache_config = checked_cache_config(args.cache_config)  # already converted when stepcache ran validate()
    start = time.perf_counter()
    try:
        omni = {"none": Omni(args.model, cache_backend=None),
                "step_cache": Omni(args.model, cache_backend="step_cache", cache_config=cache_config)}
    except ValueError as err:  # the model was checked in validate(): what is left is the config against it
        raise UsageError(f"argument --cache-config: {err}") from None
    print(f"stepcache demo: cache config {format_cache_config(cache_config)}", flush=True)
    action_scale = omni["none"].pipeline.transformer.config.action_scale
    records: dict[str, list[EpisodeRecord]] = {name: [] for name in RUNS}
    replayed: list[EpisodeRecord] = []
    with progress_bar(total=args.episodes, desc="demo", unit="episodes", enabled=show_progress(args)) as bar, \
            contextlib.ExitStack() as engines:
        for instance in omni.values():  # each Omni's engine thread ends with the episodes
            engines.callback(instance.close)
        for index in range(args.episodes):
            seed = args.seed + index
            # Interleave the runs per episode so that load changes on a shared machine hit both alike.
            for name in RUNS:
                records[name].append(run_episode(omni[name], seed))
            reference = records["none"][-1]
            replayed.append(replay_episode(omni["step_cache"], reference, INSTRUCTIONS[reference.goal]))
            bar.set_postfix({name: f"{sum(r.success for r in records[name])}/{index + 1}" for name in RUNS})
            bar.update()

    results = {name: summarise(records[name]) for name in RUNS}
    steps = omni["none"].num_inference_steps
    for name in RUNS:
        results[name]["num_inference_steps"] = steps
    results["step_cache"].update(fidelity(records["none"], replayed, action_scale))
    results["step_cache"]["speedup"] = results["none"]["latency_per_chunk_s"] / results["step_cache"][
        "latency_per_chunk_s"]
    results["step_cache"]["cache_config"] = cache_config.to_dict()
    results["step_cache"]["replay_dit_forwards_per_chunk"] = float(
        np.mean([sum(r) for rec in replayed for r in rec.ran]))
    results["none"]["speedup"] = 1.0

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    episode_png, similarity_png = out_dir / EPISODE_PNG, out_dir / SIMILARITY_PNG
    colours = run_colours(cache_config)
    plot_episode(episode_png, records["none"][0], records["step_cache"][0], WorldConfig().success_radius, colours)
    plot_similarity(similarity_png, records["none"], replayed, threshold_lines(cache_config), colours)
    elapsed = time.perf_counter() - start

    last_seed = args.seed + args.episodes - 1
    print(f"stepcache demo: {args.model}, {args.episodes} episodes (seeds {args.seed}..{last_seed}), "
          f"{steps} denoising steps per chunk, {elapsed:.0f} s")
    print(format_table(results))
    print(f"speedup ceiling {steps}/forwards: {steps / results['step_cache']['dit_forwards_per_chunk']:.2f}x; "
          f"action MSE in units of the largest move; PSNR over predicted frames in [0, 1], same inputs and noise")
    print(f"wrote {episode_png} and {similarity_png}")
    if args.json is not None:
        payload = {"model": str(args.model), "episodes": args.episodes, "seed": args.seed,
                   "elapsed_s": elapsed, "runs": results, "run": run_metadata(args)}
        print(f"wrote {write_json(args.json, payload)}")
    return 0
