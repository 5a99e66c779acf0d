"""``stepcache.calibrate``: a hand-written loop and a diffusers pipeline calibrate the same way, within
the stated generation budget, and the chosen config is what was measured."""

from __future__ import annotations

import math

import pytest
import torch

import stepcache
from stepcache import DiffusionCacheConfig, StepCacheConfig, VelocityCache
from stepcache.calibration import NEVER_SKIP, CalibrationResult, psnr_db
from stepcache.calibration.policies import fit_error_budget, simulate_policy
from stepcache.calibration.trajectory import recorded_generations
from stepcache.recording import record_generations
from tests.calibration.loops import STEPS, TinyVelocityModel, euler_loop, make_generate, shifted_times
from tests.tools.tiny_models import single_thread, tiny_wan_digits


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return tiny_wan_digits(tmp_path_factory.mktemp("tiny-wan"))


def test_a_hand_written_loop_calibrates_within_one_recording_and_two_verifications():
    calls: list[DiffusionCacheConfig] = []
    generate = make_generate(calls=calls)
    result = stepcache.calibrate(generate, target_forwards=4)
    assert len(calls) == result.generations == 3 == result.generation_limit
    assert calls[0] == NEVER_SKIP and (result.recorded_generations, result.verification_generations) == (1, 2)
    config = result.config
    assert len(config.step_cache_dit_static_steps) == 4 and config.step_cache_dit_static_steps[0] == 0
    # a hand-written loop has no solver to be aware of: both variants measured, equal, the plain one kept
    pair = result.verified
    assert {c.config.step_cache_dit_solver_aware for c in pair} == {True, False}
    assert pair[0].fidelity_db == pair[1].fidelity_db and not config.step_cache_dit_solver_aware
    # the measurement is what a user gets from the config
    reference = generate(NEVER_SKIP)
    assert psnr_db(generate(config), reference) == pytest.approx(result.chosen.fidelity_db)
    assert result.chosen.forwards == 4 and result.choices[0].met


def test_solver_aware_variants_that_repeat_their_plain_twins_are_not_verified_again():
    """Once the first solver-aware run equals its plain twin bit for bit, the later budgets' runs all go to
    plain candidates (other schedules or reuse modes); where solver-aware stepping changes the output
    (a loop that reads it), both stay measured at every budget."""
    calls: list[DiffusionCacheConfig] = []
    result = stepcache.calibrate(make_generate(calls=calls), target_forwards=[4, 6, 8])
    assert len(calls) == result.generations == result.generation_limit == 1 + 2 * 3
    run = calls[1:]
    assert [c.step_cache_dit_solver_aware for c in run[:2]] == [True, False]
    assert not any(c.step_cache_dit_solver_aware for c in run[2:])  # 4 runs that were pairs before
    assert len({repr(sorted(c.to_dict().items())) for c in run}) == 6  # 6 distinct configs measured
    for budget in (6, 8):
        measured = [c for c in result.candidates if c.target_forwards == budget and c.verified]
        assert len(measured) == 2 and not any(c.config.step_cache_dit_solver_aware for c in measured)
    assert not any(c.config.step_cache_dit_solver_aware for c in result.candidates if not c.verified)

    model = TinyVelocityModel()

    def reads_solver_aware(config, _input=None):  # a loop where solver_aware changes the step taken
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(3, 8, generator=generator)
        cache = VelocityCache(StepCacheConfig.from_diffusion_cache_config(config))
        damping = 0.5 if config.step_cache_dit_solver_aware else 1.0
        return euler_loop(lambda x, t, _i: damping * model(x, t), cache, noise, shifted_times())

    both = stepcache.calibrate(reads_solver_aware, target_forwards=[4, 6])
    for budget in (4, 6):
        measured = [c for c in both.candidates if c.target_forwards == budget and c.verified]
        assert {c.config.step_cache_dit_solver_aware for c in measured} == {True, False}


def test_budgets_inputs_and_the_generation_count():
    calls: list[DiffusionCacheConfig] = []
    generate = make_generate(calls=calls)
    result = stepcache.calibrate(generate, [11, 12], target_forwards=[3, 6], verifications=1)
    assert result.generation_limit == 2 * (1 + 1 * 2) and len(calls) == result.generations <= result.generation_limit
    assert result.calibration_inputs == [11, 12]
    assert [len(result.config_for(k).step_cache_dit_static_steps) for k in (3, 6)] == [3, 6]
    assert result.config == result.config_for(3)
    with pytest.raises(KeyError, match="budgets"):
        result.config_for(5)
    chosen = result.choices[1].candidate
    assert len(chosen.input_fidelity_db) == 2 and chosen.fidelity_db <= max(chosen.input_fidelity_db)
    # more budget: better fidelity on this smooth model
    assert result.choices[1].candidate.fidelity_db > result.choices[0].candidate.fidelity_db


def test_a_psnr_floor_takes_the_fewest_measured_forwards_that_clear_it():
    calls: list[DiffusionCacheConfig] = []
    generate = make_generate(calls=calls)
    result = stepcache.calibrate(generate, min_psnr=45.0)
    assert len(calls) == result.generations <= result.generation_limit == 3
    choice = result.choices[0]
    assert choice.met and choice.candidate.fidelity_db >= 45.0
    assert choice.candidate.forwards == min(c.forwards for c in result.verified if c.fidelity_db >= 45.0)
    # one verification, far below the floor: not met, and the closest measured config is reported
    short = stepcache.calibrate(generate, min_psnr=400.0, verifications=1)
    assert not short.choices[0].met and short.generations == 2 and short.choices[0].candidate.verified


