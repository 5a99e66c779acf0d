"""The opt-in policy options: properties over arbitrary signal sequences, the seed's rule kept bit-exact."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepcache import DiffusionCacheConfig, StepCacheConfig, StepCacheState, VelocityCache, simulate_schedule
from stepcache.state import (
    FINAL,
    MAX_SKIPS,
    OVER_BUDGET,
    WITHIN_BUDGET,
    extrapolate_prediction,
    extrapolation_coefficient,
    reuse_error_estimate,
    velocity_signals,
    velocity_statistics,
)
from tests.core.rule_driver import drive_state

similarity_values = st.floats(-1.0, 1.0, allow_nan=False) | st.just(math.nan)
change_values = st.floats(0.0, 2.0, allow_nan=False) | st.just(math.nan)


def seed_reference(thresholds, countdowns, min_history, max_history, similarities):
    """The seed's rule written out independently of the library (reference.md, section 1)."""
    runs, countdown, history = [], 0, 0
    for sim in similarities:
        if history < min_history:
            run = True
        elif countdown > 1:
            countdown, run = countdown - 1, False
        elif countdown == 1:
            countdown, run = 0, True
        else:
            run = True
            for threshold, c in zip(thresholds, countdowns):
                if sim > threshold:
                    countdown, run = c, False
                    break
        if run:
            history = min(history + 1, max_history)
        runs.append(run)
    return runs


@st.composite
def seed_configs(draw):
    n = draw(st.integers(0, 3))
    thresholds = tuple(sorted(draw(st.lists(st.floats(-0.999, 1.0), min_size=n, max_size=n, unique=True)),
                              reverse=True))
    countdowns = tuple(draw(st.lists(st.integers(1, 6), min_size=n, max_size=n)))
    min_history = draw(st.integers(2, 4))
    return StepCacheConfig(min_history_steps=min_history, max_history=draw(st.integers(min_history, 6)),
                           sim_thresholds=thresholds, skip_countdowns=countdowns)


@settings(max_examples=200, deadline=None)
@given(config=seed_configs(), similarities=st.lists(similarity_values, max_size=40))
def test_seed_options_reproduce_the_seed_rule_bit_exactly(config, similarities):
    expected = seed_reference(config.sim_thresholds, config.skip_countdowns, config.min_history_steps,
                              config.max_history, similarities)
    assert simulate_schedule(config, similarities) == expected
    runs, _ = drive_state(config, similarities)
    assert runs == expected


@st.composite
def policy_configs(draw):
    policy = draw(st.sampled_from(["similarity", "error_budget"]))
    return StepCacheConfig(
        policy=policy,
        sim_thresholds=(draw(st.floats(-0.999, 1.0)),),
        skip_countdowns=(draw(st.integers(1, 8)),),
        error_budget=draw(st.floats(1e-3, 5.0)),
        warmup_steps=draw(st.integers(0, 5)),
        final_steps=draw(st.integers(0, 5)),
        max_skip_steps=draw(st.none() | st.integers(1, 6)),
    )


@settings(max_examples=300, deadline=None)
@given(config=policy_configs(), data=st.data())
def test_warmup_final_steps_and_skip_cap_always_hold(config, data):
    n = data.draw(st.integers(1, 40))
    sims = data.draw(st.lists(similarity_values, min_size=n, max_size=n))
    changes = data.draw(st.lists(change_values, min_size=n, max_size=n))
    runs, state = drive_state(config, sims, changes, num_steps=n)
    if config.policy == "similarity":
        assert runs == simulate_schedule(config, sims)
    assert all(runs[: max(config.warmup_steps, config.min_history_steps)])  # warm-up honoured
    assert all(runs[max(0, n - config.final_steps):])  # final steps always run
    longest, current = 0, 0
    for ran in runs:
        current = 0 if ran else current + 1
        longest = max(longest, current)
    bound = config.max_consecutive_skips
    assert bound is None or longest <= bound
    reasons = {r.reason for r in state.trace}
    if config.final_steps and n > max(config.warmup_steps, 2):
        assert state.trace[-1].reason == FINAL
    if config.policy == "error_budget":
        assert reasons <= {"warmup", FINAL, MAX_SKIPS, WITHIN_BUDGET, OVER_BUDGET, "non_finite"}


@settings(max_examples=200, deadline=None)
@given(
    budget=st.floats(0.001, 0.3),
    changes=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=30),
)
def test_error_budget_skips_exactly_while_the_accumulated_estimate_fits(budget, changes):
    config = StepCacheConfig(policy="error_budget", error_budget=budget)
    runs, state = drive_state(config, [0.5] * len(changes), changes, num_steps=len(changes))
    last_runs: list[int] = []
    accumulated = 0.0
    for step, (ran, record) in enumerate(zip(runs, state.trace)):
        if len(last_runs) < 2:
            assert ran
        else:
            # The signals of a pair of computed velocities are read once: at the first decision after
            # the pair's second run. Without times, step indices stand in: change * (step - s1) / (s1 - s2),
            # and every step integrates 1 / num_steps of the path.
            change = changes[last_runs[-1] + 1]
            estimate = reuse_error_estimate(change, step, last_runs[-1], last_runs[-2]) / len(changes)
            assert record.estimated_error == pytest.approx(accumulated + estimate)
            if not math.isclose(accumulated + estimate, budget, rel_tol=1e-9):  # exact ties depend on rounding
                assert ran == (not accumulated + estimate <= budget)
            accumulated = 0.0 if ran else accumulated + estimate
        if ran:
            last_runs.append(step)


