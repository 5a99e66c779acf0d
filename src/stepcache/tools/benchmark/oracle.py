"""The oracle: for each forward budget k, the best set of k computed steps (velocity reuse in between),
chosen knowing the full-step result. An upper bound for every step-skipping policy at k forwards.

The space has C(N-1, k-1) schedules (step 0 always runs), too many to sample each, so the search is:

1. **candidates**: every schedule given (the step_cache and static-mask rows' realised schedules), so
   the oracle is never worse than them at the same forwards;
2. **backward elimination** from the full schedule: repeatedly drop the step whose removal keeps the
   objective highest, which yields one nested schedule per budget;
3. **local refinement** of the best schedule per budget: move one computed step to a neighbouring
   skipped step while that improves the objective.

Every schedule is scored by actually sampling with it (``evaluate``), once: results are memoised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

Schedule = tuple[int, ...]


@dataclass
class OracleResult:
    """The best schedule found per budget, its objective, and how many schedules were sampled."""

    best: dict[int, tuple[Schedule, float]]
    evaluations: int


def search_schedules(
    num_steps: int,
    budgets: Iterable[int],
    evaluate: Callable[[Schedule], float],
    candidates: Iterable[Schedule] = (),
    refine_rounds: int = 2,
    eliminate: bool = True,
) -> OracleResult:
    """Find, per budget k (2 <= k <= num_steps), the computed-step set maximising ``evaluate``.

    ``eliminate=False`` skips the backward elimination (the costly part: about N^2/2 runs), leaving
    the candidates and their local refinement: a cheaper, weaker search for smoke runs.
    """
    budgets = sorted({k for k in budgets if 1 <= k <= num_steps})
    scores: dict[Schedule, float] = {}

    def score(schedule: Schedule) -> float:
        schedule = tuple(sorted(schedule))
        if schedule not in scores:
            scores[schedule] = evaluate(schedule)
        return scores[schedule]

    best: dict[int, tuple[Schedule, float]] = {}

    def offer(schedule: Schedule) -> None:
        schedule = tuple(sorted(schedule))
        k = len(schedule)
        value = score(schedule)
        if k in budgets and (k not in best or value > best[k][1]):
            best[k] = (schedule, value)

    for candidate in candidates:
        candidate = tuple(sorted(set(candidate)))
        if candidate and candidate[0] == 0 and candidate[-1] < num_steps:
            offer(candidate)

    if budgets and (eliminate or any(k not in best for k in budgets)):
        # (without candidates for some budget, elimination is the only way to reach it)
        current: Schedule = tuple(range(num_steps))
        offer(current)
        while len(current) > budgets[0]:
            options = [tuple(s for s in current if s != drop) for drop in current if drop != 0]
            current = max(options, key=score)
            offer(current)

    for k in budgets:
        for _ in range(refine_rounds):
            improved = False
            schedule, value = best[k]
            for step in best[k][0]:
                for moved in (step - 1, step + 1):
                    # `schedule` may have changed since the loop began: move only steps still in it
                    if step == 0 or step not in schedule or not 0 < moved < num_steps or moved in schedule:
                        continue
                    neighbour = tuple(sorted({*schedule, moved} - {step}))
                    if score(neighbour) > value:
                        schedule, value, improved = neighbour, score(neighbour), True
            best[k] = (schedule, value)
            if not improved:
                break
    logger.info("oracle: %d schedules sampled for budgets %s", len(scores), budgets)
    return OracleResult(best=best, evaluations=len(scores))
