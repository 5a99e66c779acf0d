"""Which methods the benchmark runs, and in what order they depend on each other.

1. ``full``, the StepCache settings (the seed rule's sweep, the planned policy at several forward
   budgets, the error-budget rule, calibrated configs), DreamZero's static mask and the peer caches
   run first: their forwards define the budgets;
2. ``fewer_steps`` runs at every (rounded) budget they reached, the bar every cache must clear;
3. the oracle searches, per budget, the best fixed schedule, with the step_cache and static-mask
   schedules among its candidates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stepcache.config import DREAMZERO_STATIC_RUN_STEPS, StepCacheConfig
from stepcache.tools.benchmark.harness import (
    ERROR_BUDGET,
    FEWER_STEPS,
    FULL,
    ORACLE,
    PLANNED,
    STATIC_MASK,
    STEP_CACHE,
    BenchTarget,
    Method,
    Row,
    evaluate,
)
from stepcache.tools.benchmark.oracle import OracleResult, search_schedules

logger = logging.getLogger(__name__)

# (sim_thresholds, skip_countdowns): the seed's defaults first, then more and less aggressive settings.
STEP_CACHE_SWEEP: tuple[tuple[tuple[float, ...], tuple[int, ...]], ...] = (
    ((0.95, 0.93), (4, 2)),
    ((0.99,), (1,)),
    ((0.98,), (2,)),
    ((0.97, 0.95), (3, 2)),
    ((0.9,), (3,)),
    ((0.8,), (4,)),
)
QUICK_STEP_CACHE_SWEEP = STEP_CACHE_SWEEP[:2]


# The planned policy's forward budgets (4, 6 and 8 of 16 are the fast/balanced/quality presets), and the
# error-budget rule's budgets: both with solver-aware skipping and extrapolation, as the presets ship.
PLANNED_FORWARDS = (4, 5, 6, 8, 10)
# The forward budgets of the frontier table (of 16 steps).
FRONTIER_BUDGETS = (4, 5, 6, 8, 10)
QUICK_PLANNED_FORWARDS = (4, 8)
ERROR_BUDGETS = (0.006, 0.012, 0.025, 0.05, 0.1)
QUICK_ERROR_BUDGETS = (0.025,)


def user_settings(config: StepCacheConfig) -> dict[str, object]:
    """The fields of ``config`` that differ from the defaults, in the user-facing names (as in a config file)."""
    chosen = config.to_diffusion_cache_config().to_dict()
    defaults = StepCacheConfig().to_diffusion_cache_config().to_dict()
    return {name: value for name, value in chosen.items() if value != defaults[name]}


def cache_method(family: str, num_steps: int, config: StepCacheConfig) -> Method:
    """A benchmark row that runs StepCache with ``config``; its reported settings are the user's names."""
    return Method(family, user_settings(config), num_steps, step_cache=config)


def step_cache_method(num_steps: int, thresholds: Sequence[float], countdowns: Sequence[int]) -> Method:
    config = StepCacheConfig(sim_thresholds=tuple(thresholds), skip_countdowns=tuple(countdowns))
    method = cache_method(STEP_CACHE, num_steps, config)
    if not method.config:  # the seed's defaults: say which they are
        method = Method(STEP_CACHE, {"velocity_sim_thresholds": list(thresholds),
                                     "velocity_skip_countdowns": list(countdowns)}, num_steps, step_cache=config)
    return method


def planned_method(num_steps: int, forwards: int) -> Method:
    config = StepCacheConfig(policy="planned", forward_budget=forwards, solver_aware=True, reuse="extrapolate")
    return cache_method(PLANNED, num_steps, config)


def error_budget_method(num_steps: int, budget: float) -> Method:
    config = StepCacheConfig(policy="error_budget", error_budget=budget, final_steps=1, solver_aware=True,
                             reuse="extrapolate")
    return cache_method(ERROR_BUDGET, num_steps, config)


