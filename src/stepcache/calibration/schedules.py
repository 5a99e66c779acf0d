"""Offline search of fixed schedules: estimate the error of every skip window from a recorded
trajectory, and choose the best set of computed steps for every forward budget by dynamic programming.

The error model. In a window where step ``j`` was computed and steps ``j+1 .. k-1`` are skipped (``k``
the next computed step, or ``N``: the window runs to the end), each skipped step ``i`` moves the
sample with a stand-in velocity ``vhat_i`` over its own step ``dt_i = t_i - t_{i+1}``, so the window
displaces the sample by about

    e(window) = sum_i dt_i * (v_i - vhat_i)

where ``v_i`` is the velocity the full-step run computed there. What ``vhat_i`` is depends on how the
skip is run (:class:`SkipModel`):

- ``reuse="cache"``: ``v_j``;
- ``reuse="extrapolate"``: ``v_j + c (v_j - v_p)`` from the computed step ``p`` before ``j``, with the
  runtime's capped coefficient ``c = damping * clip((t_i - t_j) / (t_j - t_p), -1, 1)``.

Solver-aware stepping is estimated with the same model. Its corrector redoes each window from ``v_j``
and ``v_k``, close to integrating their linear interpolation, but ``v_k`` is evaluated where the
stand-in velocities led. In probes on both bundled models (UniPC, budgets 4, 6 and 8 of 16), the
schedule that is best for plain reuse was also the best, or within a fraction of a dB of the best,
solver-aware schedule measured, while schedules chosen with the interpolation in the model (wholly or
half) lost several dB at some budgets: they open long early windows whose drifted end the corrector
cannot repair. So the search ranks schedules by reuse error, and what solver-aware stepping adds is
measured.

A window's cost is ``||e||`` relative to the path's length (:attr:`Trajectory.scale`), averaged over
samples; a schedule's cost is the sum over its windows, averaged over the recorded generations. Each
``e`` is a linear combination of the recorded velocities, so its norm comes from the trajectory's
Gram matrix without touching a latent. Windows add up, so the best schedule for every budget is a
shortest path over steps (step 0 always runs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from stepcache.calibration.trajectory import Trajectory
from stepcache.config import REUSE_CACHED, REUSE_EXTRAPOLATE, REUSE_MODES, shown

Schedule = tuple[int, ...]


@dataclass(frozen=True)
class SkipModel:
    """How skipped steps are run: what stands in for their velocity (see the module docstring)."""

    reuse: str = REUSE_CACHED
    damping: float = 1.0

    def __post_init__(self) -> None:
        if self.reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {list(REUSE_MODES)}, got {shown(self.reuse)}")
        if not 0.0 <= self.damping <= 1.0:
            raise ValueError(f"damping must be in [0, 1], got {shown(self.damping)}")

    @property
    def uses_previous(self) -> bool:
        """Whether a window's cost depends on the computed step before the window's own."""
        return self.reuse == REUSE_EXTRAPOLATE and self.damping > 0.0


def window_coefficients(times: Sequence[float], previous: int | None, start: int, end: int,
                        model: SkipModel) -> torch.Tensor:
    """Coefficients ``a`` (one per step) with ``e(window) = sum_i a_i v_i`` for the window that starts
    at the computed step ``start``, ends before ``end`` (the next computed step, or ``N``) and follows
    the computed step ``previous`` (None: ``start`` is the first computed step)."""
    n = len(times) - 1
    if not 0 <= start < end <= n or (previous is not None and not 0 <= previous < start):
        raise ValueError(f"not a window: previous={previous}, start={start}, end={end} of {n} steps")
    t = [float(x) for x in times]
    a = torch.zeros(n, dtype=torch.float64)
    for i in range(start + 1, end):
        dt = t[i] - t[i + 1]
        c = 0.0
        if model.uses_previous and previous is not None and t[start] != t[previous]:
            c = model.damping * max(-1.0, min(1.0, (t[i] - t[start]) / (t[start] - t[previous])))
        a[i] += dt
        a[start] -= dt * (1.0 + c)
        if c:
            a[previous] += dt * c
    return a


def _relative_norms(trajectory: Trajectory, coefficients: torch.Tensor) -> torch.Tensor:
    """``(W,)``: for each row of ``coefficients`` (W, N), the mean over samples of ``||sum_i a_i v_i||``
    relative to the sample's path length."""
    squared = torch.einsum("wi,bij,wj->wb", coefficients, trajectory.gram, coefficients).clamp_min(0.0)
    return (squared.sqrt() / trajectory.scale).mean(dim=1)


