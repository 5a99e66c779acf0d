"""VelocityCache: the loop helper makes exactly the decisions of should_run_step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepcache import StepCacheConfig, StepCacheState, VelocityCache


def _velocities(seed: int, n: int, noise: float) -> list[torch.Tensor]:
    """A drifting sequence of velocities: consecutive cosines vary with `noise`."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2, 3, 8, generator=g)
    out = []
    for _ in range(n):
        base = base + noise * torch.randn(base.shape, generator=g)
        out.append(base.clone())
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 30),
    noise=st.sampled_from([0.05, 0.2, 0.35, 0.6]),
    thresholds=st.sampled_from([((0.95, 0.93), (4, 2)), ((0.99, 0.9, 0.5), (3, 2, 1)), ((), ())]),
)
def test_same_decisions_as_should_run_step(seed, n, noise, thresholds):
    config = StepCacheConfig(sim_thresholds=thresholds[0], skip_countdowns=thresholds[1])
    velocities = _velocities(seed, n, noise)

    # reference: the seed's loop, written out by hand
    state = StepCacheState(config)
    history: list[tuple[torch.Tensor]] = []
    expected, expected_outputs = [], []
    for v in velocities:
        ran = state.should_run_step(history)
        if ran:
            history.append((v,))
            state.trim_history(history)
        expected.append(ran)
        expected_outputs.append(history[-1][0])

    cache = VelocityCache(config)
    got, outputs = [], []
    for v in velocities:
        outputs.append(cache.step(lambda v=v: v))
        got.append(cache.ran_last_step)
    assert got == expected
    assert all(a is b for a, b in zip(outputs, expected_outputs))
    assert [r.similarity for r in cache.state.trace] == [r.similarity for r in state.trace]


def test_skipped_steps_return_the_whole_cached_tuple_without_calling():
    cache = VelocityCache(StepCacheConfig(sim_thresholds=(-0.99,), skip_countdowns=(4,)))
    calls = []

    def model(i):
        calls.append(i)
        return (torch.full((1, 2), float(i + 1)), torch.full((1, 3), -float(i + 1)))

    results = [cache.step(lambda i=i: model(i)) for i in range(16)]
    assert calls == [0, 1, 6, 11]
    assert results[5] is results[1] and results[10] is results[6]
    assert isinstance(results[3], tuple) and torch.equal(results[3][1], torch.full((1, 3), -2.0))


def test_clone_outputs_protects_against_reused_buffers():
    buffer = torch.zeros(1, 4)

    def model():  # returns a buffer that its next call overwrites, like a CUDA graph
        buffer.add_(1.0)
        return buffer

    cache = VelocityCache(StepCacheConfig(sim_thresholds=(-0.99,), skip_countdowns=(2,)), clone_outputs=True)
    first = cache.step(model)
    second = cache.step(model)
    assert first is not buffer and float(first[0, 0]) == 1.0 and float(second[0, 0]) == 2.0
    assert float(cache.step(model)[0, 0]) == 2.0  # skipped: the clone, untouched by later writes


def test_reset_starts_a_new_generation():
    cache = VelocityCache(StepCacheConfig(sim_thresholds=(-0.99,), skip_countdowns=(4,)))
    for _ in range(3):
        cache.step(lambda: torch.ones(1, 2))
    assert cache.state.skip_countdown > 0
    cache.reset()
    assert cache.history == [] and cache.state.trace == [] and cache.state.skip_countdown == 0
    cache.step(lambda: torch.ones(1, 2))
    assert cache.ran_last_step


def test_readme_euler_loop_runs_and_skips():
    """The README's example: a plain flow-matching Euler loop on an analytic velocity field."""
    torch.manual_seed(0)
    x0 = torch.randn(4, 8)
    sigmas = torch.linspace(1.0, 0.0, 17)

    def model(x, sigma):  # exact velocity of the straight path to x0: v = (x - x0) / sigma
        return (x - x0) / sigma

    def sample(cache):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
        cache.reset()
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            v = cache.step(lambda x=x, sigma=sigma: model(x, sigma))
            x = x + (sigma_next - sigma) * v
        return x

    cached = VelocityCache()
    full = VelocityCache(StepCacheConfig(enabled=False))
    out_cached, out_full = sample(cached), sample(full)
    assert full.state.computed_steps == 16
    # straight paths give perfectly aligned velocities: the seed's 4-of-16 schedule, and still exact
    assert cached.state.run_steps == [0, 1, 6, 11]
    assert torch.allclose(out_cached, out_full, atol=1e-5)


# --- generation boundaries and failures (issue: no silent wrong results) ---------------------------

SKIP_ALL = StepCacheConfig(sim_thresholds=(-0.99,), skip_countdowns=(4,))


def test_a_finished_generation_refuses_the_next_without_reset():
    cache = VelocityCache(StepCacheConfig(static_run_steps=(0,)))
    with cache.generation(num_steps=4):
        for _ in range(4):
            cache.step(lambda: torch.ones(1, 2))
    with pytest.raises(RuntimeError, match=r"after its `with cache\.generation"):
        cache.step(lambda: torch.ones(1, 2))
    cache.reset(4)
    for _ in range(4):
        cache.step(lambda: torch.ones(1, 2))
    with pytest.raises(RuntimeError, match="generation of 4 steps is complete"):
        cache.step(lambda: torch.ones(1, 2))


