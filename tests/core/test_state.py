"""The decision rule: exact schedules, properties over arbitrary similarities and configs, tensors."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepcache import (
    DiffusionCacheConfig,
    StepCacheConfig,
    StepCacheState,
    schedule_string,
    simulate_schedule,
    velocity_similarity,
)
from stepcache.state import COUNTDOWN, DISSIMILAR, NON_FINITE, REFRESH, SIMILAR, WARMUP
from tests.core.rule_driver import drive_state


@pytest.mark.parametrize(
    ("similarity", "expected_runs"),
    [
        (0.99, [0, 1, 6, 11]),  # always above 0.95: the paper's "16 -> 4"
        (0.951, [0, 1, 6, 11]),
        (0.95, [0, 1, 4, 7, 10, 13]),  # strict >: exactly 0.95 falls to the second threshold
        (0.94, [0, 1, 4, 7, 10, 13]),
        (0.93, list(range(16))),  # at or below 0.93: every step
        (0.5, list(range(16))),
    ],
)
def test_seed_schedules_over_16_steps(default_config, similarity, expected_runs):
    runs, state = drive_state(default_config, [similarity] * 16)
    assert [i for i, ran in enumerate(runs) if ran] == expected_runs
    assert state.run_steps == expected_runs
    assert simulate_schedule(default_config, [similarity] * 16) == runs


def test_schedule_strings_match_the_reference(default_config):
    assert schedule_string(simulate_schedule(default_config, [1.0] * 16)) == "RR....R....R...."
    assert schedule_string(simulate_schedule(default_config, [0.94] * 16)) == "RR..R..R..R..R.."


# Arbitrary valid configs: 0-3 strictly descending thresholds in (-1, 1] with countdowns >= 1.
@st.composite
def configs(draw):
    n = draw(st.integers(0, 3))
    thresholds = draw(
        st.lists(
            st.floats(-0.999, 1.0, allow_nan=False), min_size=n, max_size=n, unique=True
        ).map(lambda xs: tuple(sorted(xs, reverse=True)))
    )
    countdowns = tuple(draw(st.lists(st.integers(1, 6), min_size=n, max_size=n)))
    min_history = draw(st.integers(2, 4))
    max_history = draw(st.integers(min_history, min_history + 2))
    return StepCacheConfig(
        enabled=draw(st.booleans()),
        min_history_steps=min_history,
        max_history=max_history,
        sim_thresholds=thresholds,
        skip_countdowns=countdowns,
    )


similarity_values = st.one_of(
    st.floats(-1.0, 1.0, allow_nan=False),
    st.sampled_from([0.95, 0.93, 1.0, -1.0, math.nan]),
)
similarity_sequences = st.lists(similarity_values, min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(config=configs(), sims=similarity_sequences)
def test_properties_of_the_rule(config, sims):
    runs, state = drive_state(config, sims)
    reasons = [record.reason for record in state.trace]

    # the pure simulation and the stateful rule agree
    assert simulate_schedule(config, sims) == runs
    assert state.computed_steps + state.skipped_steps == len(sims)

    if not config.enabled:
        assert all(runs)
        return

    # never skips before min_history_steps computed velocities exist
    computed = 0
    for ran in runs:
        if computed < config.min_history_steps:
            assert ran
        computed += ran

    # skips come in windows of exactly one configured countdown, each followed by exactly one forced run
    i = 0
    while i < len(runs):
        if runs[i]:
            i += 1
            continue
        start = i
        while i < len(runs) and not runs[i]:
            i += 1
        window = i - start
        assert window <= config.max_consecutive_skips
        assert reasons[start] == SIMILAR
        assert all(r == COUNTDOWN for r in reasons[start + 1 : i])
        if i < len(runs):
            assert window in config.skip_countdowns
            assert reasons[i] == REFRESH
            if i + 1 < len(runs):  # the step after a refresh is decided by similarity again
                assert reasons[i + 1] in (SIMILAR, DISSIMILAR, NON_FINITE)

    # a non-finite similarity never skips
    for record in state.trace:
        if record.similarity is not None and not math.isfinite(record.similarity):
            assert record.ran and record.reason == NON_FINITE


@settings(max_examples=100, deadline=None)
@given(sims=similarity_sequences)
def test_disabled_never_skips(sims):
    runs, state = drive_state(StepCacheConfig(enabled=False), sims)
    assert all(runs)
    assert all(record.similarity is None for record in state.trace)


def test_threshold_of_one_never_fires_even_for_identical_velocities():
    config = StepCacheConfig(sim_thresholds=(1.0,), skip_countdowns=(3,))
    state = StepCacheState(config)
    v = torch.randn(3, 7, 5)
    history = [(v,), (v.clone(),)]
    assert all(state.should_run_step(history) for _ in range(5))


def _with_cosine(cos: float, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (batch, 2, 1) velocities whose per-sample cosine is ``cos``."""
    a = torch.tensor([1.0, 0.0]).repeat(batch, 1)
    b = torch.tensor([cos, math.sqrt(max(0.0, 1 - cos * cos))]).repeat(batch, 1)
    return a.unsqueeze(-1), b.unsqueeze(-1)


