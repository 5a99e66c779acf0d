"""Which methods the benchmark runs, and in what order they depend on each other.

1. ``full``, the StepCache settings, DreamZero's static mask and the peer caches run first: their
   forwards define the budgets;
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
    FEWER_STEPS,
    FULL,
    ORACLE,
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


def step_cache_method(num_steps: int, thresholds: Sequence[float], countdowns: Sequence[int]) -> Method:
    config = StepCacheConfig(sim_thresholds=tuple(thresholds), skip_countdowns=tuple(countdowns))
    return Method(
        STEP_CACHE,
        {"sim_thresholds": list(config.sim_thresholds), "skip_countdowns": list(config.skip_countdowns)},
        num_steps,
        step_cache=config,
    )


def schedule_method(family: str, num_steps: int, run_steps: Sequence[int]) -> Method:
    config = StepCacheConfig(static_run_steps=tuple(run_steps))
    return Method(family, {"run_steps": list(config.static_run_steps)}, num_steps, step_cache=config)


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
) -> BenchmarkResult:
    """Every method on ``target``: see the module docstring for the order."""
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
        schedule_method(STATIC_MASK, n, scaled_static_mask(n)),
        *(Method(peer.name, peer.settings, n, peer=peer) for peer in peers),
    ]
    if progress:
        progress("measuring forwards of the caches")
    first_samples = [target.sample(m) for m in first]
    reference = first_samples[0]
    budgets = sorted({round(s.nfe) for s in first_samples[1:]})
    budgets = [k for k in budgets if 2 <= k < n]
    candidates = [s.run_steps for s in first_samples[1:] if s.run_steps]
    # The oracle costs one sampling run per schedule it scores; a quick run searches only the budgets
    # StepCache itself reached, from the candidates and their neighbours (no backward elimination).
    oracle_budgets = sorted({len(c) for c in candidates} & set(budgets)) if quick else budgets

    def objective(schedule: tuple[int, ...]) -> float:
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
