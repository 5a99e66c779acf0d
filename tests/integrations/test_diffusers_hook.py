"""The StepCache diffusers hook on a toy denoiser driven by hand-written loops: the step/branch rule,
what is reused, and bad input. The real pipelines are in test_diffusers_pipelines.py."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from stepcache import DiffusionCacheConfig, StepCacheConfig
from stepcache.integrations.diffusers import (
    StepCacheStats,
    apply_step_cache,
    get_step_cache_stats,
    remove_step_cache,
    reset_step_cache,
)

NEVER_SKIP = StepCacheConfig(sim_thresholds=(1.0,), skip_countdowns=(1,))
SKIP_WHENEVER_ALLOWED = StepCacheConfig(sim_thresholds=(-0.99,), skip_countdowns=(4,))
SEED_RUNS = [0, 1, 6, 11]  # the seed's schedule over 16 steps when every similarity passes
STEPS = 16


class ToyDenoiser(torch.nn.Module):
    """forward(hidden_states, timestep, encoder_hidden_states) -> (velocity,); counts real forwards."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(4, 4, generator=generator))
        self.calls: list[tuple[float, int]] = []  # (timestep, batch) of every forward that ran

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, return_dict=False):
        t = torch.as_tensor(0.0 if timestep is None else timestep, dtype=hidden_states.dtype).reshape(-1)[:1]
        self.calls.append((float(t), hidden_states.shape[0]))
        velocity = hidden_states @ self.weight + 0.01 * t
        if encoder_hidden_states is not None:
            velocity = velocity + encoder_hidden_states
        return Transformer2DModelOutput(sample=velocity) if return_dict else (velocity,)


class ToyCacheMixinDenoiser(ToyDenoiser, CacheMixin):
    """The same, with diffusers' `cache_context` and end-of-generation reset."""


def _timesteps(scale: float = 1000.0, ascending: bool = False) -> list[float]:
    ts = [scale * (1.0 - i / STEPS) for i in range(STEPS)]
    return ts[::-1] if ascending else ts


def _embeds() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 4, generator=generator), torch.randn(2, 3, 4, generator=generator)


def two_call_loop(model, timesteps, use_context=True, cfg=3.0):
    """Wan / Flux style: cond and uncond calls per step; returns (final x, per-step (cond, uncond))."""
    cond, uncond = _embeds()
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    outputs = []
    for i, t in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else 0.0
        timestep = torch.full((2,), t)
        predictions = []
        for name, embeds in (("cond", cond), ("uncond", uncond)):
            if use_context:
                with model.cache_context(name):
                    predictions.append(model(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds)[0])
            else:
                predictions.append(model(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds)[0])
        outputs.append(tuple(predictions))
        velocity = predictions[1] + cfg * (predictions[0] - predictions[1])
        x = x + (t_next - t) / 1000.0 * velocity
    return x, outputs


def batched_loop(model, timesteps, cfg=3.0):
    """SD3 / CogVideoX style: one call holding [uncond, cond], no cache context."""
    cond, uncond = _embeds()
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    outputs = []
    for i, t in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else 0.0
        prediction = model(torch.cat([x, x]), torch.full((4,), t), torch.cat([uncond, cond]))[0]
        outputs.append(prediction)
        pred_uncond, pred_cond = prediction.chunk(2)
        x = x + (t_next - t) / 1000.0 * (pred_uncond + cfg * (pred_cond - pred_uncond))
    return x, outputs


def test_two_call_steps_share_one_decision_and_each_branch_reuses_its_own_output() -> None:
    model = ToyCacheMixinDenoiser()
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    _, outputs = two_call_loop(model, _timesteps())
    stats = get_step_cache_stats(model)
    assert stats.run_steps == SEED_RUNS
    assert stats.branches == ("cond", "uncond")
    assert stats.forwards == 2 * len(SEED_RUNS)
    assert stats.reused_outputs == 2 * (STEPS - len(SEED_RUNS))
    ran = [_timesteps()[step] for step in SEED_RUNS for _ in ("cond", "uncond")]
    assert [t for t, _ in model.calls] == ran
    for step, (cond, uncond) in enumerate(outputs):
        last_run = max(s for s in SEED_RUNS if s <= step)
        assert torch.equal(cond, outputs[last_run][0])
        assert torch.equal(uncond, outputs[last_run][1])
        assert not torch.equal(cond, uncond)


