"""``stepcache calibrate``: calibrate StepCache for a bundled model with :func:`stepcache.calibrate`.

Record one full-step generation of the calibration inputs, search schedules offline, verify the best
two per budget (with and without solver-aware stepping), then report the chosen config on other
inputs (held out: by default the bench's evaluated inputs, seed 0) beside running fewer steps and the
``planned`` policy at the same forwards. The calibration inputs:

- ``wan-digits``: :data:`WAN_DIGITS_PER_CLASS` digits of each class, one batch, seed ``--seed``;
- ``dreamzero-mini``: :data:`DREAMZERO_EPISODES` recorded episodes of seed ``--seed`` (world seeds
  ``1000 * seed`` and on), replayed open loop.

``--steps``, ``--guidance-scale`` and (wan-digits) ``--scheduler euler`` calibrate a sampling setup
the bundled defaults were not tuned for.

It writes the calibration result (the chosen config under ``"config"``, every verified candidate, the
generations spent, the inputs used, the held-out report and the run's versions) to
``--out``/stepcache-MODEL-calibrated.json, a file every entry point takes as a config
(``--cache-config``, ``enable_step_cache``, ``Omni``, ``get_cache_backend``).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepcache.config import shown
from stepcache.tools.common import (
    UsageError,
    add_json_argument,
    add_progress_argument,
    add_threads_argument,
    finite_float,
    format_number,
    nonnegative_float,
    positive_float,
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

# The calibration inputs (small on purpose: calibration is meant to be cheap; docs/benchmarks.md
# measures how well configs chosen on them hold on the bench's 100 digits / 8 episodes).
WAN_DIGITS_PER_CLASS = 2
DREAMZERO_EPISODES = 2
# The held-out report: the bench's evaluated inputs.
HELD_OUT_DIGITS_PER_CLASS = 10
HELD_OUT_EPISODES = 8
SCHEDULERS = ("unipc", "euler")
# What the progress bar counts: calibrate's phases, then the held-out report.
PHASES = ("recording", "searching", "verifying", "held out")


def config_name(model: str) -> str:
    """The calibration result's file name in ``--out``."""
    return f"stepcache-{model}-calibrated.json"


def _forward_budget(text: str) -> float:
    """--target-forwards: a number >= 1 (the upper bound, the model's step count, is checked once it is known)."""
    value = finite_float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not allowed; allowed: 1..the model's step count")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stepcache.tools.bench import MODELS

    parser.add_argument("--model", choices=MODELS, default="wan-digits", help="bundled model")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-forwards", type=_forward_budget, nargs="+", metavar="K",
                      help="at most K forwards per generation (1..the steps); best PSNR. Several K: one config each "
                           "(the file's \"config\" is the first K's)")
    goal.add_argument("--min-psnr", type=positive_float, metavar="X", help="PSNR >= X dB; fewest forwards")
    parser.add_argument("--seed", type=seed_int, default=1,
                        help="seed of the calibration inputs (the bench evaluates seed 0)")
    parser.add_argument("--held-out-seed", type=seed_int, default=0, metavar="SEED",
                        help="seed of the inputs the chosen config is reported on (never the calibration seed)")
    parser.add_argument("--no-held-out", action="store_true", help="skip the held-out report")
    parser.add_argument("--steps", type=positive_int, default=None, metavar="N",
                        help="denoising steps (default: the model's, 16)")
    parser.add_argument("--guidance-scale", type=nonnegative_float, default=None, metavar="S",
                        help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="unipc",
                        help="wan-digits: its own UniPC, or diffusers' FlowMatchEulerDiscreteScheduler (first order)")
    parser.add_argument("--verifications", type=positive_int, default=2, metavar="N",
                        help="real generations per budget spent verifying the best candidates")
    parser.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                        help="folder for the calibration result (named stepcache-MODEL-calibrated.json)")
    add_json_argument(parser, "also write the calibration result (with the run's versions) to this file")
    add_threads_argument(parser)
    add_progress_argument(parser)


