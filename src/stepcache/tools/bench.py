"""``stepcache bench``: StepCache against running fewer steps, DreamZero's static mask, diffusers' own
caches and an oracle, on one bundled model, same seeds, one process.

Prints a markdown table; ``--json`` writes the rows, ``--out`` a plot of fidelity against forwards
and against wall time (and the table as markdown). ``--replot BENCH.json --out DIR`` redraws the plots
of an earlier run from its JSON, running nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from stepcache.config import as_step_cache_config, shown
from stepcache.tools.benchmark.harness import CALIBRATED, BenchTarget
from stepcache.tools.benchmark.report import (
    benchmark_json,
    frontier_json,
    frontier_table,
    markdown_table,
    plot_fidelity,
    plot_frontier,
    rows_from_json,
)
from stepcache.tools.benchmark.suite import FRONTIER_BUDGETS, cache_method, run_benchmark
from stepcache.tools.calibrate import calibrate_bundled
from stepcache.tools.common import (
    UsageError,
    add_json_argument,
    add_progress_argument,
    add_threads_argument,
    add_update_docs_figures_argument,
    installed_version,
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

MODELS = ("wan-digits", "dreamzero-mini", "dreamzero-detour")
DREAMZERO_MODELS = ("dreamzero-mini", "dreamzero-detour")
# The forward budgets a --quick run calibrates for (a full run: every frontier budget).
QUICK_CALIBRATED_FORWARDS = (4, 8)
QUICK_NOTE = "--quick smoke run (few samples, 1 timed repeat): wall times and speedups are NOT FOR TIMING"
# What the progress bar counts: run_benchmark reports these phases in this order.
PHASES = ("measuring forwards", "oracle search", "scoring and timing")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default="wan-digits", help="bundled model")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: fewer samples, settings and repeats; not for timing")
    parser.add_argument("--repeats", type=positive_int, default=None, metavar="N",
                        help="timed repeats per method (default: 3, 1 with --quick)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the evaluated inputs")
    parser.add_argument("--samples-per-class", type=positive_int, default=None, metavar="N",
                        help="wan-digits: evaluated digits per class (default: 10, 1 with --quick); fewer is "
                             "faster and noisier")
    parser.add_argument("--calibration-seed", type=seed_int, default=None, metavar="SEED",
                        help="seed of the inputs calibrated configs are tuned on (default: --seed + 1); "
                             "never the evaluated ones")
    parser.add_argument("--closed-loop-episodes", type=positive_int, default=None, metavar="N",
                        help="dreamzero models: held-out episodes per row for the success rate (default: 30, 4 with "
                             "--quick)")
    add_json_argument(parser, "write the rows and the run's versions to this JSON file")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write the plot and the table here (bench-MODEL.png, bench-MODEL.md)")
    parser.add_argument("--replot", type=Path, default=None, metavar="BENCH.json",
                        help="run nothing: redraw the plots of this earlier --json output into --out")
    add_update_docs_figures_argument(parser)
    add_threads_argument(parser)
    add_progress_argument(parser)


def validate(args: argparse.Namespace) -> None:
    if args.samples_per_class is not None and args.model != "wan-digits":
        raise UsageError(f"argument --samples-per-class: is for wan-digits; {args.model} runs its own episodes")
    if args.calibration_seed is None:
        args.calibration_seed = args.seed + 1
    if args.calibration_seed == args.seed:
        raise UsageError(
            f"--calibration-seed {args.calibration_seed} is the evaluated --seed: calibration must use other inputs"
        )
    if args.replot is not None:
        if args.out is None:
            raise UsageError("argument --replot: needs --out DIR, the folder the plots go to")
        if args.json is not None:
            raise UsageError("argument --replot: runs nothing, so there is no --json to write; drop --json")
        try:
            args.replot_document = json.loads(args.replot.expanduser().read_text())
            rows_from_json(args.replot_document)
        except OSError as err:
            raise UsageError(f"argument --replot: cannot read {args.replot}: {err.strerror or err}") from None
        except ValueError as err:  # json.JSONDecodeError included
            raise UsageError(f"argument --replot: {args.replot}: {err}") from None
    if args.out is not None:
        args.out = prepare_out_dir(args.out, update_docs_figures=args.update_docs_figures)
    if args.json is not None:
        args.json = prepare_out_file(args.json, update_docs_figures=args.update_docs_figures)


def load_bundled(model: str) -> Any:
    """The bundled model's pipeline: a ``DreamZeroPipeline`` or a ``WanDigits``."""
    if model not in MODELS:
        raise ValueError(f"no benchmark target for model {shown(model)}; available: {list(MODELS)}")
    if model in DREAMZERO_MODELS:
        from stepcache.models.dreamzero.pipeline import DreamZeroPipeline

        return DreamZeroPipeline.from_pretrained(model)
    from stepcache.models.wan_digits import load_wan_digits

    return load_wan_digits()