@settings(max_examples=60, deadline=None)
@given(
    sims=st.lists(
        st.floats(-0.99, 0.99).filter(lambda s: abs(s - 0.95) > 1e-3 and abs(s - 0.93) > 1e-3),
        min_size=1,
        max_size=30,
    )
)
def test_real_tensors_follow_the_simulated_schedule(sims):
    """With real tensors whose cosine is sims[i] at step i, decisions equal the pure simulation."""
    config = StepCacheConfig()
    state = StepCacheState(config)
    history: list[tuple[torch.Tensor]] = []
    runs = []
    for sim in sims:
        a, b = _with_cosine(sim)
        # the rule compares the last two entries: make that pair have cosine `sim`
        probe = [(b,), (a,)] if len(history) >= 2 else history
        ran = state.should_run_step(probe)
        if ran:
            history.append((a,))
            state.trim_history(history)
        runs.append(ran)
    assert runs == simulate_schedule(config, sims)


def test_similarity_is_per_sample_then_batch_mean_in_float32():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.bfloat16)
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.bfloat16)  # cosines 1 and 0
    assert velocity_similarity(a, b) == pytest.approx(0.5)
    # flatten(1): every element after the batch dim belongs to the sample
    x = torch.randn(2, 3, 4, 5)
    y = torch.randn(2, 3, 4, 5)
    expected = torch.nn.functional.cosine_similarity(x.reshape(2, -1), y.reshape(2, -1), dim=1).mean()
    assert velocity_similarity(x, y) == pytest.approx(float(expected), abs=1e-6)


def test_similarity_rejects_mismatched_or_unbatched_velocities():
    with pytest.raises(ValueError, match="different shapes"):
        velocity_similarity(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="batch dimension"):
        velocity_similarity(torch.ones(3), torch.ones(3))


def test_non_finite_velocities_run_and_warn_once_per_generation(caplog):
    state = StepCacheState(StepCacheConfig())
    nan = torch.full((1, 4), math.nan)
    history = [(nan,), (nan,)]
    with caplog.at_level(logging.WARNING, logger="stepcache.state"):
        assert all(state.should_run_step(history) for _ in range(4))
        assert len([r for r in caplog.records if "non-finite" in r.message]) == 1
        state.reset()
        assert state.should_run_step(history)
        assert len([r for r in caplog.records if "non-finite" in r.message]) == 2
    assert state.trace[0].reason == NON_FINITE


def test_trace_counts_summary_and_reset(default_config):
    _, state = drive_state(default_config, [0.99] * 16)
    assert state.computed_steps == 4 and state.skipped_steps == 12
    assert [r.reason for r in state.trace[:3]] == [WARMUP, WARMUP, SIMILAR]
    assert state.similarities[2] == 0.99 and state.similarities[3] is None
    assert "4/16 steps computed" in state.summary() and "RR....R....R...." in state.summary()
    state.skip_countdown = 3
    state.reset()
    assert state.trace == [] and state.skip_countdown == 0
    assert state.summary().startswith("stepcache: 0/0")


def test_trim_history_keeps_the_last_entries_in_place():
    state = StepCacheState(StepCacheConfig(min_history_steps=2, max_history=3))
    history = [(i,) for i in range(6)]
    alias = history
    state.trim_history(history)
    assert alias is history and history == [(3,), (4,), (5,)]
    state.trim_history(history)
    assert history == [(3,), (4,), (5,)]


def test_state_takes_every_config_form_and_refuses_others():
    with pytest.raises(ValueError, match="unknown cache config key"):  # runtime names are not user fields
        StepCacheState({"sim_thresholds": (0.9,)})
    with pytest.raises(TypeError, match="StepCacheState needs a config"):
        StepCacheState(0.9)
    assert StepCacheState().config == StepCacheConfig()
    user = {"velocity_sim_thresholds": [0.9], "velocity_skip_countdowns": [2]}
    expected = StepCacheConfig(sim_thresholds=(0.9,), skip_countdowns=(2,))
    assert StepCacheState(user).config == expected == StepCacheState(DiffusionCacheConfig(**user)).config
    assert StepCacheState("seed").config == StepCacheConfig()


@settings(max_examples=50, deadline=None)
@given(
    steps=st.sets(st.integers(1, 20)).map(lambda s: (0, *sorted(s))),
    sims=st.lists(similarity_values, min_size=1, max_size=25),
)
def test_static_run_steps_replace_the_rule(steps, sims):
    config = StepCacheConfig(static_run_steps=steps)
    runs, state = drive_state(config, sims)
    assert [i for i, ran in enumerate(runs) if ran] == [s for s in steps if s < len(sims)]
    assert all(record.similarity is None for record in state.trace)


def test_dreamzero_released_mask():
    from stepcache import DREAMZERO_STATIC_RUN_STEPS

    config = StepCacheConfig(static_run_steps=DREAMZERO_STATIC_RUN_STEPS)
    assert schedule_string(simulate_schedule(config, [0.0] * 16)) == "RRR...R...R..RRR"
    # disabled still wins: every step runs
    assert all(simulate_schedule(StepCacheConfig(enabled=False, static_run_steps=(0,)), [0.0] * 5))