def test_a_timestep_that_restarts_is_refused():
    cache = VelocityCache()
    cache.reset()
    for t in (1.0, 0.75, 0.5):
        cache.step(lambda: torch.ones(1, 2), timestep=t)
    with pytest.raises(RuntimeError, match="does not continue this generation"):
        cache.step(lambda: torch.ones(1, 2), timestep=1.0)


def test_unknown_generation_length_is_warned_about(caplog):
    cache = VelocityCache()
    cache.step(lambda: torch.ones(1, 2))
    assert any("does not know where this generation ends" in r.message for r in caplog.records)


def test_a_failing_model_call_leaves_the_cache_as_before():
    """A fixed schedule must run at its steps even when a call fails and is retried."""
    schedule = (0, 1, 2, 6, 10, 13, 14, 15)
    cache = VelocityCache(StepCacheConfig(static_run_steps=schedule))
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] in (2, 5):
            raise ConnectionError("transient")
        return torch.full((1, 2), float(calls["n"]))

    with cache.generation(16):
        step = 0
        while step < 16:
            try:
                cache.step(flaky)
            except ConnectionError:
                assert len(cache.state.trace) == step  # nothing recorded: retry the same step
                continue
            step += 1
    assert cache.state.run_steps == list(schedule)


@pytest.mark.parametrize(
    ("returned", "words"),
    [(np.ones((1, 2)), "ndarray"), (None, "NoneType"), ((), "empty"), ((np.ones(2),), "ndarray")],
)
def test_model_outputs_the_rule_cannot_read_are_named(returned, words):
    cache = VelocityCache()
    with cache.generation(4), pytest.raises(TypeError, match=words):
        cache.step(lambda: returned)
    assert cache.state.trace == []


def test_an_empty_batch_is_named():
    cache = VelocityCache()
    with cache.generation(4), pytest.raises(ValueError, match="non-empty leading batch"):
        cache.step(lambda: torch.ones(0, 3))


def test_bare_tensors_in_the_history_are_refused():
    state = StepCacheState()
    with pytest.raises(TypeError, match=r"wrap the velocity as \(velocity,\)"):
        state.should_run_step([torch.ones(2, 3, 4), torch.ones(2, 3, 4)])


def test_never_skip_configs_are_bit_identical_to_no_cache():
    torch.manual_seed(0)
    weight = torch.randn(8, 8)
    for config in (StepCacheConfig(enabled=False), StepCacheConfig(sim_thresholds=(1.0,), skip_countdowns=(1,))):
        x_ref = x = torch.randn(2, 8)
        cache = VelocityCache(config)
        with cache.generation(10):
            for i in range(10):
                x = x - 0.1 * cache.step(lambda x=x: torch.tanh(x @ weight), timestep=1.0 - i / 10)
        for _ in range(10):
            x_ref = x_ref - 0.1 * torch.tanh(x_ref @ weight)
        assert torch.equal(x, x_ref) and cache.state.computed_steps == 10


def test_a_fixed_schedule_without_a_step_count_is_refused():
    """Driven on without reset(), a fixed schedule past its last run step would compute nothing and
    answer the second generation with the first one's velocities."""
    cache = VelocityCache(StepCacheConfig(static_run_steps=(0, 1, 3)))
    with pytest.raises(RuntimeError, match="needs the generation's step count"):
        cache.step(lambda: torch.ones(1, 2))
    with cache.generation(), pytest.raises(RuntimeError, match="needs the generation's step count"):
        cache.step(lambda: torch.ones(1, 2))
    with cache.generation():  # a timestep per step bounds the generation instead
        for t in (1.0, 0.5, 0.25):
            cache.step(lambda: torch.ones(1, 2), timestep=t)
        with pytest.raises(RuntimeError, match="does not continue this generation"):
            cache.step(lambda: torch.ones(1, 2), timestep=1.0)


@pytest.mark.parametrize("shape", ["same", "view", "tuple"])
def test_a_model_that_reuses_its_output_buffer_is_refused(shape):
    buffer = torch.zeros(2, 4)

    def model():  # like a CUDA graph: every call writes into the one buffer
        buffer.copy_(torch.randn(2, 4))
        if shape == "view":
            return buffer[:, :2]
        return (torch.randn(2, 4), buffer) if shape == "tuple" else buffer

    cache = VelocityCache(StepCacheConfig(sim_thresholds=(0.999,), skip_countdowns=(1,)))
    with cache.generation(4):
        cache.step(model)
        with pytest.raises(RuntimeError, match=r"same storage .* clone_outputs=True"):
            cache.step(model)
        assert len(cache.state.trace) == 1  # refused before anything was counted
    protected = VelocityCache(StepCacheConfig(sim_thresholds=(0.999,), skip_countdowns=(1,)), clone_outputs=True)
    with protected.generation(4):
        for _ in range(4):
            protected.step(model)
    assert protected.state.computed_steps == 4  # random outputs: never similar enough to skip
