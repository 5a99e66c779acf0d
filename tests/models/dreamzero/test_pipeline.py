from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from stepcache import StepCacheBackend, StepCacheConfig, StepCacheState, get_stepcache_state
from stepcache.integrations.schedulers import SkipAwareStepper
from stepcache.models.dreamzero.model import DiTOutput, KVCache
from stepcache.models.dreamzero.pipeline import ContextBusyError, DreamZeroPipeline, DreamZeroPipelineConfig
from stepcache.models.dreamzero.world import ReachingWorld, instruction_index
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


def _episode(pipe: DreamZeroPipeline, chunks: int = 3, seed: int = 0, instruction=None, callback=None):
    """Closed loop on the world; the same noise seed per chunk index in every call."""
    world = ReachingWorld()
    frame, state = world.reset(seed)
    outputs = []
    for chunk in range(chunks):
        out = pipe(frame, instruction if instruction is not None else world.instruction, state,
                   generator=torch.Generator().manual_seed(100 + chunk), callback=callback)
        outputs.append(out)
        frame, state = world.execute(out.actions[0])
    return outputs


class _Spy:
    """Counts prefill and denoising forwards, records every DiT output and the velocities every step
    gives the schedulers (through the pipeline's per-step callback)."""

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

    def __call__(self, step: dict) -> None:
        self.video_inputs.append(step["video_velocity"].clone())
        self.action_inputs.append(step["action_velocity"].clone())


def _reference_chunk(pipe: DreamZeroPipeline, cache: KVCache, frame, instruction, state, generator,
                     cache_state: StepCacheState | None):
    """The denoising loop as it was before sessions and scheduler replay (one episode, two diffusers
    schedulers stepped every step): what ``replay_schedulers=False`` must reproduce bit for bit."""
    cfg, model_cfg = pipe.config, pipe.transformer.config
    steps = cfg.num_inference_steps
    frames = torch.as_tensor(np.asarray(frame)).float()[None]
    states = torch.as_tensor(np.asarray(state)).float()[None]
    branches = 2 if cfg.guidance_scale != 1.0 else 1
    index = instruction_index(instruction)
    instructions = torch.tensor([index] + [model_cfg.null_instruction] * (branches - 1))
    model_state = (states * 2.0 - 1.0).repeat(branches, 1)
    with torch.no_grad():
        pipe.transformer.prefill((frames * 2.0 - 1.0).repeat(branches, 1, 1), instructions, cache)
        video_scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=cfg.flow_shift)
        action_scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                   flow_shift=cfg.flow_shift)
        video_scheduler.set_timesteps(steps)
        action_scheduler.set_timesteps(steps)
        video = torch.randn((1, model_cfg.future_frames, 32, 32), generator=generator)
        actions = torch.randn((1, model_cfg.action_horizon, model_cfg.action_dim), generator=generator)
        if cache_state is not None:
            cache_state.reset(steps, timesteps=video_scheduler.sigmas.tolist())
        solver_aware = cache_state is not None and cache_state.config.solver_aware
        video_stepper = SkipAwareStepper(video_scheduler) if solver_aware else None
        action_stepper = SkipAwareStepper(action_scheduler) if solver_aware else None
        history, ran = [], []
        for i in range(steps):
            t_video, t_action = video_scheduler.timesteps[i], action_scheduler.timesteps[i]
            run = cache_state.should_run_step(history) if cache_state is not None else True
            if run:
                out = pipe.transformer(video.repeat(branches, 1, 1, 1), actions.repeat(branches, 1, 1), model_state,
                                       t_video.float().expand(branches), t_action.float().expand(branches),
                                       instructions, cache)
                raw_video, raw_action = out.video.clone(), out.action.clone()
                if branches == 2:
                    video_velocity = raw_video[1:] + cfg.guidance_scale * (raw_video[:1] - raw_video[1:])
                else:
                    video_velocity = raw_video
                action_velocity = raw_action[:1]
                if cache_state is not None:
                    cache_state.push_computed(history, (video_velocity, action_velocity))
            else:
                video_velocity, action_velocity = cache_state.reused_prediction(history)
            ran.append(run)
            if solver_aware:
                video = video_stepper.step(video_velocity, t_video, video, computed=run).prev_sample
                actions = action_stepper.step(action_velocity, t_action, actions, computed=run).prev_sample
            else:
                video = video_scheduler.step(video_velocity, t_video, video).prev_sample
                actions = action_scheduler.step(action_velocity, t_action, actions).prev_sample
    return (actions * model_cfg.action_scale).numpy(), ((video + 1) / 2).clamp(0, 1).numpy(), ran


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
    outputs = _episode(pipe, chunks=3, callback=spy)
    runs = [sum(r.ran for r in out.trace) for out in outputs]
    assert len(spy.forwards) == sum(runs) == sum(out.dit_forwards for out in outputs)
    assert all(out.ran == [r.ran for r in out.trace] for out in outputs)
    assert runs == [4, 4, 4]  # steps 0, 1, 6, 11 of 16
    assert outputs[0].ran == [True, True, False, False, False, False, True] + [False] * 4 + [True] + [False] * 4
    assert spy.prefills == 3 and all(out.prefill_forwards == 1 for out in outputs)
    # the schedulers step on every step, computed or not
    assert len(spy.video_inputs) == len(spy.action_inputs) == 3 * 16
    assert [out.chunk_index for out in outputs] == [0, 1, 2]
    assert all(out.forward_batch_sizes == [1] * out.dit_forwards for out in outputs)  # alone in every forward


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
    out = _episode(pipe, chunks=1, callback=spy)[0]
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
    _episode(pipe, chunks=1, callback=spy)
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
    schedule = pipe.schedule(16)
    video_sigmas, action_sigmas = schedule.video_sigmas, schedule.action_sigmas
    assert float(video_sigmas[-1]) == pytest.approx(0.8) and float(action_sigmas[-1]) == 0.0
    assert float(video_sigmas[0]) == pytest.approx(1.0, abs=1e-5)
    assert torch.all(video_sigmas[:-1] >= video_sigmas[1:])
    assert out.frames.shape == (1, 2, 32, 32) and np.isfinite(out.frames).all()
    plain = _episode(_pipeline(None), chunks=1)[0]
    assert not np.array_equal(plain.frames, out.frames)