def default_num_steps(pipeline: Any) -> int:
    """The denoising steps a bundled pipeline runs by default (what the benchmark targets use)."""
    if hasattr(pipeline, "default_num_inference_steps"):  # WanDigits
        return int(pipeline.default_num_inference_steps)
    return int(pipeline.config.num_inference_steps)  # DreamZeroPipeline


def build_target(model: str, *, quick: bool, seed: int, pipeline: Any = None,
                 closed_loop_episodes: int | None = None, samples_per_class: int | None = None) -> BenchTarget:
    """The bundled model as a benchmark target (imports only what that model needs); ``pipeline``:
    the model already loaded by :func:`load_bundled`; ``closed_loop_episodes``: per row, for the
    success rate of the DreamZero-style models (default 4 with ``quick``, else 30);
    ``samples_per_class``: wan-digits' digits per class (default: 10, 1 when ``quick``)."""
    pipeline = load_bundled(model) if pipeline is None else pipeline
    if model in DREAMZERO_MODELS:
        from stepcache.tools.benchmark.dreamzero_target import DreamZeroTarget

        if closed_loop_episodes is None:
            closed_loop_episodes = 4 if quick else 30
        return DreamZeroTarget(
            pipeline,
            episodes=2 if quick else 8,
            closed_loop_episodes=closed_loop_episodes,
            seed=seed,
            name=model,
        )
    from stepcache.tools.benchmark.wan_digits_target import WanDigitsTarget

    if samples_per_class is None:
        samples_per_class = 1 if quick else 10
    return WanDigitsTarget(pipeline, samples_per_class=samples_per_class, seed=seed)


def _phase(message: str) -> int:
    """Index in PHASES of the phase a run_benchmark progress message belongs to."""
    if message.startswith("measuring"):
        return 0
    return 1 if message.startswith("oracle") else 2


def write_plots(rows: Any, out: Path, model: str, num_steps: int, seed: int, quick: bool) -> list[Path]:
    """The fidelity and frontier plots of one run (bench-MODEL.png, frontier-MODEL.png) in ``out``."""
    budgets = [b for b in FRONTIER_BUDGETS if b < num_steps]
    suffix = " [--quick: not for timing]" if quick else ""
    plot_path = out / f"bench-{model}.png"
    frontier_path = out / f"frontier-{model}.png"
    plot_fidelity(rows, plot_path, f"{model}: fidelity vs compute ({num_steps} steps){suffix}", budgets=budgets)
    plot_frontier(rows, budgets, frontier_path,
                  f"{model}: best of each family per forward budget (seed {seed}){suffix}")
    return [plot_path, frontier_path]


