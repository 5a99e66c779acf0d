"""The offline search: window errors are what the runtime's reuse does, and the dynamic programme finds
the best schedule (a planted optimum; every budget against brute force)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepcache.calibration import SkipModel, Trajectory, best_schedules, schedule_error
from stepcache.calibration.schedules import window_coefficients
from stepcache.state import extrapolation_coefficient
from tests.calibration.loops import shifted_times
from tests.tools.tiny_models import single_thread

MODELS = [SkipModel("cache"), SkipModel("extrapolate"), SkipModel("extrapolate", damping=0.5)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():  # tiny tensors: extra threads only spin
        yield


def _random_trajectory(num_steps: int, seed: int, batch: int = 2, width: int = 5) -> tuple[Trajectory, list]:
    generator = torch.Generator().manual_seed(seed)
    drift = torch.randn(batch, width, generator=generator)
    velocities = [drift * (1 + 0.3 * i) + 0.2 * torch.randn(batch, width, generator=generator)
                  for i in range(num_steps)]
    times = shifted_times(num_steps)
    return Trajectory.from_velocities(velocities, times), velocities


def test_a_planted_optimum_is_found():
    # Piecewise-constant velocities that change exactly at the planted steps: reusing from them is exact.
    planted, num_steps = (0, 4, 5, 8), 10
    levels = torch.randn(len(planted), 3, 6, generator=torch.Generator().manual_seed(1))
    velocities = [levels[sum(s <= i for s in planted) - 1] for i in range(num_steps)]
    trajectory = Trajectory.from_velocities(velocities, shifted_times(num_steps))
    schedule, error = best_schedules([trajectory], SkipModel("cache"), [4])[4]
    assert schedule == planted and error == pytest.approx(0.0, abs=1e-12)
    others = [(0, *c) for c in itertools.combinations(range(1, num_steps), 3) if (0, *c) != planted]
    assert min(schedule_error([trajectory], s, SkipModel("cache")) for s in others) > 1e-3


@pytest.mark.parametrize("model", MODELS, ids=lambda m: f"{m.reuse}-{m.damping}")
def test_every_budget_matches_brute_force(model):
    trajectories = [_random_trajectory(8, seed)[0] for seed in range(2)]
    found = best_schedules(trajectories, model)
    assert sorted(found) == list(range(1, 9))
    for budget, (schedule, error) in found.items():
        brute = min(
            schedule_error(trajectories, (0, *rest), model) for rest in itertools.combinations(range(1, 8), budget - 1)
        )
        assert error == pytest.approx(brute, rel=1e-9, abs=1e-12)
        assert len(schedule) == budget and schedule[0] == 0
        assert schedule_error(trajectories, schedule, model) == pytest.approx(error, rel=1e-9)
    assert found[8][1] == pytest.approx(0.0, abs=1e-12)  # every step computed: nothing reused


@settings(max_examples=30, deadline=None)
@given(st.integers(4, 10), st.data())
def test_window_coefficients_reproduce_the_runtime_reuse(num_steps, data):
    """e = sum_i dt_i (v_i - vhat_i), with vhat_i what the runtime answers (the core's capped
    extrapolation coefficient), equals sum_i a_i v_i."""
    trajectory, velocities = _random_trajectory(num_steps, data.draw(st.integers(0, 100)))
    times = trajectory.times.tolist()
    start = data.draw(st.integers(1, num_steps - 1))
    previous = data.draw(st.integers(0, start - 1))
    end = data.draw(st.integers(start + 1, num_steps))
    for model in MODELS:
        a = window_coefficients(times, previous, start, end, model)
        direct = torch.zeros_like(velocities[0], dtype=torch.float64)
        for i in range(start + 1, end):
            c = extrapolation_coefficient(times[i], times[start], times[previous], model.damping)
            c = c if model.reuse == "extrapolate" else 0.0
            stand_in = velocities[start].double() + c * (velocities[start].double() - velocities[previous].double())
            direct += (times[i] - times[i + 1]) * (velocities[i].double() - stand_in)
        combined = sum(a[i] * velocities[i].double() for i in range(num_steps))
        assert torch.allclose(combined, direct, atol=1e-10)


def test_bad_schedules_and_budgets_are_refused():
    trajectory, _ = _random_trajectory(6, 0)
    for schedule in ([], [1, 2], [0, 3, 3], [0, 6]):
        with pytest.raises(ValueError, match="schedule"):
            schedule_error([trajectory], schedule, SkipModel())
    with pytest.raises(ValueError, match=r"budgets must be in 1\.\.6"):
        best_schedules([trajectory], SkipModel(), [7])
    with pytest.raises(ValueError, match="same number of steps"):
        best_schedules([trajectory, _random_trajectory(5, 0)[0]], SkipModel())
    with pytest.raises(ValueError, match="reuse"):
        SkipModel("nearest")
