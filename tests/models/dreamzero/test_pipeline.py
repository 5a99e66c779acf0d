from __future__ import annotations

import numpy as np
import pytest
import torch

from stepcache import StepCacheBackend, get_stepcache_state
from stepcache.models.dreamzero.model import DiTOutput
from stepcache.models.dreamzero.pipeline import DreamZeroPipeline, DreamZeroPipelineConfig
from stepcache.models.dreamzero.world import ReachingWorld
from tests.models.dreamzero.tiny import make_tiny_model

NEVER_SKIP = {"velocity_sim_thresholds": [1.0], "velocity_skip_countdowns": [1]}
SKIP_WHENEVER_ALLOWED = {"velocity_sim_thresholds": [-0.99], "velocity_skip_countdowns": [4]}


def _pipeline(cache_config=None, **pipeline_kwargs) -> DreamZeroPipeline:
    pipe = DreamZeroPipeline(make_tiny_model(), DreamZeroPipelineConfig(**pipeline_kwargs))
    if cache_config is not None:
        backend = StepCacheBackend(cache_config)
        backend.enable(pipe)
        backend.refresh(pipe, pipe.config.num_inference_steps)
    return pipe


def _episode(pipe: DreamZeroPipeline, chunks: int = 3, seed: int = 0, instruction=None):
    """Closed loop on the world; the same noise seed per chunk index in every call."""
    world = ReachingWorld()
    frame, state = world.reset(seed)
    outputs = []
    for chunk in range(chunks):
        out = pipe(frame, instruction if instruction is not None else world.instruction, state,
                   generator=torch.Generator().manual_seed(100 + chunk))
        outputs.append(out)
        frame, state = world.execute(out.actions[0])
    return outputs


class _Spy:
    """Counts prefill and denoising forwards and records every DiT output and scheduler input."""

    def __init__(self, pipe: DreamZeroPipeline) -> None:
        self.prefills = 0
        self.forwards: list[DiTOutput] = []
        self.video_inputs: list[torch.Tensor] = []
        self.action_inputs: list[torch.Tensor] = []
        model = pipe.transformer
        original_forward, original_prefill = model.forward, model.prefill

        def forward(*args, **kwargs):
            out = original_forward(*args, **kwargs)
            self.forwards.append(DiTOutput(out.video.clone(), out.action.clone()))
            return out

        def prefill(*args, **kwargs):
            self.prefills += 1
            return original_prefill(*args, **kwargs)

        model.forward, model.prefill = forward, prefill
        for scheduler, store in ((pipe.video_scheduler, self.video_inputs),
                                 (pipe.action_scheduler, self.action_inputs)):
            self._wrap(scheduler, store)

    @staticmethod
    def _wrap(scheduler, store):
        original = scheduler.step

        def step(model_output, timestep, sample, *args, **kwargs):
            store.append(model_output.clone())
            return original(model_output, timestep, sample, *args, **kwargs)

        scheduler.step = step


def test_never_firing_thresholds_are_bit_identical_to_no_cache():
    plain = _episode(_pipeline(None), chunks=3)
    cached_pipe = _pipeline(NEVER_SKIP)
    cached = _episode(cached_pipe, chunks=3)
    for a, b in zip(plain, cached):
        assert np.array_equal(a.actions, b.actions)
        assert np.array_equal(a.frames, b.frames)
        assert a.dit_forwards == b.dit_forwards == 16
        assert b.trace and all(r.ran for r in b.trace)


def test_forwards_equal_run_decisions_and_prefill_is_never_skipped():
    pipe = _pipeline(SKIP_WHENEVER_ALLOWED)
    spy = _Spy(pipe)
    outputs = _episode(pipe, chunks=3)
    runs = [sum(r.ran for r in out.trace) for out in outputs]
    assert len(spy.forwards) == sum(runs) == sum(out.dit_forwards for out in outputs)
    assert all(out.ran == [r.ran for r in out.trace] for out in outputs)
    assert runs == [4, 4, 4]  # steps 0, 1, 6, 11 of 16
    assert outputs[0].ran == [True, True, False, False, False, False, True] + [False] * 4 + [True] + [False] * 4
    assert spy.prefills == 3 and all(out.prefill_forwards == 1 for out in outputs)
    # the schedulers step on every step, computed or not
    assert len(spy.video_inputs) == len(spy.action_inputs) == 3 * 16


def test_state_is_reset_for_every_chunk():
    pipe = _pipeline(SKIP_WHENEVER_ALLOWED)
    outputs = _episode(pipe, chunks=3)
    state = get_stepcache_state(pipe)
    assert len(state.trace) == 16  # the last chunk only: not 48
    for out in outputs:
        assert [r.step for r in out.trace] == list(range(16))
        assert out.trace[0].reason == "warmup" and out.trace[1].reason == "warmup"


