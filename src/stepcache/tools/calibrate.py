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


def write_calibration(path: Path, chosen: Trial, trials: list[Trial], context: dict[str, Any]) -> Path:
    """Write the config JSON at ``path`` and the measurements at ``<path stem>.report.json``."""
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
    report_path = path.with_name(path.stem + ".report.json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stepcache.tools.bench import MODELS

    parser.add_argument("--model", choices=MODELS, default="wan-digits")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-forwards", type=float, metavar="K", help="at most K forwards; best PSNR")
    goal.add_argument("--min-psnr", type=float, metavar="X", help="PSNR >= X dB; fewest forwards")
    parser.add_argument("--seed", type=int, default=1, help="calibration seed (default 1: not the bench's 0)")
    parser.add_argument(
        "--out", type=Path, default=None, help="config JSON path (default stepcache-<model>-calibrated.json)"
    )


def run(args: argparse.Namespace) -> int:
    from stepcache.tools.bench import build_target

    target = build_target(args.model, quick=True, seed=args.seed)
    chosen, trials = calibrate(target, target_forwards=args.target_forwards, min_psnr=args.min_psnr, progress=True)
    if chosen is None:
        goal = (
            f"at most {args.target_forwards} forwards"
            if args.target_forwards is not None
            else f"PSNR >= {args.min_psnr} dB"
        )
        best = max(trials, key=lambda t: t.psnr_db)
        fewest = min(trials, key=lambda t: t.nfe)
        print(
            f"no StepCache config reaches {goal} on {args.model}: the fewest forwards tried is "
            f"{fewest.nfe:.2f}, the best PSNR {best.psnr_db:.2f} dB",
            file=sys.stderr,
        )
        return 1
    out = args.out or Path(f"stepcache-{args.model}-calibrated.json")
    goal = {"target_forwards": args.target_forwards} if args.min_psnr is None else {"min_psnr": args.min_psnr}
    context = {"model": args.model, "steps": target.num_steps, "seed": args.seed, "goal": goal}
    report = write_calibration(out, chosen, trials, context)
    measured = chosen.as_json()
    print(
        f"{args.model}: thresholds {measured['sim_thresholds']}, countdowns {measured['skip_countdowns']} -> "
        f"{measured['nfe']} forwards of {target.num_steps}, PSNR {measured['psnr_db']} dB, SSIM {measured['ssim']}"
    )
    print(f"wrote {out} (config) and {report} (measurements)")
    return 0