def validate(args: argparse.Namespace) -> None:
    if args.seed == args.held_out_seed and not args.no_held_out:
        raise UsageError(
            f"--held-out-seed {args.held_out_seed} is the calibration --seed: the report must use other inputs "
            "(or pass --no-held-out)"
        )
    if args.model != "wan-digits" and args.scheduler != "unipc":
        raise UsageError(
            f"argument --scheduler: {args.model} runs its own UniPC schedulers; --scheduler is for wan-digits"
        )
    if args.out.suffix.lower() == ".json":  # the old meaning of --out: the config file itself
        print(f"stepcache calibrate: warning: --out {args.out} names a file, which is deprecated: --out is a folder "
              f"and the result is named {config_name(args.model)}", file=sys.stderr)
        args.config_path = prepare_out_dir(args.out.parent) / args.out.name
    else:
        args.config_path = prepare_out_dir(args.out) / config_name(args.model)
    if args.json is not None:
        args.json = prepare_out_file(args.json)


# -- the bundled models as calibration setups -------------------------------------------------------


@dataclass
class Setup:
    """One bundled model ready to calibrate: how to run a generation, score it, and report on held-out inputs."""

    num_steps: int
    guidance_scale: float
    scheduler: str
    calibration: dict[str, Any]  # stepcache.calibrate's positional arguments and fidelity
    calibration_inputs: list[Any]  # their description, for the result
    held_out: Any  # a function () -> BenchTarget on the held-out inputs
    held_out_inputs: list[Any]


def _wan_digits_setup(args: argparse.Namespace) -> Setup:
    import torch

    from stepcache.calibration import psnr_db
    from stepcache.models.wan_digits import load_wan_digits
    from stepcache.models.wan_digits.data import PIXEL_MAX, latents_to_pixels

    digits = load_wan_digits()
    if args.guidance_scale is not None:
        # digits.sample and the bench target read the default from the loaded config: set it for this run.
        digits.config["sampling"]["guidance_scale"] = args.guidance_scale
    if args.scheduler == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        digits.pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=digits.config["scheduler"]["flow_shift"])
    steps = args.steps or digits.default_num_inference_steps
    _check_budgets(args, steps)
    labels = torch.arange(digits.num_classes).repeat_interleave(WAN_DIGITS_PER_CLASS)
    call_kwargs = {
        **digits.call_kwargs(labels),
        "num_inference_steps": steps,
        "guidance_scale": digits.default_guidance_scale,
        "generator": torch.Generator().manual_seed(args.seed),
    }

    def pixel_psnr(output: Any, reference: Any) -> float:
        """PSNR of the digits' pixels (0..16, the peak), as the bench scores wan-digits."""
        return psnr_db(latents_to_pixels(output.frames), latents_to_pixels(reference.frames), peak=PIXEL_MAX)

    def held_out() -> Any:
        from stepcache.tools.benchmark.wan_digits_target import WanDigitsTarget

        return WanDigitsTarget(digits, samples_per_class=HELD_OUT_DIGITS_PER_CLASS, seed=args.held_out_seed,
                               num_steps=steps, scores=False)

    return Setup(
        num_steps=steps,
        guidance_scale=digits.default_guidance_scale,
        scheduler=type(digits.pipe.scheduler).__name__,
        calibration={"pipeline_or_generate": digits.pipe, "inputs": [call_kwargs], "fidelity": pixel_psnr},
        calibration_inputs=[{"digits": len(labels), "per_class": WAN_DIGITS_PER_CLASS, "seed": args.seed}],
        held_out=held_out,
        held_out_inputs=[{"digits": HELD_OUT_DIGITS_PER_CLASS * digits.num_classes,
                          "per_class": HELD_OUT_DIGITS_PER_CLASS, "seed": args.held_out_seed}],
    )