@pytest.mark.parametrize("loop", ["two_calls_no_context", "batched"])
def test_without_cache_contexts_branches_are_told_apart_by_position(loop: str) -> None:
    model = ToyDenoiser()  # not a CacheMixin: no contexts, no end-of-generation reset
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    if loop == "batched":
        batched_loop(model, _timesteps())
        assert get_step_cache_stats(model).branches == ("call0",)
        assert [batch for _, batch in model.calls] == [4] * len(SEED_RUNS)
    else:
        two_call_loop(model, _timesteps(), use_context=False)
        assert get_step_cache_stats(model).branches == ("call0", "call1")
    assert get_step_cache_stats(model).run_steps == SEED_RUNS


def test_two_call_and_batched_pipelines_decide_identically() -> None:
    """The decision input is every branch's samples stacked, so the split does not matter."""
    config = StepCacheConfig(sim_thresholds=(0.993, 0.99), skip_countdowns=(2, 1))
    traces = []
    for loop in (two_call_loop, batched_loop):
        model = ToyDenoiser()
        apply_step_cache(model, config)
        if loop is two_call_loop:
            loop(model, _timesteps(), use_context=False)
        else:
            loop(model, _timesteps())
        traces.append(get_step_cache_stats(model).trace)
    (two_call, batched) = traces
    assert [r.ran for r in two_call] == [r.ran for r in batched]
    assert 0 < sum(not r.ran for r in two_call) < STEPS - 2  # the thresholds bite, but not everywhere
    for a, b in zip(two_call, batched):
        assert (a.similarity is None) == (b.similarity is None)
        if a.similarity is not None:
            assert a.similarity == pytest.approx(b.similarity, abs=1e-6)


@pytest.mark.parametrize(("scale", "ascending"), [(1000.0, False), (1.0, False), (1.0, True)])
def test_any_timestep_units_and_direction(scale: float, ascending: bool) -> None:
    model = ToyCacheMixinDenoiser()
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    two_call_loop(model, _timesteps(scale, ascending))
    stats = get_step_cache_stats(model)
    assert stats.num_steps == STEPS
    assert stats.run_steps == SEED_RUNS


@pytest.mark.parametrize("model_cls", [ToyDenoiser, ToyCacheMixinDenoiser])
def test_a_timestep_that_goes_back_starts_a_new_generation(model_cls) -> None:
    model = model_cls()
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    first, _ = two_call_loop(model, _timesteps(), use_context=False)
    second, _ = two_call_loop(model, _timesteps(), use_context=False)
    stats = get_step_cache_stats(model)
    assert torch.equal(first, second)
    assert stats.num_steps == STEPS and stats.run_steps == SEED_RUNS
    assert len(model.calls) == 2 * 2 * len(SEED_RUNS)


def test_cachemixin_reset_ends_the_generation_but_keeps_its_stats() -> None:
    model = ToyCacheMixinDenoiser()
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    timesteps = _timesteps()
    two_call_loop(model, timesteps[:8])
    model._reset_stateful_cache()  # what a pipeline does at the end of __call__
    stats = get_step_cache_stats(model)
    assert stats.num_steps == 8 and stats.run_steps == [0, 1, 6]
    # The next call continues the descent, yet it is a new generation: the pipeline said so.
    two_call_loop(model, timesteps[8:])
    assert get_step_cache_stats(model).run_steps == [0, 1, 6]


def test_reset_step_cache_forces_a_new_generation() -> None:
    model = ToyDenoiser()
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    two_call_loop(model, _timesteps()[:1], use_context=False)  # a one-step generation, then another at
    reset_step_cache(model)  # the same timestep: without contexts only a reset tells them apart
    two_call_loop(model, _timesteps()[:1], use_context=False)
    stats = get_step_cache_stats(model)
    assert (stats.num_steps, stats.forwards, stats.branches) == (1, 2, ("call0", "call1"))