def replot(args: argparse.Namespace) -> int:
    document = args.replot_document
    for key in ("model", "steps"):
        if key not in document:
            raise UsageError(f"argument --replot: {args.replot} has no {key!r}: not a stepcache bench --json output")
    paths = write_plots(rows_from_json(document), args.out, str(document["model"]), int(document["steps"]),
                        document.get("seed", "?"), bool(document.get("quick", False)))
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.replot is not None:
        return replot(args)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    set_torch_threads(args.threads)
    target = build_target(args.model, quick=args.quick, seed=args.seed,
                          closed_loop_episodes=args.closed_loop_episodes, samples_per_class=args.samples_per_class)
    with progress_bar(total=len(PHASES), desc=f"bench {args.model}", unit="phases",
                      enabled=show_progress(args), interval_s=0) as bar:  # phases are minutes long: a line each

        def progress(message: str) -> None:
            bar.set_postfix_str(message[:60])  # before the update: a progress line names the phase now running
            bar.update(_phase(message) - bar.n)  # the phases before this one are done

        progress("measuring forwards: calibrating on the calibration inputs")
        calibration = calibrate_bundled(
            args.model, seed=args.calibration_seed, held_out_seed=args.seed,
            target_forwards=[b for b in (QUICK_CALIBRATED_FORWARDS if args.quick else FRONTIER_BUDGETS)
                             if b < target.num_steps],
            progress=lambda message: progress(f"measuring forwards: calibrating: {message}"),
        )
        calibrated = [
            cache_method(CALIBRATED, target.num_steps, as_step_cache_config(choice.candidate.config))
            for choice in calibration.choices if choice.candidate is not None
        ]
        result = run_benchmark(target, quick=args.quick, repeats=repeats, progress=progress, calibrated=calibrated)
        bar.update(len(PHASES) - bar.n)

    budgets = [b for b in FRONTIER_BUDGETS if b < target.num_steps]
    table = markdown_table(result.rows)
    best = frontier_table(result.rows, budgets)
    title = (
        f"{args.model}: {target.num_steps} steps, fidelity against the full-step output of the same inputs "
        f"(evaluated inputs: seed {args.seed}; calibration inputs: seed {args.calibration_seed})"
    )
    if args.quick:
        table = f"{QUICK_NOTE}\n\n{table}\n\n{QUICK_NOTE}"
    print(f"\n{title}\n")
    print(table)
    print("\nthe frontier: per forward budget, each family's best PSNR (dB) and its forwards\n")
    print(best)
    has_success = any("success_rate" in row.quality for row in result.rows)
    best_success = frontier_table(result.rows, budgets, "success_rate") if has_success else None
    if best_success is not None:
        episodes = len(getattr(target, "closed_loop_seeds", []))
        print(f"\nthe success frontier: per forward budget, each family's best closed-loop success rate on {episodes} "
              "held-out episodes and its forwards (intervals in the table above)\n")
        print(best_success)
    for name, reason in result.skipped_peers.items():
        print(f"\n{name}: not run ({reason})")
    if result.oracle is not None:
        search = "candidates + local moves" if args.quick else "candidates + backward elimination + local moves"
        print(f"\noracle: {result.oracle.evaluations} schedules sampled ({search})")

    if args.json:
        document = benchmark_json(
            target.name,
            target.num_steps,
            result.rows,
            quick=args.quick,
            for_timing=not args.quick,
            **({"note": QUICK_NOTE} if args.quick else {}),
            repeats=repeats,
            seed=args.seed,
            **({"samples_per_class": args.samples_per_class} if args.samples_per_class is not None else {}),
            calibration_seed=args.calibration_seed,
            frontier=frontier_json(result.rows, budgets),
            **({"success_frontier": frontier_json(result.rows, budgets, "success_rate")} if has_success else {}),
            skipped_peers=result.skipped_peers,
            **({"cache_dit": installed_version("cache-dit")} if args.model == "wan-digits" else {}),
            oracle_schedules_sampled=None if result.oracle is None else result.oracle.evaluations,
            run=run_metadata(args),
        )
        print(f"wrote {write_json(args.json, document)}")
    if args.out:
        table_path = args.out / f"bench-{args.model}.md"
        plot_path, frontier_path = write_plots(result.rows, args.out, args.model, target.num_steps, args.seed,
                                               args.quick)
        success_part = ("" if best_success is None else
                        f"\nSuccess frontier (best closed-loop success per budget, forwards)\n\n{best_success}\n")
        table_path.write_text(f"{title}\n\n{table}\n\nFrontier (best PSNR per budget, forwards)\n\n{best}\n"
                              f"{success_part}")
        print(f"wrote {plot_path}, {frontier_path} and {table_path}")
    return 0
