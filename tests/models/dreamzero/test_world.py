from __future__ import annotations

import numpy as np
import pytest

from stepcache.models.dreamzero.world import (
    AGENT_LEVEL,
    INSTRUCTIONS,
    TARGET_KINDS,
    ReachingWorld,
    WorldConfig,
    clip_actions,
    generate_expert_episodes,
    goal_sprite_mask,
    instruction_index,
    render_frames,
    sample_layouts,
)


def test_instruction_index_accepts_text_kind_and_index_and_rejects_the_rest():
    assert instruction_index("reach the ring") == 2
    assert instruction_index("  Reach   the SQUARE ") == 0
    assert instruction_index("plus") == 1
    assert instruction_index(1) == 1
    for bad in ("reach the moon", 3, -1, True, None, 1.0):
        with pytest.raises(ValueError, match="unknown instruction"):
            instruction_index(bad)


def test_frames_show_every_target_at_its_own_grey_level_and_the_agent_on_top():
    config = WorldConfig()
    targets, agent, _ = sample_layouts(8, np.random.default_rng(0), config)
    frames = render_frames(agent, targets, config.frame_size)
    assert frames.shape == (8, 32, 32) and frames.dtype == np.float32
    for frame in frames:
        levels = {round(float(v), 3) for v in np.unique(frame)}
        assert {0.45, 0.65, 0.85} <= levels  # one level per kind (the agent may cover a few pixels)
        assert (frame == AGENT_LEVEL).sum() == 4  # the 2x2 agent


def test_layouts_vary_per_episode_and_keep_targets_apart():
    config = WorldConfig()
    targets, agent, goal = sample_layouts(256, np.random.default_rng(1), config)
    gaps = np.linalg.norm(targets[:, :, None] - targets[:, None, :], axis=-1)
    gaps[:, np.arange(3), np.arange(3)] = np.inf
    assert gaps.min() >= config.min_target_separation
    assert np.linalg.norm(agent[:, None] - targets, axis=-1).min() >= config.min_start_distance
    assert len({tuple(t.ravel().round(3)) for t in targets}) == 256  # no layout repeats
    assert set(goal) == {0, 1, 2}


def test_expert_reaches_the_instructed_target_within_the_episode():
    config = WorldConfig()
    episodes = generate_expert_episodes(64, np.random.default_rng(2), config)
    goal_position = episodes.targets[np.arange(64), episodes.goal]
    at_chunk_ends = episodes.positions[:, config.action_horizon :: config.action_horizon]
    reached = np.linalg.norm(at_chunk_ends - goal_position[:, None], axis=-1) <= config.success_radius
    assert reached.any(axis=1).all()
    assert np.linalg.norm(episodes.actions, axis=-1).max() <= config.max_step + 1e-9
    frames_per_episode = config.episode_steps // config.steps_per_frame + 1
    assert episodes.frames.shape == (64, frames_per_episode, 32, 32)
    # the expert's speed varies per episode, so trajectories are not one memorisable template
    first_moves = np.linalg.norm(episodes.actions[:, 0], axis=-1)
    assert first_moves.std() > 0.005


def test_closed_loop_world_executes_chunks_and_reports_success():
    world = ReachingWorld()
    frame, state = world.reset(seed=3)
    assert frame.shape == (32, 32) and state.shape == (2,)
    assert world.instruction in INSTRUCTIONS and not world.done
    for _ in range(world.config.max_chunks):
        delta = world.goal_position - world.agent
        steps = np.repeat(delta[None] / world.config.action_horizon, world.config.action_horizon, axis=0)
        frame, state = world.execute(clip_actions(steps, world.config.max_step))
        if world.done:
            break
    assert world.success and world.done
    assert len(world.trajectory) == 1 + world.chunks_done * world.config.action_horizon
    with pytest.raises(ValueError, match="shape"):
        world.execute(np.zeros((8, 3)))
    with pytest.raises(ValueError, match="finite"):
        world.execute(np.full((8, 2), np.nan))


def test_same_seed_same_episode_and_kinds_are_named():
    a, b = ReachingWorld(), ReachingWorld()
    fa, _ = a.reset(seed=7)
    fb, _ = b.reset(seed=7)
    assert np.array_equal(fa, fb) and a.goal == b.goal
    assert INSTRUCTIONS == tuple(f"reach the {k}" for k in TARGET_KINDS)


def test_world_config_validation():
    with pytest.raises(ValueError, match="multiple of frames_per_chunk"):
        WorldConfig(action_horizon=7, frames_per_chunk=2)
    with pytest.raises(ValueError, match="expert_speed"):
        WorldConfig(expert_speed=(0.05, 0.1))


def test_goal_sprite_mask_covers_exactly_the_instructed_targets_pixels():
    config = WorldConfig()
    targets, _, goal = sample_layouts(16, np.random.default_rng(4), config)
    far_agent = np.zeros((16, 2))  # drawn in the corner, away from every target
    frames = render_frames(far_agent, targets, config.frame_size)
    mask = goal_sprite_mask(targets, goal, config.frame_size)
    levels = np.array([0.45, 0.65, 0.85])[goal]
    for frame, m, level in zip(frames, mask, levels):
        assert np.allclose(frame[m], level)
        assert not np.isclose(frame[~m], level).any()


def test_the_start_position_does_not_give_the_goal_away():
    targets, agent, goal = sample_layouts(4096, np.random.default_rng(9), WorldConfig())
    distance = np.linalg.norm(targets - agent[:, None], axis=-1)
    assert abs((distance.argmin(axis=1) == goal).mean() - 1 / 3) < 0.05
