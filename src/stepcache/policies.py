"""Pure schedule-planning functions for the ``planned`` policy (numbers in, step indices out).

The planned policy spends a fixed number of forwards where the sampler's own sigma schedule says
reuse costs least. Its cost model assumes only that the velocity changes at a steady relative rate per
unit of time (measured on both bundled models: 2-4.5 per unit sigma across the whole trajectory):

- reusing the velocity computed at ``t_j`` at a later step ``i`` is off by about ``rate * |t_j - t_i|``;
- that error enters the output through the step's own size ``|t_i - t_{i+1}|``.

So a window in which steps ``j+1 .. k-1`` reuse ``v_j`` costs ``sum_i |t_i - t_{i+1}| * |t_j - t_i|``,
and the plan is the set of ``K`` computed steps (step 0 always among them) that minimises the total,
found exactly by dynamic programming over the steps. On shifted flow-matching schedules (dense steps at
high noise, long final steps) it computes step 0, skips most early steps, and spends the rest of its
forwards late, like the per-input oracle does; see docs/benchmarks.md for how it compares.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from stepcache.config import shown


def window_costs(times: Sequence[float]) -> np.ndarray:
    """``cost[j, k]`` for ``0 <= j < k <= N``: the modelled error of computing step ``j`` and reusing
    its velocity for steps ``j+1 .. k-1`` (``k = N``: to the end). ``times`` holds the ``N`` step
    times and the time the last step goes to (``N + 1`` values)."""
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1 or len(t) < 2 or not np.isfinite(t).all():
        raise ValueError(f"times must be N + 1 >= 2 finite values, got {list(times)}")
    n = len(t) - 1
    size = np.abs(t[:-1] - t[1:])  # each step's size
    # sum_{i=j+1}^{k-1} size_i * |t_j - t_i| = sign * (t_j * S_i - sum size_i t_i) over the window, with
    # prefix sums: the schedule is monotone, so |t_j - t_i| keeps one sign.
    sign = 1.0 if t[0] >= t[-1] else -1.0
    prefix_size = np.concatenate([[0.0], np.cumsum(size)])
    prefix_weighted = np.concatenate([[0.0], np.cumsum(size * t[:-1])])
    j = np.arange(n + 1)[:, None]
    k = np.arange(n + 1)[None, :]
    inner_size = prefix_size[np.clip(k, 0, n)] - prefix_size[np.clip(j + 1, 0, n)]
    inner_weighted = prefix_weighted[np.clip(k, 0, n)] - prefix_weighted[np.clip(j + 1, 0, n)]
    cost = sign * (t[np.clip(j, 0, n)] * inner_size - inner_weighted)
    cost = np.where(k > j, np.maximum(cost, 0.0), np.inf)
    return cost


def plan_schedule(times: Sequence[float], forwards: int) -> tuple[int, ...]:
    """The ``forwards`` steps to compute (step 0 among them) that minimise the modelled reuse error
    over a generation whose step times are ``times`` (``N + 1`` values: every step's, then the end).

    ``forwards >= N`` computes every step. A pure function of its arguments: kept for the last
    generations' schedules (a server plans the same schedule for every chunk).
    """
    if isinstance(forwards, bool) or not isinstance(forwards, int) or forwards < 1:
        raise ValueError(f"forwards must be an integer >= 1, got {shown(forwards)}")
    return _plan_schedule(tuple(float(t) for t in times), forwards)


@functools.lru_cache(maxsize=64)
def _plan_schedule(times: tuple[float, ...], forwards: int) -> tuple[int, ...]:
    n = len(times) - 1
    if forwards >= n:
        return tuple(range(n))
    cost = window_costs(times)
    # best[m][k]: the least cost of computing m steps among 0..k-1 with the last window ending at k
    # (exclusive), step 0 computed; back[m][k]: that last window's start.
    best = np.full((forwards + 1, n + 1), np.inf)
    back = np.zeros((forwards + 1, n + 1), dtype=np.int64)
    best[1, 1:] = cost[0, 1:]
    for m in range(2, forwards + 1):
        # the m-th computed step j starts the window ending at k: best[m-1][j] + cost[j][k]
        candidates = best[m - 1][:, None] + cost
        back[m] = np.argmin(candidates, axis=0)
        best[m] = candidates[back[m], np.arange(n + 1)]
    steps = []
    k = n
    for m in range(forwards, 0, -1):
        j = 0 if m == 1 else int(back[m, k])
        steps.append(j)
        k = j
    plan = tuple(sorted(steps))
    if len(set(plan)) != forwards or plan[0] != 0 or not math.isfinite(float(best[forwards, n])):
        raise RuntimeError(f"planning {forwards} of {n} steps failed: {plan}")  # cannot happen for valid input
    return plan


def planned_forwards(num_steps: int, forward_budget: int | None, forward_fraction: float | None) -> int:
    """How many forwards a generation of ``num_steps`` steps gets: the budget, or the fraction of the
    step count rounded to the nearest integer (at least 1, at most ``num_steps``)."""
    if forward_budget is not None:
        return min(forward_budget, num_steps)
    if forward_fraction is None:
        raise ValueError("give forward_budget or forward_fraction")
    return max(1, min(num_steps, round(forward_fraction * num_steps)))