def test_held_out_inputs_are_measured_apart():
    generate = make_generate()
    result = stepcache.calibrate(generate, [1], target_forwards=5, held_out=[7, 8])
    (held,) = result.held_out
    assert held.candidate is result.chosen and len(held.input_fidelity_db) == 2 and held.forwards == 5
    assert result.held_out_inputs == [7, 8] and result.held_out_generations == 4
    assert result.generations == 3  # reporting is not calibration


def test_the_error_budget_fit_predicts_a_real_run_where_velocities_do_not_depend_on_the_sample():
    velocity = TinyVelocityModel()
    probe = torch.zeros(2, 8)

    def generate(config):  # v depends on t only: a cached run computes exactly the recorded velocities
        cache = VelocityCache(StepCacheConfig.from_diffusion_cache_config(config))
        return euler_loop(lambda _x, t, _i: velocity(probe, t), cache, probe, shifted_times())

    with record_generations() as recording:
        generate(NEVER_SKIP)
    generations = recorded_generations(recording)
    config, schedules = fit_error_budget(generations, 6, final_steps=1)
    assert len(schedules[0]) <= 6 and schedules[0][-1] == STEPS - 1
    assert fit_error_budget(generations, 2, final_steps=3) is None  # warm-up 2 + final 3 > 2
    smaller = StepCacheConfig(policy="error_budget", error_budget=config.error_budget * 0.9, final_steps=1)
    assert len(simulate_policy(smaller, generations)[0]) > 6 >= len(schedules[0])  # the smallest budget that fits
    with record_generations() as recording:
        generate(config.to_diffusion_cache_config())
    (real,) = recorded_generations(recording)
    assert tuple(s.step for s in real.steps if s.ran) == schedules[0]


def test_a_diffusers_pipeline_calibrates_from_call_kwargs(digits):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stepcache.calibration.generation import DiffusersSource
    from stepcache.integrations.diffusers import get_step_cache_stats

    def call_kwargs(seed, labels=(1, 4, 8)):
        return {**digits.call_kwargs(list(labels)), "num_inference_steps": 10,
                "generator": torch.Generator().manual_seed(seed)}

    result = stepcache.calibrate(digits.pipe, [call_kwargs(1)], target_forwards=5, held_out=[call_kwargs(9)])
    assert result.num_steps == 10 and result.generations == 3
    # UniPC has multistep memory: the best schedule is measured with and without solver-aware stepping
    assert {c.config.step_cache_dit_solver_aware for c in result.verified} == {True, False}
    assert result.calibration_inputs[0]["generator"] == {"generator_seed": 1}
    assert result.held_out[0].forwards == 5 and math.isfinite(result.held_out[0].fidelity_db)
    # the held-out report compares with fewer steps at the same forwards, in Python as in the CLI
    assert result.held_out[0].extra["fewer_steps"] == 5 and math.isfinite(result.held_out[0].extra["fewer_steps_db"])
    assert result.held_out_generations == 3  # the reference, the chosen config, 5 steps
    report = result.summary()
    assert "; at 5 forwards: fewer steps " in report and "  config: " in report
    with pytest.raises(ValueError, match="not applied"):  # calibration leaves the pipeline as it found it
        get_step_cache_stats(digits.pipe)
    # the input's generator is rewound before every run: the same input gives the same output
    source = DiffusersSource(digits.pipe, [call_kwargs(1)])
    assert torch.equal(source.run(NEVER_SKIP, 0).frames, source.run(NEVER_SKIP, 0).frames)

    unipc = digits.pipe.scheduler
    digits.pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    try:  # no multistep memory: solver-aware stepping changes nothing, so it is not spent on
        euler = stepcache.calibrate(digits.pipe, [call_kwargs(1)], target_forwards=5)
    finally:
        digits.pipe.scheduler = unipc
    assert not any(c.config.step_cache_dit_solver_aware for c in euler.candidates)
    assert len(euler.verified) == 2


def test_bad_calls_are_clear_errors(digits):
    generate = make_generate()
    for kwargs, words in (
        ({}, "exactly one goal"),
        ({"target_forwards": 4, "min_psnr": 30}, "exactly one goal"),
        ({"target_forwards": 0}, ">= 1"),
        ({"min_psnr": -5}, "min_psnr .*> 0"),
        ({"min_psnr": 0.0}, "min_psnr .*> 0"),
        ({"target_forwards": [4, 4]}, "repeated"),
        ({"target_forwards": 4, "verifications": 0}, "verifications"),
        ({"target_forwards": 4, "held_out": [1]}, "held_out needs inputs"),
        ({"target_forwards": 40}, r"1\.\.12"),
    ):
        with pytest.raises(ValueError, match=words):
            stepcache.calibrate(generate, **kwargs)
    with pytest.raises(ValueError, match="inputs is empty"):
        stepcache.calibrate(generate, [], target_forwards=4)
    with pytest.raises(ValueError, match="install it"):
        stepcache.calibrate(lambda config: torch.zeros(1), target_forwards=4)
    with pytest.raises(ValueError, match="needs inputs"):
        stepcache.calibrate(digits.pipe, target_forwards=4)
    with pytest.raises(TypeError, match="generation function"):
        stepcache.calibrate(42, target_forwards=4)


def test_the_package_imports_without_the_tools():
    import subprocess
    import sys

    code = ("import sys, stepcache; stepcache.calibrate; import stepcache.calibration; "
            "bad = [m for m in sys.modules if m.startswith(('stepcache.tools', 'diffusers'))]; print(bad)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert isinstance(CalibrationResult, type)