def test_a_branch_repeating_at_the_same_timestep_is_the_next_step() -> None:
    """bfloat16 rounds neighbouring timesteps to one value (Flux and QwenImage cast them)."""
    model = ToyCacheMixinDenoiser()
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    timesteps = [float(t) for t in torch.linspace(1.0, 0.97, STEPS).to(torch.bfloat16)]
    assert len(set(timesteps)) < STEPS
    two_call_loop(model, timesteps)
    stats = get_step_cache_stats(model)
    assert stats.num_steps == STEPS and stats.run_steps == SEED_RUNS


def test_never_skip_is_bit_identical_and_removal_restores_the_module() -> None:
    model = ToyCacheMixinDenoiser()
    reference, _ = two_call_loop(model, _timesteps())
    for config in (NEVER_SKIP, StepCacheConfig(enabled=False)):
        apply_step_cache(model, config)
        cached, _ = two_call_loop(model, _timesteps())
        assert torch.equal(cached, reference)
        assert get_step_cache_stats(model).computed_steps == STEPS
        remove_step_cache(model)
        assert "forward" not in model.__dict__
        assert model._diffusers_hook.get_hook("stepcache_step_hook") is None
    assert torch.equal(two_call_loop(model, _timesteps())[0], reference)


def test_never_skip_records_the_similarity_of_every_step_for_calibration() -> None:
    model = ToyCacheMixinDenoiser()
    apply_step_cache(model, NEVER_SKIP)
    two_call_loop(model, _timesteps())
    similarities = get_step_cache_stats(model).similarities
    assert similarities[:2] == [None, None]
    assert all(s is not None and -1.0 <= s <= 1.0 for s in similarities[2:])


def test_return_dict_positional_timestep_and_in_place_edits() -> None:
    model = ToyDenoiser()
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    x = torch.randn(1, 3, 4)
    first = [model(x, torch.tensor([t]), return_dict=True) for t in (1000.0, 900.0)]
    assert isinstance(first[-1], Transformer2DModelOutput)
    expected = first[-1].sample.clone()
    first[-1].sample.mul_(0)  # the caller's edits must not reach the cache
    reused = model(x, torch.tensor([800.0]), return_dict=True)
    assert isinstance(reused, Transformer2DModelOutput)
    assert torch.equal(reused.sample, expected)
    assert len(model.calls) == 2


def test_a_skipped_step_runs_a_branch_whose_input_shape_changed() -> None:
    model = ToyDenoiser()
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    for t in (1000.0, 900.0):
        model(torch.randn(1, 3, 4), torch.tensor([t]))
    model(torch.randn(2, 3, 4), torch.tensor([800.0]))  # skipped step, but no output of this shape yet
    assert len(model.calls) == 3
    assert get_step_cache_stats(model).run_steps == [0, 1]


def test_a_branch_of_another_shape_is_cached_but_does_not_vote() -> None:
    model = ToyDenoiser()
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    small, large = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    outputs = [(model(small, torch.tensor([t]))[0], model(large, torch.tensor([t]))[0]) for t in _timesteps()]
    stats = get_step_cache_stats(model)
    assert stats.run_steps == SEED_RUNS and stats.branches == ("call0", "call1")
    assert len(model.calls) == 2 * len(SEED_RUNS)
    assert torch.equal(outputs[5][1], outputs[1][1]) and outputs[5][1].shape == (1, 5, 4)


def test_a_call_without_timestep_runs_untouched(caplog: pytest.LogCaptureFixture) -> None:
    model = ToyDenoiser()
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    with caplog.at_level(logging.WARNING, logger="stepcache.integrations.diffusers"):
        for _ in range(4):
            model(torch.randn(1, 3, 4), None)
    assert len(model.calls) == 4
    assert get_step_cache_stats(model).num_steps == 0
    assert sum("without a usable `timestep`" in r.message for r in caplog.records) == 1