def test_skipped_steps_reuse_both_cached_velocities():
    pipe = _pipeline(SKIP_WHENEVER_ALLOWED, guidance_scale=3.0)
    spy = _Spy(pipe)
    out = _episode(pipe, chunks=1)[0]
    computed = -1
    last_video = last_action = None
    for step, ran in enumerate(out.ran):
        if ran:
            computed += 1
            last_video, last_action = spy.video_inputs[step], spy.action_inputs[step]
        else:
            assert torch.equal(spy.video_inputs[step], last_video)
            assert torch.equal(spy.action_inputs[step], last_action)
    assert computed + 1 == out.dit_forwards == len(spy.forwards)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_cfg_on_video_only_actions_take_the_conditional_branch(guidance):
    pipe = _pipeline(None, guidance_scale=guidance)
    spy = _Spy(pipe)
    _episode(pipe, chunks=1)
    assert len(spy.forwards) == 16
    for out, video_in, action_in in zip(spy.forwards, spy.video_inputs, spy.action_inputs):
        if guidance == 1.0:
            assert out.video.shape[0] == 1  # no unconditional branch at all
            torch.testing.assert_close(video_in, out.video)
        else:
            cond, uncond = out.video[:1], out.video[1:]
            torch.testing.assert_close(video_in, uncond + guidance * (cond - uncond))
        torch.testing.assert_close(action_in, out.action[:1])


def test_cached_outputs_are_cloned_so_buffer_reusing_models_stay_correct():
    """A compiled / CUDA-graph DiT returns the same buffer every call; the cache must copy it."""
    reference = _episode(_pipeline({}, guidance_scale=1.0), chunks=2)
    pipe = _pipeline({}, guidance_scale=1.0)
    model = pipe.transformer
    original = model.forward
    buffers: dict[str, torch.Tensor] = {}

    def buffered_forward(*args, **kwargs):
        out = original(*args, **kwargs)
        if not buffers:
            buffers["video"], buffers["action"] = out.video.clone(), out.action.clone()
        buffers["video"].copy_(out.video)
        buffers["action"].copy_(out.action)
        return DiTOutput(buffers["video"], buffers["action"])

    model.forward = buffered_forward
    buffered = _episode(pipe, chunks=2)
    for a, b in zip(reference, buffered):
        assert a.ran == b.ran
        assert np.array_equal(a.actions, b.actions)


def test_context_resets_after_four_chunks_and_on_a_new_instruction():
    pipe = _pipeline(None, num_inference_steps=2)
    outputs = _episode(pipe, chunks=6)
    assert [o.context_frames for o in outputs] == [1, 2, 3, 4, 1, 2]
    assert [o.context_reset for o in outputs] == [False] * 4 + [True, False]
    world = ReachingWorld()
    frame, state = world.reset(0)
    out = pipe(frame, "reach the square", state)
    assert out.context_frames == 3 and not out.context_reset
    out = pipe(frame, "reach the ring", state)
    assert out.context_frames == 1 and out.context_reset
    pipe.reset_context()
    assert pipe(frame, "reach the ring", state).context_frames == 1


def test_decoupled_video_noise_ends_the_video_at_sigma_0_8():
    pipe = _pipeline(None, decoupled_video_noise=True)
    out = _episode(pipe, chunks=1)[0]
    video_sigmas, action_sigmas = pipe.video_scheduler.sigmas, pipe.action_scheduler.sigmas
    assert float(video_sigmas[-1]) == pytest.approx(0.8) and float(action_sigmas[-1]) == 0.0
    assert float(video_sigmas[0]) == pytest.approx(1.0, abs=1e-5)
    assert torch.all(video_sigmas[:-1] >= video_sigmas[1:])
    assert out.frames.shape == (1, 2, 32, 32) and np.isfinite(out.frames).all()
    plain = _episode(_pipeline(None), chunks=1)[0]
    assert not np.array_equal(plain.frames, out.frames)


def test_default_schedule_is_deamzeros_sixteen_shifted_timesteps():
    pipe = _pipeline(None)
    pipe._set_schedules(16)
    expected = [999, 986, 972, 955, 937, 916, 893, 865, 833, 795, 750, 695, 625, 537, 418, 252]
    assert pipe.video_scheduler.timesteps.tolist() == expected
    assert pipe.action_scheduler.timesteps.tolist() == expected


def test_bad_inputs_are_clear_errors():
    pipe = _pipeline(None)
    with pytest.raises(ValueError, match="observation must have shape"):
        pipe(np.zeros((16, 16)), 0, np.zeros(2))
    with pytest.raises(ValueError, match="state must have shape"):
        pipe(np.zeros((32, 32)), 0, np.zeros(3))
    with pytest.raises(ValueError, match="unknown instruction"):
        pipe(np.zeros((32, 32)), "fly", np.zeros(2))
    with pytest.raises(ValueError, match="guidance_scale"):
        DreamZeroPipelineConfig(guidance_scale=0.5)
