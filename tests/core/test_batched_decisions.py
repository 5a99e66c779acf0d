"""Batched decisions (``prefetch_signals`` / ``plan_steps``) equal deciding one state at a time."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stepcache.state as state_module
from stepcache import StepCacheConfig, StepCacheState
from stepcache.state import StepDecision, plan_steps, prefetch_signals

POLICIES = {
    "seed rule": StepCacheConfig(),
    "seed rule, guarded": StepCacheConfig(warmup_steps=3, final_steps=2, max_skip_steps=2),
    "error budget": StepCacheConfig(policy="error_budget", error_budget=0.05),
    "planned": StepCacheConfig(policy="planned", forward_budget=6),
    "static": StepCacheConfig(static_run_steps=(0, 1, 2, 6, 9, 11)),
    "extrapolate": StepCacheConfig(reuse="extrapolate"),
}
STEPS = 12
TIMES = [1.0 - i / STEPS for i in range(STEPS + 1)]

# What one velocity of a step is: near the previous one (skips), unrelated, zero, or not finite.
KINDS = st.sampled_from(["near", "near", "near", "unrelated", "zero", "nan", "inf"])


def _velocity(kind: str, previous: torch.Tensor, seed: int) -> torch.Tensor:
    noise = torch.randn(previous.shape, generator=torch.Generator().manual_seed(seed))
    if kind == "near":
        return previous + 0.05 * noise
    if kind == "unrelated":
        return noise
    if kind == "zero":
        return torch.zeros_like(previous)
    return torch.full_like(previous, math.nan if kind == "nan" else math.inf)


def _same(a: StepDecision, b: StepDecision) -> bool:
    """Equal decisions, NaN equal to NaN (a non-finite similarity is a value the rule saw)."""
    for x, y in zip(vars(a).values(), vars(b).values()):
        both_nan = isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)
        if x != y and not both_nan:
            return False
    return True


@settings(max_examples=40, deadline=None)
@given(
    policy=st.sampled_from(sorted(POLICIES)),
    layouts=st.lists(st.tuples(st.integers(1, 3), st.sampled_from([6, 10])), min_size=1, max_size=5),
    kinds=st.lists(st.lists(KINDS, min_size=STEPS, max_size=STEPS), min_size=5, max_size=5),
    starts=st.lists(st.integers(0, 4), min_size=5, max_size=5),
)
def test_batched_decisions_equal_one_by_one(policy, layouts, kinds, starts):
    """States at different steps of their generations (``starts``: steps already done before the
    others begin), of different batch sizes and widths, with near, unrelated, zero, NaN and infinite
    velocities: every decision of the batched entry point equals the same state's decision alone."""
    config = POLICIES[policy]
    batched = [StepCacheState(config) for _ in layouts]
    alone = [StepCacheState(config) for _ in layouts]
    histories: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in layouts]
    latest = [torch.randn(batch, width, generator=torch.Generator().manual_seed(i))
              for i, (batch, width) in enumerate(layouts)]
    for state in (*batched, *alone):
        state.reset(STEPS, timesteps=TIMES)
    for tick in range(STEPS + max(starts)):
        active = [i for i in range(len(layouts)) if 0 <= tick - starts[i] < STEPS]
        if not active:
            continue
        decisions = plan_steps([batched[i] for i in active], [histories[i] for i in active])
        for i, decision in zip(active, decisions):
            reference = alone[i].plan_step(histories[i])
            assert _same(decision, reference), (policy, tick, i, decision, reference)
            batched[i].commit_step(decision)
            alone[i].commit_step(reference)
            if decision.run:
                step = tick - starts[i]
                latest[i] = _velocity(kinds[i][step], latest[i], 1000 * i + step)
                batched[i].push_computed(histories[i], (latest[i],))
    for a, b in zip(batched, alone):
        assert [r.ran for r in a.trace] == [r.ran for r in b.trace]


def test_prefetch_is_one_reduction_for_every_state_that_reads_a_signal(monkeypatch):
    """Eight states at the step where the seed rule reads its cosine: one call of the per-sample sums
    for all of them, after which plan_step computes nothing more."""
    states = [StepCacheState(StepCacheConfig()) for _ in range(8)]
    histories = []
    for index, state in enumerate(states):
        state.reset(16)
        first = torch.randn(1, 32, generator=torch.Generator().manual_seed(index))
        history: list = []
        for velocity in (first, first + 0.01):
            assert state.should_run_step(history)
            state.push_computed(history, (velocity,))
        histories.append(history)
    calls = []
    original = state_module.velocity_statistics
    monkeypatch.setattr(state_module, "velocity_statistics", lambda *a: calls.append(a) or original(*a))
    assert prefetch_signals(states, histories) == 8
    assert len(calls) == 1 and calls[0][0].shape == (8, 32)
    decisions = [state.plan_step(history) for state, history in zip(states, histories)]
    assert len(calls) == 1
    assert all(not decision.run for decision in decisions)  # 0.01 apart: similar, skip


def test_prefetch_leaves_refused_histories_to_plan_step():
    """A history whose velocities differ in shape is not prefetched; plan_step raises its own error."""
    state = StepCacheState(StepCacheConfig())
    state.reset(16)
    history = [(torch.ones(1, 4),), (torch.ones(1, 5),)]
    state.commit_step(state.plan_step([]))
    state.commit_step(state.plan_step(history[:1]))
    assert prefetch_signals([state], [history]) == 0
    with pytest.raises(ValueError, match="different shapes"):
        state.plan_step(history)
    with pytest.raises(ValueError, match="one history per state"):
        prefetch_signals([state], [])


def test_prefetch_decides_nothing():
    state = StepCacheState(StepCacheConfig())
    state.reset(16)
    before = copy.deepcopy(vars(state))
    prefetch_signals([state], [[]])
    assert vars(state).keys() == before.keys() and state.trace == [] and state.skip_countdown == 0