def test_default_schedule_is_deamzeros_sixteen_shifted_timesteps():
    pipe = _pipeline(None)
    expected = [999, 986, 972, 955, 937, 916, 893, 865, 833, 795, 750, 695, 625, 537, 418, 252]
    schedule = pipe.schedule(16)
    assert schedule.video_timesteps.tolist() == expected
    assert schedule.action_timesteps.tolist() == expected
    pipe._set_schedules(16)
    assert pipe.video_scheduler.timesteps.tolist() == expected


def test_bad_inputs_are_clear_errors():
    pipe = _pipeline(None)
    with pytest.raises(ValueError, match="observation must have shape"):
        pipe(np.zeros((16, 16)), 0, np.zeros(2))
    with pytest.raises(ValueError, match="state must have shape"):
        pipe(np.zeros((32, 32)), 0, np.zeros(3))
    with pytest.raises(ValueError, match="unknown instruction"):
        pipe(np.zeros((32, 32)), "fly", np.zeros(2))
    with pytest.raises(ValueError, match="B >= 1"):
        pipe(np.zeros((0, 32, 32)), 0, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="observation must be finite"):
        pipe(np.full((32, 32), np.nan), 0, np.zeros(2))
    with pytest.raises(ValueError, match="guidance_scale"):
        DreamZeroPipelineConfig(guidance_scale=0.5)
    with pytest.raises(ValueError, match=r"unknown DreamZeroPipelineConfig fields \['steps'\]"):
        DreamZeroPipelineConfig.from_dict({"steps": 8})
    assert not pipe.context.busy  # a refused chunk leaves the episode free


# -- the loop before sessions, and the scheduler replay --------------------------------------------


@pytest.mark.parametrize("cache_config", [None, {}, SKIP_WHENEVER_ALLOWED,
                                          {"step_cache_dit_solver_aware": True, **SKIP_WHENEVER_ALLOWED}])
def test_direct_stepping_is_bit_identical_to_the_loop_before_sessions(cache_config):
    pipe = _pipeline(cache_config, replay_schedulers=False)
    outputs = _episode(pipe, chunks=3)
    reference_pipe = _pipeline(cache_config)
    state = get_stepcache_state(reference_pipe)
    cache = KVCache()
    world = ReachingWorld()
    frame, world_state = world.reset(0)
    for chunk, out in enumerate(outputs):
        actions, frames, ran = _reference_chunk(reference_pipe, cache, frame, world.instruction, world_state,
                                                torch.Generator().manual_seed(100 + chunk), state)
        assert np.array_equal(out.actions, actions) and np.array_equal(out.frames, frames)
        assert out.ran == ran
        frame, world_state = world.execute(out.actions[0])


