"""A full-step recording holds exactly the velocities the run used: replaying them in place of the
model reproduces the output bit for bit (a hand-written loop, and a diffusers pipeline to its last step)."""

from __future__ import annotations

import pytest
import torch

from stepcache import StepCacheConfig, VelocityCache
from stepcache.calibration import NEVER_SKIP, Trajectory
from stepcache.calibration.trajectory import recorded_generations
from stepcache.recording import record_generations
from tests.calibration.loops import TinyVelocityModel, euler_loop, shifted_times
from tests.tools.tiny_models import single_thread, tiny_wan_digits


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return tiny_wan_digits(tmp_path_factory.mktemp("tiny-wan"))


def test_replaying_a_loop_recording_reproduces_its_output_exactly():
    model, times = TinyVelocityModel(), shifted_times()
    noise = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    cache = VelocityCache(StepCacheConfig.from_diffusion_cache_config(NEVER_SKIP))
    with record_generations() as recording:
        output = euler_loop(lambda x, t, _i: model(x, t), cache, noise, times)
    (generation,) = recorded_generations(recording)
    assert generation.complete and [s.step for s in generation.steps] == list(range(len(times) - 1))
    assert generation.timesteps == pytest.approx(times[:-1])
    velocities = generation.velocities
    replayed = euler_loop(lambda _x, _t, i: velocities[i], None, noise, times)
    assert torch.equal(replayed, output)

    trajectory = Trajectory.from_generation(generation)
    assert trajectory.times.tolist() == pytest.approx([*times[:-1], 0.0])
    norms = torch.stack([v.double().norm(dim=1) for v in velocities], dim=1)
    assert torch.allclose(trajectory.norms, norms)


def test_replaying_a_diffusers_recording_reproduces_its_output_exactly(digits):
    from stepcache.integrations.diffusers import apply_step_cache, remove_step_cache

    pipe, steps = digits.pipe, 16

    def call_kwargs():
        return {**digits.call_kwargs([0, 3, 7]), "num_inference_steps": steps,
                "generator": torch.Generator().manual_seed(5)}

    apply_step_cache(pipe, NEVER_SKIP)
    try:
        with record_generations() as recording:
            output = pipe(**call_kwargs()).frames
    finally:
        remove_step_cache(pipe)
    (generation,) = recorded_generations(recording)
    # the last step too: the hook enters a step's velocities when the scheduler steps
    assert [s.step for s in generation.steps] == list(range(steps)) and generation.complete
    assert all(list(s.extras["branches"]) == ["cond", "uncond"] for s in generation.steps)

    answers = [output for step in generation.steps for output in step.extras["branches"].values()]
    calls = iter(answers)

    def replay(*_args, return_dict=True, **_kwargs):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        velocity = next(calls).clone()
        return Transformer2DModelOutput(sample=velocity) if return_dict else (velocity,)

    pipe.transformer.forward = replay
    try:
        replayed = pipe(**call_kwargs()).frames
    finally:
        del pipe.transformer.forward
    assert next(calls, None) is None  # every recorded output answered exactly one call
    assert torch.equal(replayed, output)

    guided = Trajectory.from_generation(generation, guidance_scale=pipe.guidance_scale)
    branches = generation.steps[3].extras["branches"]
    expected = branches["uncond"].double() + pipe.guidance_scale * (branches["cond"] - branches["uncond"]).double()
    assert torch.allclose(guided.norms[:, 3], expected.flatten(1).norm(dim=1))