def schedule_error(trajectories: Sequence[Trajectory], run_steps: Sequence[int] | Sequence[Sequence[int]],
                   model: SkipModel) -> float:
    """The estimated error of running ``run_steps`` (one schedule for every trajectory, or one per
    trajectory), averaged over the trajectories."""
    if not trajectories:
        raise ValueError("need at least one trajectory")
    per_trajectory = run_steps and not isinstance(run_steps[0], int)
    total = 0.0
    for index, trajectory in enumerate(trajectories):
        steps = list(run_steps[index] if per_trajectory else run_steps)
        _check_schedule(steps, trajectory.num_steps)
        bounds = [*steps, trajectory.num_steps]
        rows = [
            window_coefficients(trajectory.times.tolist(), steps[w - 1] if w else None, bounds[w], bounds[w + 1], model)
            for w in range(len(steps))
        ]
        total += float(_relative_norms(trajectory, torch.stack(rows)).sum())
    return total / len(trajectories)


def _check_schedule(steps: Sequence[int], num_steps: int) -> None:
    if not steps or steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])) or steps[-1] >= num_steps:
        raise ValueError(
            f"a schedule is a strictly increasing list of step indices that starts at 0 and stays below "
            f"{num_steps}; got {list(steps)}"
        )


def _window_costs(trajectories: Sequence[Trajectory], model: SkipModel) -> torch.Tensor:
    """``W[q, j, k]``: the cost of the window from computed step ``j`` to ``k`` (``k = N``: the end) when
    the computed step before ``j`` is ``q - 1`` (``q = 0``: none); infinite where that is no window."""
    n = trajectories[0].num_steps
    inf = math.inf
    costs = torch.full((n + 1, n, n + 1), inf, dtype=torch.float64)
    windows = [
        (q, j, k)
        for j in range(n)
        for q in ((0,) if j == 0 else range(1, j + 1) if model.uses_previous else (1,))
        for k in range(j + 1, n + 1)
    ]
    by_times: dict[tuple[float, ...], list[Trajectory]] = {}
    for trajectory in trajectories:
        by_times.setdefault(tuple(trajectory.times.tolist()), []).append(trajectory)
    total = torch.zeros(len(windows), dtype=torch.float64)
    for times, group in by_times.items():
        rows = torch.stack([window_coefficients(times, q - 1 if q else None, j, k, model) for q, j, k in windows])
        for trajectory in group:
            total += _relative_norms(trajectory, rows)
    total /= len(trajectories)
    for (q, j, k), cost in zip(windows, total.tolist()):
        costs[q, j, k] = cost
    if not model.uses_previous:  # the cost does not depend on the previous step: any previous will do
        costs[1:, 1:, :] = costs[1, 1:, :].expand(n, -1, -1).clone()
        for j in range(1, n):
            costs[j + 1 :, j, :] = inf  # the previous computed step comes before j
    return costs


def best_schedules(trajectories: Sequence[Trajectory], model: SkipModel,
                   budgets: Iterable[int] | None = None) -> dict[int, tuple[Schedule, float]]:
    """For every budget ``K`` (computed steps, 1..N; default all), the schedule with the lowest
    estimated error and that error: ``{K: (run_steps, error)}``. Exact for the model (dynamic
    programming over (previous computed step, computed step) states)."""
    if not trajectories:
        raise ValueError("need at least one trajectory")
    n = trajectories[0].num_steps
    if any(t.num_steps != n for t in trajectories):
        raise ValueError(
            f"every recorded generation must have the same number of steps for a fixed schedule; got "
            f"{sorted({t.num_steps for t in trajectories})}"
        )
    wanted = sorted(set(range(1, n + 1) if budgets is None else budgets))
    if any(not 1 <= k <= n for k in wanted):
        raise ValueError(f"budgets must be in 1..{n} (the number of steps), got {wanted}")
    costs = _window_costs(trajectories, model)
    inf = math.inf
    # level c: best[q, j] = lowest cost of c computed steps, the last at j, the one before it q - 1
    best = torch.full((n + 1, n), inf, dtype=torch.float64)
    best[0, 0] = 0.0
    back: list[torch.Tensor] = []  # per level >= 2: [j, k] -> q of the state (q, j) it came from
    results: dict[int, tuple[Schedule, float]] = {}
    for level in range(1, max(wanted) + 1):
        if level > 1:
            moved = best[:, :, None] + costs[:, :, :n]  # (q, j, k)
            lowest, came_from = moved.min(dim=0)  # (j, k)
            best = torch.full((n + 1, n), inf, dtype=torch.float64)
            best[1:, :] = lowest
            back.append(came_from)
        if level in wanted:
            final = best + costs[:, :, n]
            flat = int(torch.argmin(final))
            q, j = divmod(flat, n)
            value = float(final[q, j])
            if math.isfinite(value):
                results[level] = (_trace_back(back, level, q, j), value)
    return results


def _trace_back(back: list[torch.Tensor], level: int, q: int, j: int) -> Schedule:
    steps = [j]
    while level > 1:
        previous = q - 1
        q = int(back[level - 2][previous, j])
        j = previous
        steps.append(j)
        level -= 1
    return tuple(reversed(steps))
