"""``stepcache calibrate``: pick StepCache thresholds and countdowns for one model, by measurement.

The seed's thresholds were chosen for DreamZero's post-CFG video velocity; another model's
velocities line up differently (see a generation's similarity trace). This searches a grid of
one- and two-threshold configs on a few calibration samples and keeps:

- ``--target-forwards K``: the most faithful config (PSNR against the full-step output) that runs
  at most K forwards;
- ``--min-psnr X``: the config with the fewest forwards whose PSNR is at least X dB.

It writes the config as JSON that ``DiffusionCacheConfig.from_dict``, ``Omni(cache_config=...)`` and
``apply_step_cache(config=...)`` accept, and the measurements beside it (``<name>.report.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stepcache.config import DiffusionCacheConfig, StepCacheConfig
from stepcache.tools.benchmark.harness import FULL, BenchTarget, Method
from stepcache.tools.benchmark.suite import step_cache_method
from stepcache.tools.common import (
    UsageError,
    add_json_argument,
    add_progress_argument,
    add_threads_argument,
    finite_float,
    format_cache_config,
    format_number,
    prepare_out_dir,
    prepare_out_file,
    run_metadata,
    seed_int,
    set_torch_threads,
    show_progress,
)

logger = logging.getLogger(__name__)

SINGLE_THRESHOLDS = (0.8, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
COUNTDOWNS = (1, 2, 3, 4, 6)


def candidate_configs() -> list[StepCacheConfig]:
    """One-threshold configs over the grid, plus two-threshold ones (a long skip for very aligned
    velocities, a short one below it)."""
    configs = [
        StepCacheConfig(sim_thresholds=(t,), skip_countdowns=(c,)) for t in SINGLE_THRESHOLDS for c in COUNTDOWNS
    ]
    for high, low in itertools.combinations(sorted(SINGLE_THRESHOLDS, reverse=True), 2):
        for long_skip, short_skip in ((4, 2), (3, 1), (6, 2)):
            configs.append(StepCacheConfig(sim_thresholds=(high, low), skip_countdowns=(long_skip, short_skip)))
    return configs


@dataclass
class Trial:
    config: StepCacheConfig
    nfe: float
    psnr_db: float  # inf where exact
    ssim: float

    def as_json(self) -> dict[str, Any]:
        return {
            "sim_thresholds": list(self.config.sim_thresholds),
            "skip_countdowns": list(self.config.skip_countdowns),
            "nfe": round(self.nfe, 4),
            "psnr_db": None if math.isinf(self.psnr_db) else round(self.psnr_db, 4),
            "ssim": round(self.ssim, 6),
        }


def choose(trials: list[Trial], target_forwards: float | None, min_psnr: float | None) -> Trial | None:
    """The trial the user asked for, or None when no trial meets the constraint."""
    if target_forwards is not None:
        feasible = [t for t in trials if t.nfe <= target_forwards + 1e-9]
        return max(feasible, key=lambda t: (t.psnr_db, -t.nfe), default=None)
    feasible = [t for t in trials if t.psnr_db >= min_psnr]
    return min(feasible, key=lambda t: (t.nfe, -t.psnr_db), default=None)


def calibrate(
    target: BenchTarget,
    *,
    target_forwards: float | None = None,
    min_psnr: float | None = None,
    configs: list[StepCacheConfig] | None = None,
    progress: bool = False,
) -> tuple[Trial | None, list[Trial]]:
    """Measure every candidate config on ``target``; return the chosen trial and all of them."""
    if (target_forwards is None) == (min_psnr is None):
        raise ValueError("give exactly one of target_forwards and min_psnr")
    if target_forwards is not None and not 1 <= target_forwards <= target.num_steps:
        raise ValueError(f"target_forwards must be in 1..{target.num_steps}, got {target_forwards}")
    configs = candidate_configs() if configs is None else configs
    reference = target.sample(Method(FULL, {}, target.num_steps))
    trials = []
    for config in tqdm(configs, desc="calibrating", unit="config", disable=not progress, file=sys.stderr):
        method = step_cache_method(target.num_steps, config.sim_thresholds, config.skip_countdowns)
        sample = target.sample(method)
        scores = target.fidelity(sample, reference)
        psnr = math.inf if scores["psnr_db"] is None else float(scores["psnr_db"])
        trials.append(Trial(config, sample.nfe, psnr, float(scores["ssim"])))
    return choose(trials, target_forwards, min_psnr), trials


def write_calibration(
    path: Path, chosen: Trial, trials: list[Trial], context: dict[str, Any], report_path: Path | None = None
) -> Path:
    """Write the config JSON at ``path`` and the measurements at ``report_path`` (default
    ``<path stem>.report.json``); returns the report's path."""
    config = chosen.config.to_diffusion_cache_config()
    DiffusionCacheConfig.from_dict(config.to_dict())  # what every entry point will do with it
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    report = {
        **context,
        "config": config.to_dict(),
        "measured": chosen.as_json(),
        "trials": [t.as_json() for t in sorted(trials, key=lambda t: t.nfe)],
    }
    report_path = path.with_name(path.stem + ".report.json") if report_path is None else Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report_path