def test_final_steps_need_the_step_count():
    state = StepCacheState(StepCacheConfig(final_steps=2))
    history = [(torch.ones(1, 2),), (torch.ones(1, 2),)]
    with pytest.raises(RuntimeError, match="needs the generation's step count"):
        state.should_run_step(history)


def test_a_fixed_schedule_past_the_end_is_refused_when_the_step_count_is_known():
    config = StepCacheConfig(static_run_steps=(0, 50))
    with pytest.raises(ValueError, match=r"\[50\] past the end of a 16-step generation"):
        StepCacheState(config).reset(16)
    StepCacheState(config).reset(51)


def test_a_finished_generation_refuses_more_steps():
    state = StepCacheState()
    state.reset(2)
    history: list = []
    for _ in range(2):
        assert state.should_run_step(history)
        history.append((torch.ones(1, 2),))
    with pytest.raises(RuntimeError, match="all of them have been decided"):
        state.should_run_step(history)


def test_extrapolation_is_exact_for_a_velocity_linear_in_time():
    slope, offset = torch.randn(3, 5), torch.randn(3, 5)

    def v(t):
        return offset + slope * t

    for t, t1, t2 in [(0.5, 0.7, 0.9), (0.65, 0.7, 0.75), (850.0, 900.0, 950.0), (0.8, 0.7, 0.6)]:
        c = extrapolation_coefficient(t, t1, t2, damping=1.0)
        (out,) = extrapolate_prediction((v(t1),), (v(t2),), c)
        assert torch.allclose(out, v(t), atol=1e-4)
    # never more than one measured gap ahead: the guess is held at that distance
    c = extrapolation_coefficient(0.1, 0.7, 0.75, damping=1.0)
    (out,) = extrapolate_prediction((v(0.7),), (v(0.75),), c)
    assert c == 1.0 and torch.allclose(out, v(0.65), atol=1e-4)
    # damped: a fraction of the way from the cached velocity to the linear guess
    c = extrapolation_coefficient(0.5, 0.7, 0.9, damping=0.25)
    (out,) = extrapolate_prediction((v(0.7),), (v(0.9),), c)
    assert torch.allclose(out, v(0.7) + 0.25 * (v(0.5) - v(0.7)), atol=1e-5)


def test_velocity_cache_extrapolates_skipped_steps_to_their_time():
    slope, offset = torch.randn(2, 4), torch.randn(2, 4)
    config = StepCacheConfig(static_run_steps=(0, 1, 3, 5, 7), reuse="extrapolate")
    cache = VelocityCache(config)
    sigmas = torch.linspace(1.0, 0.0, 9)[:-1]
    with cache.generation(len(sigmas)):
        outputs = [cache.step(lambda s=s: (offset + slope * s, "extra"), timestep=s) for s in sigmas]
    assert cache.state.run_steps == [0, 1, 3, 5, 7]
    for s, out in zip(sigmas, outputs):
        assert torch.allclose(out[0], offset + slope * s, atol=1e-5)
        assert out[1] == "extra"


def test_statistics_match_a_direct_computation_and_leave_inputs_alone():
    a, b = torch.randn(3, 70_000), torch.randn(3, 70_000)
    a_copy, b_copy = a.clone(), b.clone()
    stats = velocity_statistics(a, b)  # several chunks
    assert torch.equal(a, a_copy) and torch.equal(b, b_copy)
    direct = torch.stack([(a * b).sum(1), (a * a).sum(1), (b * b).sum(1), ((a - b) ** 2).sum(1)], 1).double()
    assert torch.allclose(stats, direct, rtol=1e-5)
    signals = velocity_signals(a, b)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1).mean()
    assert signals.similarity == pytest.approx(float(cosine), abs=1e-6)
    assert signals.relative_change == pytest.approx(float(((a - b).norm(dim=1) / a.norm(dim=1)).max()), rel=1e-5)
    half = velocity_statistics(a.to(torch.bfloat16), b.to(torch.bfloat16))
    assert half.dtype == torch.float64 and torch.isfinite(half).all()


def test_empty_batch_is_named_as_such():
    with pytest.raises(ValueError, match="batch size 0"):
        velocity_signals(torch.ones(0, 3), torch.ones(0, 3))


