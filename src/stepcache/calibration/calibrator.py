"""``stepcache.calibrate``: record once, search offline, verify a few.

1. **Record**: one full-step generation per calibration input, with a config that never skips (so the
   output is exactly the uncached one) inside :func:`~stepcache.recording.record_generations`: every
   step's velocity and time, through whatever entry point the generation uses.
2. **Search offline**: from the recording alone, the error of every skip window and the best fixed
   schedule for every budget (:mod:`stepcache.calibration.schedules`), for each way of reusing a
   velocity (the cached one, or its extrapolation); and the ``error_budget`` policy's budget that gives
   the budget's forwards on the recorded trajectories (:mod:`stepcache.calibration.policies`).
3. **Verify a few**: real generations for the best candidates only, chosen by measurement. For a
   forward budget: the best schedule with and without solver-aware stepping, so whether
   ``solver_aware`` ships is measured (it helps with multistep solvers such as UniPC). Where it cannot
   differ from its plain twin, the runs go to other candidates instead: on a diffusers scheduler without
   multistep memory (Euler) that is known before any run; for a generation function (whose loop may have
   no solver at all) it is known once the first solver-aware candidate's outputs equal its plain twin's
   bit for bit. For a PSNR floor: a search over budgets that corrects the model's predicted fidelity with
   each measurement.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from stepcache.calibration.generation import (
    NEVER_SKIP,
    DiffusersSource,
    Fidelity,
    FunctionSource,
    GenerationSource,
    describe,
    detached,
    is_diffusers_pipeline,
    non_finite,
    psnr_db,
    same_output,
)
from stepcache.calibration.policies import fit_error_budget, mean_forwards
from stepcache.calibration.result import CalibrationResult, Candidate, Choice, HeldOutResult
from stepcache.calibration.schedules import SkipModel, best_schedules, schedule_error
from stepcache.calibration.trajectory import Trajectory, recorded_generations
from stepcache.config import ERROR_BUDGET_POLICY, REUSE_MODES, DiffusionCacheConfig, shown
from stepcache.recording import RecordedGeneration, record_generations

logger = logging.getLogger(__name__)

# Where the error_budget policy is fitted, these final_steps are tried (the best fixed schedules keep
# the last two or three steps: the velocity turns most there).
ERROR_BUDGET_FINAL_STEPS = (0, 1, 2, 3)
# min_psnr: a candidate is proposed where its predicted fidelity clears the floor by this much (the
# prediction, corrected by the measurements, is good to about a dB).
PSNR_MARGIN_DB = 1.0
# min_psnr: measured fidelity falls by about this many dB per dB of estimated error (best schedules at 4,
# 6 and 8 of 16 forwards: 1.49 on wan-digits, 1.50 on dreamzero-mini); refitted from two measurements.
FIDELITY_SLOPE = 1.5


@dataclass
class _Proposal:
    """A candidate and what the search knows about it."""

    candidate: Candidate
    solver_aware: bool
    budget: int  # computed steps it was built for (a static schedule's length)
    adaptive: bool = False  # the error_budget policy rather than a fixed schedule

    def rank(self, families: Sequence[bool]) -> tuple[float, int, bool]:
        """Verification order: lowest predicted error, the preferred family first, fixed schedules first."""
        return (self.candidate.predicted_error, families.index(self.solver_aware), self.adaptive)


@dataclass
class _Verifier:
    """Runs candidates on every calibration input, once each (by config), and counts what it spent.

    Where the source cannot say what ``solver_aware`` does (a generation function), it finds out: the
    outputs of candidates are kept until a solver-aware one and its plain twin (the same config
    without it) have both run; equal bit for bit on every input, ``solver_aware_inert`` is True and the
    callers verify no more solver-aware candidates (they would only repeat their twins' runs)."""

    source: GenerationSource
    references: list[Any]
    fidelity: Fidelity
    progress: Callable[[str], None] | None
    families: Sequence[bool]
    generations: int = 0
    measured: dict[str, tuple[float, list[float]]] = field(default_factory=dict)
    solver_aware_inert: bool | None = None  # None: not known (yet); settled by the source or by a measured pair
    _outputs: dict[str, list[Any]] = field(default_factory=dict)  # while not known: outputs by config key

    def __post_init__(self) -> None:
        effect = self.source.solver_aware_effect()
        if len(self.families) == 1:  # settled by the caller or the scheduler: nothing to find out
            self.solver_aware_inert = False
        elif effect != "unknown":
            self.solver_aware_inert = effect != "multistep"

    def verify(self, candidate: Candidate) -> None:
        key = _config_key(candidate.config)
        if key not in self.measured:
            if self.progress:
                self.progress(f"verifying {candidate.label}")
            forwards, scores, outputs = [], [], []
            for index, reference in enumerate(self.references):
                output, computed = run_counted(self.source, candidate.config, index, candidate.label)
                self.generations += 1
                forwards.append(computed)
                scores.append(_score(self.fidelity, output, reference, self.source, index, candidate.label))
                if self.solver_aware_inert is None:
                    outputs.append(detached(output))
            self.measured[key] = (sum(forwards) / len(forwards), scores)
            if self.solver_aware_inert is None:
                self._compare_with_twin(candidate.config, outputs)
        candidate.forwards, candidate.input_fidelity_db = self.measured[key][0], list(self.measured[key][1])
        candidate.fidelity_db = mean_db(candidate.input_fidelity_db)
        logger.debug("verified %s: %.3g forwards, %.4g dB", candidate.label, candidate.forwards, candidate.fidelity_db)

    def skips(self, proposal: _Proposal) -> bool:
        """Whether ``proposal`` is a solver-aware candidate that could only repeat its plain twin."""
        return proposal.solver_aware and bool(self.solver_aware_inert)

    def _compare_with_twin(self, config: DiffusionCacheConfig, outputs: list[Any]) -> None:
        twin = replace(config, step_cache_dit_solver_aware=not config.step_cache_dit_solver_aware)
        twin_outputs = self._outputs.get(_config_key(twin))
        if twin_outputs is None:
            self._outputs[_config_key(config)] = outputs
            return
        self.solver_aware_inert = all(same_output(a, b) for a, b in zip(outputs, twin_outputs))
        self._outputs.clear()
        if self.solver_aware_inert:
            logger.info("solver-aware stepping changes nothing in this generation: its variants are not verified "
                        "further (the runs go to other candidates)")


def calibrate(
    pipeline_or_generate: Any,
    inputs: Sequence[Any] | None = None,
    *,
    target_forwards: float | Sequence[float] | None = None,
    min_psnr: float | None = None,
    verifications: int = 2,
    solver_aware: bool | None = None,
    fidelity: Fidelity | None = None,
    held_out: Sequence[Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> CalibrationResult:
    """Calibrate StepCache for one pipeline from one recorded generation per input.

    Args:
        pipeline_or_generate: a diffusers pipeline (StepCache is applied for each generation and
            removed after it), or a function that runs one full generation with the cache config it
            is given installed and returns the output (a tensor, or a tuple, list or dict of them):
            ``generate(config)``, or ``generate(config, input)`` when ``inputs`` is given. ``config`` is
            a :class:`~stepcache.DiffusionCacheConfig`; install it as the code does it:
            ``enable_step_cache(pipe, config)``, ``enable_dreamzero_stepcache(pipe, config)``,
            ``Omni(cache_config=config)``, ``VelocityCache(StepCacheConfig.from_diffusion_cache_config(config))``.
            Every generation of one input must start from the same noise: seed it inside, or pass a
            ``torch.Generator`` in the input (rewound before every run).
        inputs: the calibration inputs: for a pipeline, a list of call kwargs (one generation each);
            for a function, whatever it takes as ``input`` (None: ``generate(config)``, one input).
        target_forwards: the goal: at most this many computed steps per generation, best fidelity;
            or a list of such budgets (one config each).
        min_psnr: the other goal: the fewest forwards whose fidelity is at least this (dB).
        verifications: real generations per budget and calibration input spent checking the best
            candidates (default 2: the best schedule with and without solver-aware stepping).
        solver_aware: None (default): measured where it can matter (not on a diffusers scheduler without
            multistep memory, where it changes nothing; in a generation function, not again once a
            solver-aware run has equalled its plain twin bit for bit); True/False: only candidates with /
            without it.
        fidelity: ``fidelity(output, full_step_output) -> dB`` (default: PSNR of the first output tensor
            with the full-step tensor's range as the peak); averaged over inputs as errors
            (:func:`mean_db`).
        held_out: inputs of the same kind that calibration never sees: each chosen config is measured
            on them for the report (1 full-step + 1 per chosen config generation per input, counted in
            ``held_out_generations``, not in the calibration's).
        progress: called with a short message at each phase.

    Returns:
        A :class:`~stepcache.calibration.CalibrationResult`: ``result.config`` is the chosen config;
        ``result.save(path)`` writes a file every entry point takes as a config.

    Raises:
        ValueError: a bad goal, no inputs, a generation that installs no StepCache config, recorded
            generations of different step counts.

    Example::

        result = stepcache.calibrate(pipe, [dict(prompt="a cat", generator=torch.Generator().manual_seed(1))],
                                     target_forwards=6)
        result.save("cal.json")
        enable_step_cache(pipe, "cal.json")
    """
    goals = _goals(target_forwards, min_psnr)
    if not isinstance(verifications, int) or isinstance(verifications, bool) or verifications < 1:
        raise ValueError(f"verifications must be an integer >= 1, got {shown(verifications)}")
    if solver_aware not in (None, True, False):
        raise ValueError(f"solver_aware must be None (measured), True or False, got {shown(solver_aware)}")
    source = _source(pipeline_or_generate, inputs)
    if held_out is not None and inputs is None:
        raise ValueError("held_out needs inputs too: generate(config, input) is called with each held-out input")
    held_source = None if held_out is None else _source(pipeline_or_generate, held_out)
    fidelity = psnr_db if fidelity is None else fidelity
    timings: dict[str, float] = {}

    # 1. record one full-step generation per input
    start = time.perf_counter()
    if progress:
        progress("recording the full-step generations")
    references, generations = _record(source)
    timings["record_s"] = time.perf_counter() - start

    # 2. search offline
    start = time.perf_counter()
    if progress:
        progress("searching schedules offline")
    trajectories = [Trajectory.from_generation(g, guidance_scale=source.guidance_scale()) for g in generations]
    num_steps = trajectories[0].num_steps
    for goal in goals:
        if "target_forwards" in goal and goal["target_forwards"] > num_steps:
            raise ValueError(
                f"target_forwards {goal['target_forwards']:g} is more than the {num_steps} steps the recorded "
                f"generation ran; allowed: 1..{num_steps}"
            )
    families = _families(source, solver_aware)
    models = [SkipModel(reuse) for reuse in REUSE_MODES]
    budgets = sorted({math.floor(g["target_forwards"]) for g in goals if "target_forwards" in g})
    searched = range(1, num_steps + 1) if any("min_psnr" in g for g in goals) else budgets
    static = {model: best_schedules(trajectories, model, searched) for model in models}
    pools: dict[float, list[_Proposal]] = {}
    fits: list[dict[str, Any]] = []
    for goal in goals:
        if "target_forwards" in goal:
            forwards = goal["target_forwards"]
            pools[forwards] = _static_proposals(static, math.floor(forwards), families) + _budget_proposals(
                generations, trajectories, models, families, forwards, fits
            )
    del generations  # the recorded tensors: the search is done
    timings["search_s"] = time.perf_counter() - start

    # 3. verify a few, pick by measurement
    start = time.perf_counter()
    verifier = _Verifier(source, references, fidelity, progress, families)
    candidates: list[Candidate] = []
    choices = []
    for goal in goals:
        if "target_forwards" in goal:
            pool = pools[goal["target_forwards"]]
            choices.append(_choose_for_budget(goal, pool, families, verifications, verifier, candidates))
        else:
            choices.append(_choose_for_floor(goal, static, families, num_steps, verifications, verifier, candidates))
    timings["verify_s"] = time.perf_counter() - start

    result = CalibrationResult(
        choices=choices,
        candidates=candidates,
        recorded_generations=len(source),
        verification_generations=verifier.generations,
        generation_limit=len(source) * (1 + verifications * len(goals)),
        calibration_inputs=[describe(x) for x in source.inputs],
        num_steps=num_steps,
        timesteps=trajectories[0].times.tolist(),
        fidelity="psnr_db of the first output tensor (peak: the full-step output's range)"
        if fidelity is psnr_db else getattr(fidelity, "__name__", "fidelity"),
        fits=fits,
        timings_s=timings,
    )
    if held_source is not None:
        start = time.perf_counter()
        measure_held_out(result, held_source, fidelity, progress)
        result.timings_s["held_out_s"] = time.perf_counter() - start
    return result


_NOTHING_RECORDED = (
    "the generation ran no StepCache generation with the config it was given: install it (enable_step_cache(pipe, "
    "config), enable_dreamzero_stepcache(pipe, config), Omni(cache_config=config), or "
    "VelocityCache(StepCacheConfig.from_diffusion_cache_config(config)) in a hand-written loop) and run the "
    "generation in the calling thread"
)


def _record(source: GenerationSource) -> tuple[list[Any], list[RecordedGeneration]]:
    """One full-step generation per input under :data:`NEVER_SKIP`: the outputs (the references) and
    every recorded generation (a function may run several per input, e.g. one per chunk)."""
    references, generations = [], []
    for index in range(len(source)):
        with record_generations() as recording:
            output = source.run(NEVER_SKIP, index)
        recorded = recorded_generations(recording)
        if not recorded:
            raise ValueError(_NOTHING_RECORDED)
        # A non-finite velocity or output would make every error estimate and fidelity NaN, and the
        # search would still pick (and report as met) some config: refuse, naming where it appeared.
        for number, generation in enumerate(recorded):
            for step in generation.steps:
                where = non_finite(step.prediction)
                if where is not None:
                    raise ValueError(
                        f"{_input_name(source, index)}, recorded generation {number}: the velocity of step "
                        f"{step.step} is not finite ({where} are NaN or infinite); calibration needs a model "
                        "whose full-step run is finite: check the input and the model"
                    )
        _check_output(output, source, index, "the full-step run (no skipping)")
        references.append(detached(output))
        generations.extend(recorded)
    return references, generations


def _input_name(source: GenerationSource, index: int) -> str:
    return f"input {index} ({shown(describe(source.inputs[index]))})"


def _check_output(output: Any, source: GenerationSource, index: int, run: str) -> None:
    where = non_finite(output)
    if where is not None:
        raise ValueError(
            f"{_input_name(source, index)}: the output of {run} is not finite ({where} are NaN or infinite); "
            "a fidelity measured on it would mean nothing"
        )


def _score(fidelity: Fidelity, output: Any, reference: Any, source: GenerationSource, index: int, run: str) -> float:
    score = float(fidelity(output, reference))
    if math.isnan(score) or score == -math.inf:
        raise ValueError(f"{_input_name(source, index)}: the fidelity of {run} is {score}; it must be a number of dB")
    return score


def run_counted(source: GenerationSource, config: DiffusionCacheConfig, index: int,
                label: str = "a candidate config") -> tuple[Any, float]:
    """Run input ``index`` under ``config``; return its output and the computed steps per generation.
    A non-finite output is an error naming the input and the config (``label``)."""
    with record_generations() as recording:
        output = source.run(config, index)
    recorded = recorded_generations(recording)
    if not recorded:
        raise ValueError(_NOTHING_RECORDED)
    _check_output(output, source, index, label)
    return output, sum(sum(step.ran for step in g.steps) for g in recorded) / len(recorded)


def mean_db(values: Sequence[float]) -> float:
    """Fidelities of several inputs averaged as errors: ``-10 log10(mean(10^(-dB/10)))``, the PSNR of
    the mean squared error where the peak is the same (an exact input contributes no error)."""
    if not values:
        raise ValueError("no fidelity to average")
    power = sum(10.0 ** (-v / 10.0) for v in values) / len(values)
    return math.inf if power == 0.0 else -10.0 * math.log10(power)


def measure_held_out(result: CalibrationResult, source: GenerationSource, fidelity: Fidelity,
                     progress: Callable[[str], None] | None = None) -> None:
    """Measure every chosen config on ``source``'s inputs (against their full-step outputs) into
    ``result.held_out``."""
    chosen = []
    for choice in result.choices:
        if choice.candidate is not None and all(choice.candidate is not c for c in chosen):
            chosen.append(choice.candidate)
    if progress:
        progress("measuring the chosen config(s) on the held-out inputs")
    scores: list[list[float]] = [[] for _ in chosen]
    forwards: list[list[float]] = [[] for _ in chosen]
    references = []
    for index in range(len(source)):
        output = source.run(NEVER_SKIP, index)
        _check_output(output, source, index, "the full-step run (no skipping)")
        reference = detached(output)
        references.append(reference)
        result.held_out_generations += 1
        for i, candidate in enumerate(chosen):
            output, computed = run_counted(source, candidate.config, index, candidate.label)
            result.held_out_generations += 1
            forwards[i].append(computed)
            scores[i].append(_score(fidelity, output, reference, source, index, candidate.label))
    result.held_out_inputs = [describe(x) for x in source.inputs]
    result.held_out = [
        HeldOutResult(candidate, sum(f) / len(f), mean_db(s), s) for candidate, f, s in zip(chosen, forwards, scores)
    ]
    for held in result.held_out:  # the baseline every config must beat: fewer steps at the same forwards
        steps = max(1, round(held.forwards))
        fewer = []
        for index, reference in enumerate(references):
            output = source.run_fewer_steps(steps, index)
            if output is None:
                break
            result.held_out_generations += 1
            fewer.append(float(fidelity(output, reference)))
        if fewer:
            held.extra.update({"fewer_steps": steps, "fewer_steps_db": mean_db(fewer)})


# -- goals and sources ----------------------------------------------------------------------------


def _goals(target_forwards: Any, min_psnr: Any) -> list[dict[str, float]]:
    if (target_forwards is None) == (min_psnr is None):
        raise ValueError("give exactly one goal: target_forwards (a budget or a list of budgets) or min_psnr")
    if min_psnr is not None:
        if (not isinstance(min_psnr, numbers.Real) or isinstance(min_psnr, bool) or not math.isfinite(min_psnr)
                or min_psnr <= 0):
            raise ValueError(f"min_psnr must be a finite number of dB > 0, got {shown(min_psnr)}")
        return [{"min_psnr": float(min_psnr)}]
    budgets = list(target_forwards) if isinstance(target_forwards, (list, tuple)) else [target_forwards]
    if not budgets:
        raise ValueError("target_forwards is an empty list; give at least one budget")
    for budget in budgets:
        if not isinstance(budget, numbers.Real) or isinstance(budget, bool) or not math.isfinite(budget) or budget < 1:
            raise ValueError(
                f"target_forwards must be numbers >= 1 (computed steps per generation), got {shown(budget)}"
            )
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"target_forwards has repeated budgets: {budgets}")
    return [{"target_forwards": float(budget) if not float(budget).is_integer() else int(budget)} for budget in budgets]


def _source(pipeline_or_generate: Any, inputs: Sequence[Any] | None) -> GenerationSource:
    if is_diffusers_pipeline(pipeline_or_generate):
        return DiffusersSource(pipeline_or_generate, inputs)
    if callable(pipeline_or_generate):
        return FunctionSource(pipeline_or_generate, inputs)
    raise TypeError(
        f"expected a diffusers pipeline or a generation function generate(config[, input]), got "
        f"{type(pipeline_or_generate).__name__}"
    )


def _families(source: GenerationSource, solver_aware: bool | None) -> list[bool]:
    """Whether candidates run solver-aware, in order of preference: both (measured) unless the caller
    or the scheduler settles it."""
    effect = source.solver_aware_effect()
    if solver_aware is True and effect == "unsupported":
        raise ValueError("solver_aware=True, but the pipeline's scheduler cannot be driven solver-aware")
    if solver_aware is not None:
        return [solver_aware]
    return [True, False] if effect == "unknown" or effect == "multistep" else [False]


# -- candidates -----------------------------------------------------------------------------------


def _static_proposals(static: dict[SkipModel, dict[int, tuple[tuple[int, ...], float]]], budget: int,
                      families: Sequence[bool]) -> list[_Proposal]:
    proposals = []
    for model, schedules in static.items():
        if budget not in schedules:
            continue
        steps, error = schedules[budget]
        for solver_aware in families:
            config = DiffusionCacheConfig(
                step_cache_dit_static_steps=list(steps), velocity_reuse=model.reuse,
                step_cache_dit_solver_aware=solver_aware,
            )
            label = f"static {','.join(map(str, steps))} {_variant(model.reuse, solver_aware)}"
            proposals.append(_Proposal(Candidate(label, budget, config, error), solver_aware, budget))
    return proposals


def _variant(reuse: str, solver_aware: bool) -> str:
    return ("solver-aware " if solver_aware else "") + ("extrapolating" if reuse == "extrapolate" else "reusing")


def _budget_proposals(
    generations: Sequence[RecordedGeneration], trajectories: Sequence[Trajectory], models: Sequence[SkipModel],
    families: Sequence[bool], target: float, fits: list[dict[str, Any]],
) -> list[_Proposal]:
    """The ``error_budget`` policy fitted to ``target`` forwards on the recording: per way of reusing,
    the fit (over :data:`ERROR_BUDGET_FINAL_STEPS`) with the lowest predicted error; every fit is
    written to ``fits``."""
    best: dict[str, tuple[float, float, int]] = {}  # reuse -> (error, budget, final_steps)
    for final_steps in ERROR_BUDGET_FINAL_STEPS:
        fitted = fit_error_budget(generations, target, final_steps=final_steps)
        if fitted is None:
            continue
        config, schedules = fitted
        errors = {model.reuse: schedule_error(trajectories, schedules, model) for model in models}
        fits.append({
            "target_forwards": target, "step_cache_dit_policy": ERROR_BUDGET_POLICY,
            "velocity_error_budget": config.error_budget, "step_cache_dit_final_steps": final_steps,
            "simulated_forwards": mean_forwards(schedules),
            "predicted_error": errors,
        })
        for reuse, error in errors.items():
            if reuse not in best or error < best[reuse][0]:
                best[reuse] = (error, config.error_budget, final_steps)
    proposals = []
    for reuse, (error, budget, final_steps) in best.items():
        for solver_aware in families:
            config = DiffusionCacheConfig(
                step_cache_dit_policy=ERROR_BUDGET_POLICY, velocity_error_budget=budget,
                step_cache_dit_final_steps=final_steps, velocity_reuse=reuse, step_cache_dit_solver_aware=solver_aware,
            )
            label = f"error_budget {budget:.4g} final_steps {final_steps} {_variant(reuse, solver_aware)}"
            proposals.append(_Proposal(Candidate(label, target, config, error), solver_aware,
                                       math.floor(target), adaptive=True))
    return proposals


def _verification_order(pool: Sequence[_Proposal], families: Sequence[bool]) -> list[_Proposal]:
    """By :meth:`_Proposal.rank` (the best schedule with and without solver-aware stepping come first:
    they share the predicted error), one per distinct config."""
    order, seen = [], set()
    for proposal in sorted(pool, key=lambda p: p.rank(families)):
        key = _config_key(proposal.candidate.config)
        if key not in seen:
            seen.add(key)
            order.append(proposal)
    return order


def _config_key(config: DiffusionCacheConfig) -> str:
    return repr(sorted(config.to_dict().items()))


def _preference(candidate: Candidate) -> tuple[float, float, int, int]:
    """Higher is better: fidelity, then fewer forwards, then the simpler way of running skips."""
    return (
        candidate.fidelity_db,
        -candidate.forwards,
        -int(candidate.config.step_cache_dit_solver_aware),
        -int(candidate.config.velocity_reuse != "cache"),
    )


def _choose_for_budget(goal: dict[str, float], pool: Sequence[_Proposal], families: Sequence[bool],
                       verifications: int, verifier: _Verifier, candidates: list[Candidate]) -> Choice:
    order, verified_here = [], 0
    for proposal in _verification_order(pool, families):
        if verifier.skips(proposal):  # known to repeat its plain twin: not verified, not reported
            continue
        order.append(proposal)
        if verified_here < verifications:
            verifier.verify(proposal.candidate)
            verified_here += 1
    candidates.extend(p.candidate for p in order)
    verified = [p.candidate for p in order if p.candidate.verified]
    within = [c for c in verified if c.forwards <= goal["target_forwards"] + 1e-9]
    if within:
        return Choice(goal, max(within, key=_preference), True)
    return Choice(goal, min(verified, key=lambda c: c.forwards, default=None), False)


def _choose_for_floor(goal: dict[str, float], static: dict[SkipModel, dict[int, tuple[tuple[int, ...], float]]],
                      families: Sequence[bool], num_steps: int, verifications: int, verifier: _Verifier,
                      candidates: list[Candidate]) -> Choice:
    """The fewest forwards at or above ``min_psnr``. Each budget's fidelity is predicted from its
    estimated error as ``offset - slope * 20 log10(error)``, fitted to the measurements so far (one:
    the offset, with :data:`FIDELITY_SLOPE`; two or more: both); before any, the first proposal is the
    middle budget. Each verification goes to the smallest budget predicted to clear the floor by
    :data:`PSNR_MARGIN_DB`, in the preferred family (solver-aware where it can matter) until it has
    nothing left to propose, then in the other."""
    floor = goal["min_psnr"]
    best: dict[tuple[bool, int], _Proposal] = {}  # (solver_aware, budget) -> the better reuse's schedule
    for budget in range(1, num_steps + 1):
        for proposal in _static_proposals(static, budget, families):
            key = (proposal.solver_aware, budget)
            if key not in best or proposal.candidate.predicted_error < best[key].candidate.predicted_error:
                best[key] = proposal
    measured: list[tuple[float, float]] = []  # (20 log10 error, dB) of each finite measurement
    tried: set[tuple[bool, int]] = set()
    for _ in range(verifications):
        met = [c for c in candidates if c.verified and c.fidelity_db >= floor]
        ceiling = min((c.forwards for c in met), default=math.inf)
        predict = _fidelity_model(measured)
        proposal = None
        for family in families:
            if family and verifier.solver_aware_inert:
                continue
            for budget in range(1, num_steps + 1):
                if budget >= ceiling:
                    break
                error = best[(family, budget)].candidate.predicted_error
                predicted = math.inf if error <= 0.0 else predict(_decibels(error))
                if (family, budget) not in tried and (
                    predicted >= floor + PSNR_MARGIN_DB if measured else budget == (num_steps + 1) // 2
                ):
                    proposal = best[(family, budget)]
                    break
            if proposal is not None:
                break
        if proposal is None:
            break
        tried.add((proposal.solver_aware, proposal.budget))
        verifier.verify(proposal.candidate)
        candidates.append(proposal.candidate)
        if math.isfinite(proposal.candidate.fidelity_db) and proposal.candidate.predicted_error > 0.0:
            measured.append((_decibels(proposal.candidate.predicted_error), proposal.candidate.fidelity_db))
    verified = [c for c in candidates if c.verified]
    met = [c for c in verified if c.fidelity_db >= floor]
    if met:
        return Choice(goal, min(met, key=lambda c: (c.forwards, -c.fidelity_db)), True)
    return Choice(goal, max(verified, key=_preference, default=None), False)


def _fidelity_model(measured: Sequence[tuple[float, float]]) -> Callable[[float], float]:
    """``dB(20 log10 error)`` through the measurements: a line of slope ``-FIDELITY_SLOPE`` through their
    mean, or (two or more distinct errors) the least-squares slope, kept within [0.5, 3] times the default."""
    if not measured:
        return lambda _: math.nan
    mean_x = sum(x for x, _ in measured) / len(measured)
    mean_y = sum(y for _, y in measured) / len(measured)
    slope = FIDELITY_SLOPE
    spread = sum((x - mean_x) ** 2 for x, _ in measured)
    if spread > 1e-9:
        fitted = -sum((x - mean_x) * (y - mean_y) for x, y in measured) / spread
        slope = min(3.0 * FIDELITY_SLOPE, max(0.5 * FIDELITY_SLOPE, fitted))
    return lambda x: mean_y - slope * (x - mean_x)


def _decibels(error: float) -> float:
    """``20 log10(error)`` (``-inf`` for an exact schedule)."""
    return -math.inf if error <= 0.0 else 20.0 * math.log10(error)