@pytest.mark.parametrize("cache_config", [
    None,
    SKIP_WHENEVER_ALLOWED,
    {"step_cache_dit_solver_aware": True},
    {"step_cache_dit_solver_aware": True, **SKIP_WHENEVER_ALLOWED},
    {"velocity_reuse": "extrapolate", **SKIP_WHENEVER_ALLOWED},
    {"step_cache_dit_static_steps": [0, 1, 2, 6, 10, 13, 14, 15]},
])
@pytest.mark.parametrize("decoupled", [False, True])
def test_scheduler_replay_matches_stepping_the_schedulers(cache_config, decoupled):
    replayed = _episode(_pipeline(cache_config, decoupled_video_noise=decoupled), chunks=2)
    direct = _episode(_pipeline(cache_config, decoupled_video_noise=decoupled, replay_schedulers=False), chunks=2)
    for a, b in zip(replayed, direct):
        assert a.ran == b.ran
        np.testing.assert_allclose(a.actions, b.actions, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.frames, b.frames, atol=1e-5, rtol=0)


def test_extrapolation_and_solver_aware_change_the_outputs_but_not_the_decisions():
    base = _episode(_pipeline(SKIP_WHENEVER_ALLOWED), chunks=1)[0]
    for option in ({"velocity_reuse": "extrapolate"}, {"step_cache_dit_solver_aware": True}):
        out = _episode(_pipeline({**SKIP_WHENEVER_ALLOWED, **option}), chunks=1)[0]
        assert out.ran == base.ran
        assert not np.array_equal(out.actions, base.actions)


# -- failures roll the episode back ----------------------------------------------------------------


def _fail_at(pipe: DreamZeroPipeline, call: int, what: str = "forward"):
    """Make the ``call``-th DiT forward (or prefill) raise once."""
    model = pipe.transformer
    original = getattr(model, what)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    setattr(model, what, failing)


@pytest.mark.parametrize(("what", "call"), [("forward", 6), ("prefill", 2)])
def test_a_failed_chunk_rolls_back_so_retry_and_later_chunks_equal_a_clean_run(what, call):
    clean = _pipeline(SKIP_WHENEVER_ALLOWED)
    reference = _episode(clean, chunks=3)
    pipe = _pipeline(SKIP_WHENEVER_ALLOWED)
    _fail_at(pipe, call, what)  # forward 6: step 1 of chunk 1 (a chunk takes 4 forwards); prefill 2: chunk 1
    world = ReachingWorld()
    frame, state = world.reset(0)
    generator = torch.Generator().manual_seed(7)
    clean.reset_context()
    clean_generator = torch.Generator().manual_seed(7)
    outputs, failures = [], 0
    for _chunk in range(3):
        try:
            out = pipe(frame, world.instruction, state, generator=generator)
        except RuntimeError as error:
            assert "injected" in str(error)
            failures += 1
            assert not pipe.context.busy and pipe.context.chunk_index == len(outputs)
            out = pipe(frame, world.instruction, state, generator=generator)  # the retry
        expected = clean(frame, world.instruction, state, generator=clean_generator)
        assert np.array_equal(out.actions, expected.actions) and out.ran == expected.ran
        assert out.context_frames == expected.context_frames and out.trace == expected.trace
        outputs.append(out)
        frame, state = world.execute(out.actions[0])
    assert failures == 1 and len(reference) == 3


def test_a_second_chunk_on_a_busy_episode_is_refused():
    pipe = _pipeline(None, num_inference_steps=2)
    world = ReachingWorld()
    frame, state = world.reset(0)
    job = pipe.begin_chunk(pipe.context, frame, world.instruction, state)
    with pytest.raises(ContextBusyError, match="one chunk at a time"):
        pipe(frame, world.instruction, state)
    with pytest.raises(ContextBusyError):
        pipe.reset_context()
    out = pipe.run_chunk(job)
    assert out.dit_forwards == 2 and not pipe.context.busy


def test_a_fixed_schedule_past_the_end_is_refused_before_any_work():
    with pytest.raises(ValueError, match="50"):  # the backend's refresh knows the step count
        _pipeline({"step_cache_dit_static_steps": [0, 50]})
    pipe = _pipeline(None)
    StepCacheBackend({"step_cache_dit_static_steps": [0, 50]}).enable(pipe)  # enabled, never refreshed
    world = ReachingWorld()
    frame, state = world.reset(0)
    with pytest.raises(ValueError, match="50"):
        pipe(frame, world.instruction, state)
    assert not pipe.context.busy and pipe.context.kv_cache.num_frames == 0


def test_the_cache_state_is_used_as_given_and_never_skip_stays_exact():
    state = StepCacheState(StepCacheConfig(sim_thresholds=(1.0,), skip_countdowns=(1,)))
    pipe = _pipeline(None)
    world = ReachingWorld()
    frame, world_state = world.reset(0)
    job = pipe.begin_chunk(pipe.context, frame, world.instruction, world_state, cache_state=state,
                           generator=torch.Generator().manual_seed(1))
    out = pipe.run_chunk(job)
    pipe.reset_context()
    plain = pipe(frame, world.instruction, world_state, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(out.actions, plain.actions) and len(state.trace) == 16
