"""Fit the adaptive ``error_budget`` policy to recorded trajectories, offline.

The policy decides from the last two computed velocities and the step times, all of which a full-step
recording holds. Replaying the recording through the core's own :class:`~stepcache.StepCacheState`
(the recorded prediction standing in for each forward the policy asks for) gives the schedule the
policy would choose if the cached run's velocities were the recorded ones: a first-order prediction
of a real run (a real run's computed velocities drift a little from the recorded ones, and so can its
forwards).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from stepcache.config import ERROR_BUDGET_POLICY, StepCacheConfig
from stepcache.recording import RecordedGeneration
from stepcache.state import StepCacheState

Schedule = tuple[int, ...]

# The bracket searched for a budget (the policy's estimates are relative errors: 1e-8 runs every step
# of any real trajectory, 1e4 skips whatever the warm-up and final steps allow).
_BUDGET_RANGE = (1e-8, 1e4)
_BISECTIONS = 30  # 12 decades / 2^30: far finer than any difference in forwards


def simulate_policy(config: StepCacheConfig, generations: Sequence[RecordedGeneration]) -> list[Schedule]:
    """The steps ``config`` would compute in each recorded (full-step) generation."""
    schedules = []
    for generation in generations:
        state = StepCacheState(config)
        state.reset(len(generation.steps), timesteps=_schedule_of(generation))
        history: list[tuple] = []
        for step in generation.steps:
            if state.should_run_step(history, timestep=step.timestep):
                state.push_computed(history, step.prediction)
        schedules.append(tuple(state.run_steps))
    return schedules


def _schedule_of(generation: RecordedGeneration) -> tuple[float, ...] | None:
    n = len(generation.steps)
    schedule = generation.schedule
    return schedule if schedule is not None and len(schedule) in (n, n + 1) else None


def mean_forwards(schedules: Sequence[Schedule]) -> float:
    return sum(len(s) for s in schedules) / len(schedules)


def fit_error_budget(
    generations: Sequence[RecordedGeneration], target_forwards: float, *, final_steps: int = 0
) -> tuple[StepCacheConfig, list[Schedule]] | None:
    """The ``error_budget`` config (with ``final_steps``) whose simulated mean forwards on the
    recording are at most ``target_forwards`` with the smallest budget (the most faithful one that
    fits), and its simulated schedules; None when even the largest budget runs more forwards."""

    def config(budget: float) -> StepCacheConfig:
        return StepCacheConfig(policy=ERROR_BUDGET_POLICY, error_budget=budget, final_steps=final_steps)

    low, high = _BUDGET_RANGE
    fitted = simulate_policy(config(high), generations)
    if mean_forwards(fitted) > target_forwards + 1e-9:
        return None
    lowest = simulate_policy(config(low), generations)
    if mean_forwards(lowest) <= target_forwards + 1e-9:
        return config(low), lowest
    for _ in range(_BISECTIONS):  # geometric bisection: budgets span orders of magnitude
        middle = math.sqrt(low * high)
        schedules = simulate_policy(config(middle), generations)
        if mean_forwards(schedules) <= target_forwards + 1e-9:
            high, fitted = middle, schedules
        else:
            low = middle
    return config(high), fitted