def config_name(model: str) -> str:
    """The calibrated config's file name in ``--out``."""
    return f"stepcache-{model}-calibrated.json"


def _forward_budget(text: str) -> float:
    """--target-forwards: a number >= 1 (the upper bound, the model's step count, is checked once it is loaded)."""
    value = finite_float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: 1..the model's step count")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stepcache.tools.bench import MODELS

    parser.add_argument("--model", choices=MODELS, default="wan-digits", help="bundled model")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-forwards", type=_forward_budget, metavar="K",
                      help="at most K forwards (1..the model's steps); best PSNR")
    goal.add_argument("--min-psnr", type=finite_float, metavar="X", help="PSNR >= X dB; fewest forwards")
    parser.add_argument("--seed", type=seed_int, default=1, help="calibration seed (not the bench's 0)")
    parser.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                        help="folder for the config JSON (named stepcache-MODEL-calibrated.json)")
    add_json_argument(parser, "write the measurements and the run's versions here (default: beside the config, "
                      "stepcache-MODEL-calibrated.report.json)")
    add_threads_argument(parser)
    add_progress_argument(parser)


def validate(args: argparse.Namespace) -> None:
    if args.out.suffix.lower() == ".json":  # the old meaning of --out: the config file itself
        print(f"stepcache calibrate: warning: --out {args.out} names a file, which is deprecated: --out is a folder "
              f"and the config is named {config_name(args.model)}", file=sys.stderr)
        args.config_path = prepare_out_dir(args.out.parent) / args.out.name
    else:
        args.config_path = prepare_out_dir(args.out) / config_name(args.model)
    if args.json is not None:
        args.json = prepare_out_file(args.json)


def run(args: argparse.Namespace) -> int:
    from stepcache.tools.bench import build_target, default_num_steps, load_bundled

    set_torch_threads(args.threads)
    pipeline = load_bundled(args.model)
    steps = default_num_steps(pipeline)
    if args.target_forwards is not None and args.target_forwards > steps:
        raise UsageError(
            f"argument --target-forwards: {args.target_forwards:g} is not allowed; allowed: 1..{steps} "
            f"({args.model} runs {steps} steps)"
        )
    target = build_target(args.model, quick=True, seed=args.seed, pipeline=pipeline)
    chosen, trials = calibrate(
        target, target_forwards=args.target_forwards, min_psnr=args.min_psnr, progress=show_progress(args)
    )
    if chosen is None:
        goal = (
            f"at most {args.target_forwards:g} forwards"
            if args.target_forwards is not None
            else f"PSNR >= {args.min_psnr:g} dB"
        )
        best = max(trials, key=lambda t: t.psnr_db)
        fewest = min(trials, key=lambda t: t.nfe)
        print(
            f"stepcache calibrate: no StepCache config reaches {goal} on {args.model}: the fewest forwards tried is "
            f"{format_number(fewest.nfe)}, the best PSNR {format_number(best.psnr_db)} dB",
            file=sys.stderr,
        )
        return 1
    out = getattr(args, "config_path", None) or Path(args.out) / config_name(args.model)
    goal = {"target_forwards": args.target_forwards} if args.min_psnr is None else {"min_psnr": args.min_psnr}
    context = {"model": args.model, "steps": target.num_steps, "seed": args.seed, "goal": goal,
               "run": run_metadata(args)}
    report = write_calibration(out, chosen, trials, context, report_path=args.json)
    config = chosen.config.to_diffusion_cache_config()
    psnr = "inf (exact)" if math.isinf(chosen.psnr_db) else f"{format_number(chosen.psnr_db)} dB"
    print(
        f"{args.model}: {format_number(chosen.nfe)} forwards of {target.num_steps}, PSNR {psnr}, "
        f"SSIM {format_number(chosen.ssim)} against the full-step output (seed {args.seed})"
    )
    print(f"config: {format_cache_config(config)}")
    print(f"wrote {out} (config) and {report} (measurements)")
    return 0
