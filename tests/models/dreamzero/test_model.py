from __future__ import annotations

import pytest
import torch

from stepcache.models.dreamzero.model import CausalWorldActionDiT, DreamZeroMiniConfig, KVCache
from tests.models.dreamzero.tiny import TINY


def _inputs(batch: int, config: DreamZeroMiniConfig = TINY, t_video: float = 500.0, t_action: float = 500.0):
    g = torch.Generator().manual_seed(batch)
    video = torch.randn(batch, config.future_frames, config.frame_size, config.frame_size, generator=g)
    actions = torch.randn(batch, config.action_horizon, config.action_dim, generator=g)
    state = torch.rand(batch, config.state_dim, generator=g)
    return video, actions, state, torch.full((batch,), t_video), torch.full((batch,), t_action)


def _prefilled(model: CausalWorldActionDiT, frames: int, instruction=(0,)) -> KVCache:
    cache = KVCache()
    g = torch.Generator().manual_seed(99)
    for _ in range(frames):
        frame = torch.rand(1, 32, 32, generator=g) * 2 - 1
        model.prefill(frame.repeat(len(instruction), 1, 1), torch.tensor(instruction), cache)
    return cache


def test_shapes_and_cache_growth(tiny_model):
    cache = _prefilled(tiny_model, 3, instruction=(0, TINY.null_instruction))
    assert cache.num_frames == 3 and cache.num_tokens == 3 * TINY.patches_per_frame
    video, actions, state, tv, ta = _inputs(2)
    with torch.no_grad():
        out = tiny_model(video, actions, state, tv, ta, torch.tensor([0, TINY.null_instruction]), cache)
    assert out.video.shape == video.shape and out.action.shape == actions.shape
    assert cache.num_tokens == 3 * TINY.patches_per_frame  # denoising forwards never write the cache


def test_patchify_round_trips(tiny_model):
    frames = torch.randn(3, 2, 32, 32)
    assert torch.equal(tiny_model.unpatchify(tiny_model.patchify(frames), 2), frames)


def test_cfg_batch_equals_the_branches_run_one_by_one(tiny_model):
    """[cond; uncond] prefilled and denoised as one batch equals each branch with its own cache."""
    both_cache = _prefilled(tiny_model, 2, instruction=(1, TINY.null_instruction))
    cond_cache = _prefilled(tiny_model, 2, instruction=(1,))
    uncond_cache = _prefilled(tiny_model, 2, instruction=(TINY.null_instruction,))
    video, actions, state, tv, ta = _inputs(1)
    with torch.no_grad():
        both = tiny_model(video.repeat(2, 1, 1, 1), actions.repeat(2, 1, 1), state.repeat(2, 1), tv.repeat(2),
                          ta.repeat(2), torch.tensor([1, TINY.null_instruction]), both_cache)
        cond = tiny_model(video, actions, state, tv, ta, torch.tensor([1]), cond_cache)
        uncond = tiny_model(video, actions, state, tv, ta, torch.tensor([TINY.null_instruction]), uncond_cache)
    torch.testing.assert_close(both.video[:1], cond.video)
    torch.testing.assert_close(both.video[1:], uncond.video)
    assert not torch.allclose(cond.video, uncond.video)  # the instruction matters


def test_a_one_row_cache_is_shared_by_a_larger_batch(tiny_model):
    cache = _prefilled(tiny_model, 1)
    video, actions, state, tv, ta = _inputs(1)
    with torch.no_grad():
        one = tiny_model(video, actions, state, tv, ta, torch.tensor([0]), cache)
        three = tiny_model(video.repeat(3, 1, 1, 1), actions.repeat(3, 1, 1), state.repeat(3, 1), tv.repeat(3),
                           ta.repeat(3), torch.tensor([0, 0, 0]), cache)
    torch.testing.assert_close(three.action, one.action.repeat(3, 1, 1))


def test_context_is_causal_and_reaches_the_denoised_tokens(tiny_model):
    """Keys of frame 0 do not depend on later frames; the output depends on the context."""
    a = _prefilled(tiny_model, 1)
    b = _prefilled(tiny_model, 2)
    for layer in range(TINY.num_layers):
        torch.testing.assert_close(b.layer(layer)[0][:, :, : TINY.patches_per_frame], a.layer(layer)[0])
    video, actions, state, tv, ta = _inputs(1)
    with torch.no_grad():
        out_a = tiny_model(video, actions, state, tv, ta, torch.tensor([0]), a)
        out_b = tiny_model(video, actions, state, tv, ta, torch.tensor([0]), b)
    assert not torch.allclose(out_a.action, out_b.action)


def test_video_and_action_timesteps_modulate_their_own_tokens(tiny_model):
    cache = _prefilled(tiny_model, 1)
    video, actions, state, tv, _ = _inputs(1)
    with torch.no_grad():
        low = tiny_model(video, actions, state, tv, torch.full((1,), 100.0), torch.tensor([0]), cache)
        high = tiny_model(video, actions, state, tv, torch.full((1,), 900.0), torch.tensor([0]), cache)
    assert not torch.allclose(low.action, high.action)


def test_full_cache_and_bad_shapes_are_errors(tiny_model):
    cache = _prefilled(tiny_model, TINY.max_context_frames)
    with pytest.raises(ValueError, match="KV cache is full"):
        tiny_model.prefill(torch.zeros(1, 32, 32), torch.tensor([0]), cache)
    with pytest.raises(ValueError, match="prefill needs frames"):
        tiny_model.prefill(torch.zeros(1, 16, 16), torch.tensor([0]), KVCache())
    video, actions, state, tv, ta = _inputs(1)
    with pytest.raises(ValueError, match="expected video"):
        tiny_model(video[:, :1], actions, state, tv, ta, torch.tensor([0]), cache)


def test_config_validation_and_dict_round_trip():
    config = DreamZeroMiniConfig(hidden_size=64)
    assert DreamZeroMiniConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown DreamZeroMiniConfig keys"):
        DreamZeroMiniConfig.from_dict({"hidden_sise": 64})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DreamZeroMiniConfig(patch_size=5)
    with pytest.raises(ValueError, match="positive integer"):
        DreamZeroMiniConfig(num_layers=0)


def test_fresh_model_starts_at_zero_velocity():
    """adaLN-zero: heads and modulation start at zero, so an untrained model predicts 0."""
    model = CausalWorldActionDiT(TINY)
    video, actions, state, tv, ta = _inputs(1)
    with torch.no_grad():
        out = model(video, actions, state, tv, ta, torch.tensor([0]), _prefilled(model, 1))
    assert out.video.abs().max() == 0 and out.action.abs().max() == 0
