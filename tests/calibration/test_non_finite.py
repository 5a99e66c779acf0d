"""Calibration on a model or input that gives NaN or infinities refuses, naming the input and the
step, instead of choosing a config with a NaN fidelity and reporting the goal met."""

from __future__ import annotations

import pytest
import torch

import stepcache
from stepcache import StepCacheConfig, VelocityCache
from stepcache.calibration import CalibrationResult
from stepcache.calibration.trajectory import Trajectory
from tests.calibration.loops import TinyVelocityModel, shifted_times


def _generate(poison_step: int | None = None, poison_output: bool = False, poison_input: int | None = None):
    model, times = TinyVelocityModel(), shifted_times()

    def velocity(x, t, step, input_seed):
        v = model(x, t)
        if (poison_step is not None and step >= poison_step) or input_seed == poison_input:
            v = v + float("nan")
        return v

    def generate(config, input_seed=0):
        noise = torch.randn(3, 8, generator=torch.Generator().manual_seed(input_seed))
        cache = VelocityCache(StepCacheConfig.from_diffusion_cache_config(config))
        steps = len(times) - 1
        x = noise.clone()
        with cache.generation(steps):
            for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
                v = cache.step(lambda x=x, t=t, i=i: velocity(x, t, i, input_seed), timestep=t)
                x = x + (t_next - t) * v
        return x * float("nan") if poison_output else x

    return generate


def test_velocities_that_turn_nan_late_are_refused_naming_the_step():
    with pytest.raises(ValueError, match=r"input 0 .*velocity of step 9 is not finite"):
        stepcache.calibrate(_generate(poison_step=9), target_forwards=4)


def test_a_nan_output_is_refused_naming_the_input():
    with pytest.raises(ValueError, match=r"input 1 \(7\).*output .* is not finite"):
        stepcache.calibrate(lambda config, seed: _generate(poison_output=seed == 7)(config, seed), inputs=[3, 7],
                            target_forwards=4)


def test_one_bad_input_among_good_ones_is_named():
    with pytest.raises(ValueError, match=r"input 1 \(5\).*step 0 is not finite"):
        stepcache.calibrate(_generate(poison_input=5), inputs=[4, 5], target_forwards=4)


def test_a_nan_fidelity_is_refused():
    with pytest.raises(ValueError, match=r"fidelity .* is nan"):
        stepcache.calibrate(_generate(), target_forwards=4, fidelity=lambda out, ref: float("nan"))


def test_a_finite_model_still_calibrates():
    result = stepcache.calibrate(_generate(), target_forwards=4)
    assert isinstance(result, CalibrationResult) and result.choices[0].met


def test_a_trajectory_refuses_non_finite_or_overflowing_velocities():
    good = [torch.ones(2, 3) * i for i in range(3)]
    Trajectory.from_velocities(good, [1.0, 0.5, 0.25])
    with pytest.raises(ValueError, match="step 2 is not finite"):
        Trajectory.from_velocities([*good[:2], torch.full((2, 3), float("inf"))], [1.0, 0.5, 0.25])
    with pytest.raises(ValueError, match="overflow"):
        huge = [torch.full((2, 3), 1e300 * (i + 1), dtype=torch.float64) for i in range(3)]
        Trajectory.from_velocities(huge, [1.0, 0.5, 0.25])