def schedule_method(family: str, num_steps: int, run_steps: Sequence[int]) -> Method:
    config = StepCacheConfig(static_run_steps=tuple(run_steps))
    return cache_method(family, num_steps, config)


def scaled_static_mask(num_steps: int) -> tuple[int, ...]:
    """DreamZero's released 8-of-16 mask, placed at the same fractions of a ``num_steps`` schedule."""
    if num_steps == 16:
        return DREAMZERO_STATIC_RUN_STEPS
    return tuple(sorted({round(step * (num_steps - 1) / 15) for step in DREAMZERO_STATIC_RUN_STEPS}))


@dataclass
class BenchmarkResult:
    rows: list[Row]
    budgets: list[int]
    oracle: OracleResult | None
    skipped_peers: dict[str, str]


def run_benchmark(
    target: BenchTarget,
    *,
    quick: bool = False,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
    calibrated: Sequence[Method] | None = None,
) -> BenchmarkResult:
    """Every method on ``target``: see the module docstring for the order. ``calibrated``: rows whose
    configs were calibrated on other inputs than the target's (held out)."""
    n = target.num_steps
    sweep = QUICK_STEP_CACHE_SWEEP if quick else STEP_CACHE_SWEEP
    peers, skipped_peers = target.peer_caches()
    if quick:
        # one setting per peer family is enough for a smoke run
        seen: set[str] = set()
        peers = [p for p in peers if not (p.name in seen or seen.add(p.name))]
    first = [
        Method(FULL, {}, n),
        *(step_cache_method(n, t, c) for t, c in sweep),
        *(planned_method(n, k) for k in (QUICK_PLANNED_FORWARDS if quick else PLANNED_FORWARDS) if k < n),
        *(error_budget_method(n, b) for b in (QUICK_ERROR_BUDGETS if quick else ERROR_BUDGETS)),
        *(calibrated or []),
        schedule_method(STATIC_MASK, n, scaled_static_mask(n)),
        *(Method(peer.name, peer.settings, n, peer=peer) for peer in peers),
    ]
    first_samples = []
    for index, method in enumerate(first):
        if progress:
            progress(f"measuring forwards of the caches: {index + 1}/{len(first)} {method.label}")
        first_samples.append(target.sample(method))
    reference = first_samples[0]
    budgets = sorted({round(s.nfe) for s in first_samples[1:]})
    budgets = [k for k in budgets if 2 <= k < n]
    # Every realised schedule is a candidate; the oracle scores each with plain reuse (its definition).
    candidates = [s.run_steps for s in first_samples[1:] if s.run_steps]
    # The oracle costs one sampling run per schedule it scores; a quick run searches only the budgets
    # StepCache itself reached, from the candidates and their neighbours (no backward elimination).
    oracle_budgets = sorted({len(c) for c in candidates} & set(budgets)) if quick else budgets

    scored = 0

    def objective(schedule: tuple[int, ...]) -> float:
        nonlocal scored
        scored += 1
        if progress:
            progress(f"oracle search over budgets {oracle_budgets}: schedule {scored}")
        sample = target.sample(schedule_method(ORACLE, n, schedule))
        return target.oracle_objective(target.fidelity(sample, reference))

    if progress:
        progress(f"oracle search over budgets {oracle_budgets}")
    oracle = search_schedules(
        n, oracle_budgets, objective, candidates=candidates, refine_rounds=1 if quick else 2, eliminate=not quick
    )

    methods = [
        *first,
        *(Method(FEWER_STEPS, {"num_steps": k}, k) for k in budgets),
        *(schedule_method(ORACLE, n, oracle.best[k][0]) for k in oracle_budgets),
    ]
    rows = evaluate(target, methods, repeats=repeats, samples=first_samples, progress=progress)
    return BenchmarkResult(rows=rows, budgets=budgets, oracle=oracle, skipped_peers=skipped_peers)