def test_new_fields_validate_with_the_callers_names():
    cases = [
        ({"policy": "adaptive"}, "step_cache_dit_policy", "'adaptive'"),
        ({"error_budget": 0.0}, "velocity_error_budget", "> 0"),
        ({"error_budget": math.inf}, "velocity_error_budget", "finite"),
        ({"warmup_steps": -1}, "step_cache_dit_warmup_steps", ">= 0"),
        ({"final_steps": 1.5}, "step_cache_dit_final_steps", "1.5"),
        ({"max_skip_steps": 0}, "step_cache_dit_max_skip_steps", ">= 1"),
        ({"reuse": "linear"}, "velocity_reuse", "'linear'"),
        ({"extrapolation_damping": 1.5}, "velocity_extrapolation_damping", "[0, 1]"),
        ({"solver_aware": 1}, "step_cache_dit_solver_aware", "True or False"),
        ({"static_run_steps": (0, 4), "final_steps": 2}, "step_cache_dit_final_steps", "final_steps"),
    ]
    user = StepCacheConfig().to_diffusion_cache_config().to_dict()
    from stepcache.config import USER_FIELD_NAMES

    for kwargs, user_name, words in cases:
        with pytest.raises(ValueError) as err:
            StepCacheConfig(**kwargs)
        runtime_name = next(iter(kwargs)) if "static" not in next(iter(kwargs)) else "static_run_steps"
        assert runtime_name in str(err.value) and words.split()[-1] in str(err.value)
        with pytest.raises(ValueError) as err:
            StepCacheConfig.from_diffusion_cache_config(
                DiffusionCacheConfig(**{**user, **{USER_FIELD_NAMES[k]: v for k, v in kwargs.items()}})
            )
        assert user_name in str(err.value), str(err.value)


def test_every_option_round_trips_through_the_user_config():
    config = StepCacheConfig(policy="error_budget", error_budget=0.2, warmup_steps=1, final_steps=2,
                             max_skip_steps=3, reuse="extrapolate", extrapolation_damping=0.5, solver_aware=True)
    user = config.to_diffusion_cache_config()
    assert user.step_cache_dit_policy == "error_budget" and user.velocity_reuse == "extrapolate"
    assert StepCacheConfig.from_diffusion_cache_config(DiffusionCacheConfig.from_dict(user.to_dict())) == config


# --- the planned policy ----------------------------------------------------------------------------

monotone_schedules = st.lists(st.floats(0.001, 1.0), min_size=2, max_size=13, unique=True).map(
    lambda xs: [*sorted(xs, reverse=True), 0.0]
)


@settings(max_examples=150, deadline=None)
@given(times=monotone_schedules, data=st.data())
def test_the_plan_is_the_cheapest_set_of_k_steps_with_step_0(times, data):
    import itertools

    from stepcache.policies import plan_schedule, window_costs

    n = len(times) - 1
    k = data.draw(st.integers(1, n))
    plan = plan_schedule(times, k)
    assert len(plan) == k and plan[0] == 0 and list(plan) == sorted(set(plan))
    cost = window_costs(times)

    def total(steps):
        return sum(cost[a, b] for a, b in zip(steps, (*steps[1:], n)))

    best = min(total((0, *rest)) for rest in itertools.combinations(range(1, n), k - 1))
    assert total(plan) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_planned_policy_runs_exactly_its_plan_through_the_loop_helper():
    sigmas = [1.0 - (i / 16) ** 0.5 for i in range(16)] + [0.0]
    config = StepCacheConfig(policy="planned", forward_budget=5)
    cache = VelocityCache(config)
    with cache.generation(16, timesteps=sigmas):
        for s in sigmas[:-1]:
            cache.step(lambda s=s: torch.full((1, 2), s), timestep=s)
    from stepcache.policies import plan_schedule

    assert cache.state.run_steps == list(plan_schedule(sigmas, 5)) == list(cache.state.plan)
    assert cache.state.run_steps[0] == 0 and cache.state.computed_steps == 5  # no min-history warm-up


def test_planned_policy_without_timesteps_is_a_clear_error():
    cache = VelocityCache(StepCacheConfig(policy="planned", forward_fraction=0.25))
    with cache.generation(16), pytest.raises(RuntimeError, match="needs the generation's step count and timesteps"):
        cache.step(lambda: torch.ones(1, 2))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"policy": "planned"}, "exactly one of"), ({"policy": "planned", "forward_budget": 4, "forward_fraction": 0.5},
     "exactly one of"), ({"forward_budget": 4}, "would be ignored"), ({"policy": "planned", "forward_fraction": 1.5},
     "(0, 1]"), ({"policy": "planned", "forward_budget": 0}, ">= 1")],
)
def test_planned_policy_fields_are_validated(kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        StepCacheConfig(**kwargs)


def test_presets_are_valid_and_plan_their_share():
    from stepcache.config import PRESETS, RECOMMENDED_PRESET

    assert RECOMMENDED_PRESET in PRESETS
    for name, expected in (("fast", 4), ("balanced", 6), ("quality", 8)):
        config = StepCacheConfig.from_diffusion_cache_config(DiffusionCacheConfig.preset(name))
        state = StepCacheState(config)
        state.reset(16, timesteps=[1 - i / 16 for i in range(17)])
        assert len(state.plan) == expected