def test_config_forms() -> None:
    for config in (
        None,
        DiffusionCacheConfig(velocity_sim_thresholds=[-0.99], velocity_skip_countdowns=[4]),
        {"velocity_sim_thresholds": [-0.99], "velocity_skip_countdowns": [4]},
        '{"velocity_sim_thresholds": [-0.99], "velocity_skip_countdowns": [4]}',
    ):
        model = ToyDenoiser()
        apply_step_cache(model, config)
        two_call_loop(model, _timesteps(), use_context=False)
        expected = [0, 1] if config is None else SEED_RUNS  # the default thresholds rarely fire on a toy
        assert get_step_cache_stats(model).run_steps[: len(expected)] == expected


class NoTimestep(torch.nn.Module):
    def forward(self, hidden_states):
        return (hidden_states,)


@pytest.mark.parametrize(
    ("target", "config", "match"),
    [
        (object(), None, "expected a diffusers pipeline with a `transformer`"),
        (NoTimestep(), None, "has no `timestep` argument"),
        (ToyDenoiser(), {"velocity_sim_thresholds": [0.9, 0.95]}, "strictly descending"),
        (ToyDenoiser(), {"sim_thresholds": [0.9]}, "unknown cache config key"),
        (ToyDenoiser(), 0.95, "config must be a StepCacheConfig"),
    ],
)
def test_bad_input_is_refused(target, config, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_step_cache(target, config)


def test_apply_twice_remove_and_stats_without_the_hook_are_refused() -> None:
    model = ToyDenoiser()
    with pytest.raises(ValueError, match="not applied"):
        remove_step_cache(model)
    with pytest.raises(ValueError, match="not applied"):
        get_step_cache_stats(model)
    apply_step_cache(model)
    assert get_step_cache_stats(model) == StepCacheStats(trace=(), branches=(), forwards=0, reused_outputs=0)
    apply_step_cache(model)  # the same config again: nothing changes
    with pytest.raises(ValueError,
                       match=r"already enabled on ToyDenoiser with another config.*disable_step_cache\(\) first"):
        apply_step_cache(model, NEVER_SKIP)


def test_one_vocabulary_old_names_are_the_same_functions() -> None:
    from stepcache.integrations import diffusers as hook

    assert hook.apply_step_cache is hook.enable_step_cache
    assert hook.remove_step_cache is hook.disable_step_cache
    model = ToyDenoiser()
    assert not hook.is_step_cache_enabled(model)
    hook.enable_step_cache(model, {"velocity_sim_thresholds": [0.97], "velocity_skip_countdowns": [2]})
    assert hook.is_step_cache_enabled(model)
    hook.enable_step_cache(model, DiffusionCacheConfig(velocity_sim_thresholds=[0.97], velocity_skip_countdowns=[2]))
    # Another config is refused; the message shows the config in the names users write.
    shown = r'another config \(\{"step_cache_dit_policy": "similarity", "velocity_sim_thresholds": \[0.97\], '
    with pytest.raises(ValueError, match=shown + r'"velocity_skip_countdowns": \[2\]') as refused:
        hook.enable_step_cache(model, NEVER_SKIP)
    assert "sim_thresholds=" not in str(refused.value)
    assert "velocity_sim_thresholds" in repr(model._diffusers_hook.get_hook("stepcache_step_hook"))
    hook.remove_step_cache(model)
    assert not hook.is_step_cache_enabled(model)
    with pytest.raises(ValueError, match="expected a diffusers pipeline"):
        hook.is_step_cache_enabled(object())


def test_cache_mixin_toy_shows_step_cache_in_diffusers_api() -> None:
    model = ToyCacheMixinDenoiser()
    apply_step_cache(model, SKIP_WHENEVER_ALLOWED)
    assert model.is_cache_enabled
    two_call_loop(model, _timesteps())
    model.disable_cache()
    assert not model.is_cache_enabled and "forward" not in model.__dict__
    with pytest.raises(ValueError, match="not applied"):
        get_step_cache_stats(model)