def _dreamzero_setup(args: argparse.Namespace) -> Setup:
    from stepcache.config import StepCacheConfig
    from stepcache.models.dreamzero.pipeline import DreamZeroPipeline, DreamZeroPipelineConfig
    from stepcache.tools.benchmark.dreamzero_target import SEED_STRIDE, DreamZeroTarget
    from stepcache.tools.benchmark.harness import CALIBRATED, Sample
    from stepcache.tools.benchmark.suite import cache_method

    defaults = DreamZeroPipelineConfig()
    try:
        config = DreamZeroPipelineConfig(
            num_inference_steps=args.steps or defaults.num_inference_steps,
            guidance_scale=defaults.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        )
    except ValueError as err:
        raise UsageError(f"argument --steps/--guidance-scale: {err}") from None
    steps = config.num_inference_steps
    _check_budgets(args, steps)
    pipeline = DreamZeroPipeline.from_pretrained(args.model, config)
    episodes = DreamZeroTarget(pipeline, episodes=DREAMZERO_EPISODES, closed_loop_episodes=0, seed=args.seed)

    def generate(cache_config: Any) -> dict[str, Any]:
        """Replay the calibration episodes with ``cache_config`` installed on the pipeline."""
        step_config = StepCacheConfig.from_diffusion_cache_config(cache_config)
        return episodes.sample(cache_method(CALIBRATED, steps, step_config)).outputs

    def frame_psnr(output: dict[str, Any], reference: dict[str, Any]) -> float:
        """PSNR of the predicted frames, as the bench scores dreamzero-mini."""
        value = episodes.fidelity(Sample(output, nfe=math.nan), Sample(reference, nfe=math.nan))["psnr_db"]
        return math.inf if value is None else value

    def world_seeds(seed: int, count: int) -> list[int]:
        return [SEED_STRIDE * seed + i for i in range(count)]

    return Setup(
        num_steps=steps,
        guidance_scale=config.guidance_scale,
        scheduler="UniPCMultistepScheduler",
        calibration={"pipeline_or_generate": generate, "inputs": None, "fidelity": frame_psnr},
        calibration_inputs=[{"episodes": DREAMZERO_EPISODES, "world_seeds": world_seeds(args.seed, DREAMZERO_EPISODES),
                             "chunks": sum(len(e.observations) for e in episodes.recorded), "seed": args.seed}],
        held_out=lambda: DreamZeroTarget(pipeline, episodes=HELD_OUT_EPISODES, closed_loop_episodes=0,
                                         seed=args.held_out_seed),
        held_out_inputs=[{"episodes": HELD_OUT_EPISODES, "seed": args.held_out_seed,
                          "world_seeds": world_seeds(args.held_out_seed, HELD_OUT_EPISODES)}],
    )


def calibrate_bundled(model: str, *, seed: int, held_out_seed: int, target_forwards: list[float],
                      progress: Any = None) -> Any:
    """Calibrate a bundled model with the CLI's defaults on the inputs of ``seed`` (the bench's
    calibrated rows, evaluated by the bench on ``held_out_seed``'s inputs): the
    :class:`~stepcache.calibration.CalibrationResult`, without the CLI's held-out report."""
    from stepcache.calibration import calibrate

    args = argparse.Namespace(model=model, seed=seed, held_out_seed=held_out_seed, steps=None, guidance_scale=None,
                              scheduler="unipc", target_forwards=target_forwards)
    setup = _wan_digits_setup(args) if model == "wan-digits" else _dreamzero_setup(args)
    result = calibrate(**setup.calibration, target_forwards=target_forwards, progress=progress)
    result.calibration_inputs = setup.calibration_inputs
    return result


def _check_budgets(args: argparse.Namespace, steps: int) -> None:
    too_many = [k for k in (args.target_forwards or []) if k > steps]
    if too_many:
        raise UsageError(
            f"argument --target-forwards: {format_number(too_many[0])} is not allowed; allowed: 1..{steps} "
            f"({args.model} runs {steps} steps)"
        )


# -- the held-out report ----------------------------------------------------------------------------


def held_out_report(result: Any, target: Any) -> int:
    """Measure each chosen config on ``target`` (a bench target on the held-out inputs) beside the full-step
    output, fewer steps and the ``planned`` policy at the same forwards; returns the generations run."""
    from stepcache.calibration import HeldOutResult
    from stepcache.config import StepCacheConfig
    from stepcache.tools.benchmark.harness import CALIBRATED, FEWER_STEPS, FULL, Method
    from stepcache.tools.benchmark.suite import cache_method, planned_method

    n = target.num_steps
    reference = target.sample(Method(FULL, {}, n))
    generations = 1
    chosen = []
    for choice in result.choices:
        if choice.candidate is not None and all(choice.candidate is not c for c in chosen):
            chosen.append(choice.candidate)
    for candidate in chosen:
        config = StepCacheConfig.from_diffusion_cache_config(candidate.config)
        sample = target.sample(cache_method(CALIBRATED, n, config))
        forwards = max(1, min(n, round(sample.nfe)))
        fewer = target.sample(Method(FEWER_STEPS, {"num_steps": forwards}, forwards))
        planned = target.sample(planned_method(n, forwards)) if forwards < n else None
        generations += 3 if planned is not None else 2
        fidelity = _psnr(target.fidelity(sample, reference))
        result.held_out.append(HeldOutResult(
            candidate, sample.nfe, fidelity, [fidelity],
            {"fewer_steps": forwards, "fewer_steps_db": _psnr(target.fidelity(fewer, reference)),
             "planned_db": None if planned is None else _psnr(target.fidelity(planned, reference))},
        ))
    return generations


def _psnr(scores: dict[str, float | None]) -> float:
    value = scores["psnr_db"]
    return math.inf if value is None else float(value)


# -- run ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from stepcache.calibration import calibrate

    set_torch_threads(args.threads)
    start = time.perf_counter()
    setup = _wan_digits_setup(args) if args.model == "wan-digits" else _dreamzero_setup(args)
    goal = {"target_forwards": args.target_forwards} if args.min_psnr is None else {"min_psnr": args.min_psnr}
    with progress_bar(total=len(PHASES), desc=f"calibrate {args.model}", unit="phases",
                      enabled=show_progress(args), interval_s=0) as bar:  # phases are long: a line each

        def progress(message: str) -> None:
            phase = next((i for i, name in enumerate(PHASES) if message.startswith(name[:6])), bar.n)
            bar.set_postfix_str(message[:60])  # before the update: a progress line names the phase now running
            bar.update(max(0, phase - bar.n))

        result = calibrate(**setup.calibration, **goal, verifications=args.verifications, progress=progress)
        calibration_s = time.perf_counter() - start
        result.calibration_inputs = setup.calibration_inputs
        if not args.no_held_out and any(c.candidate is not None for c in result.choices):
            progress("held out: measuring the chosen config(s)")
            report_start = time.perf_counter()
            result.held_out_generations = held_out_report(result, setup.held_out())
            result.held_out_inputs = setup.held_out_inputs
            result.timings_s["held_out_s"] = time.perf_counter() - report_start
        bar.update(len(PHASES) - bar.n)
    result.timings_s["calibration_total_s"] = calibration_s
    result.timings_s["total_s"] = time.perf_counter() - start
    result.metadata = {
        "model": args.model, "steps": setup.num_steps, "scheduler": setup.scheduler,
        "guidance_scale": setup.guidance_scale, "seed": args.seed,
        "held_out_seed": None if args.no_held_out else args.held_out_seed, "run": run_metadata(args),
    }
    _print_summary(args, setup, result)
    if not all(choice.met for choice in result.choices):
        missed = next(c for c in result.choices if not c.met)
        best = missed.candidate
        print(
            f"stepcache calibrate: no verified config reaches PSNR >= {args.min_psnr:g} dB on {args.model}: the best "
            f"measured is {format_number(best.fidelity_db if best else None)} dB; nothing written",
            file=sys.stderr,
        )
        return 1
    path = result.save(args.config_path)
    if args.json is not None:
        write_json(args.json, result.to_dict())
    print(f"wrote {path}" + (f" and {args.json}" if args.json is not None else ""))
    return 0


def _print_summary(args: argparse.Namespace, setup: Setup, result: Any) -> None:
    """The model and sampler, then the report Python's ``result.summary()`` gives, then the wall time."""
    print(f"{args.model}: {setup.num_steps} steps, {setup.scheduler}, guidance {format_number(setup.guidance_scale)}")
    print(result.summary())
    timings = result.timings_s
    print(
        f"time: {format_number(timings['calibration_total_s'])} s with loading"
        + (f"; held-out report {format_number(timings['held_out_s'])} s" if "held_out_s" in timings else "")
    )
