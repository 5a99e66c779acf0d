"""The detour world's rules: contact blocks a move (or ends the episode, when so configured), success
needs the target, the expert succeeds, layouts are reproducible and really block the straight path."""

from __future__ import annotations

import numpy as np
import pytest

from stepcache.models.dreamzero.world import INSTRUCTIONS
from stepcache.models.dreamzero_detour.world import (
    DetourConfig,
    DetourWorld,
    expert_action,
    generate_expert_episodes,
    sample_detour_layouts,
    segment_hits_disc,
)

CONFIG = DetourConfig()


def _placed(agent, obstacle=(0.5, 0.5), goal_position=(0.9, 0.9)) -> DetourWorld:
    world = DetourWorld()
    world.reset(seed=0)
    world.agent = np.asarray(agent, float)
    world.obstacle = np.asarray(obstacle, float)
    world.targets[world.goal] = goal_position
    return world


def test_a_move_through_the_obstacles_edge_is_contact_even_when_both_ends_are_outside():
    # A 0.06 move along a chord 0.076 from the centre of a 0.08 disc: both ends 0.0817 away.
    start, end, centre = np.array([[0.38, 0.424]]), np.array([[0.44, 0.424]]), np.array([[0.41, 0.5]])
    for point in (start, end):
        assert np.linalg.norm(point - centre) > 0.08
    assert segment_hits_disc(start, end, centre, 0.08)[0]
    away = np.array([[0.0, 0.2]])
    assert not segment_hits_disc(start, end, centre + away, 0.08)[0]


def test_contact_blocks_the_move_and_costs_time():
    world = _placed(agent=(0.3, 0.5))
    world.execute(np.tile([0.05, 0.0], (CONFIG.action_horizon, 1)))  # straight at the obstacle
    assert world.contacts > 0 and not world.crashed and not world.done
    # Never inside: every blocked move left the agent where it was, outside the disc.
    assert (np.linalg.norm(np.asarray(world.trajectory) - world.obstacle, axis=-1) >= CONFIG.obstacle_radius).all()
    assert world.chunks_done == 1


def test_contact_ends_the_episode_as_a_failure_when_configured_so():
    world = DetourWorld(DetourConfig(contact_ends_episode=True))
    world.reset(seed=0)
    world.agent, world.obstacle = np.array([0.3, 0.5]), np.array([0.5, 0.5])
    world.execute(np.tile([0.05, 0.0], (CONFIG.action_horizon, 1)))
    assert world.crashed and world.done and not world.success
    assert len(world.trajectory) < CONFIG.action_horizon + 1  # no moves after the contact
    world.agent = world.goal_position.copy()  # even standing on the target afterwards does not count
    assert not world.success


def test_success_is_the_target_within_the_radius_without_contact():
    world = _placed(agent=(0.9, 0.9 - CONFIG.success_radius / 2))
    world.execute(np.zeros((CONFIG.action_horizon, 2)))
    assert world.success and world.done and not world.crashed
    far = _placed(agent=(0.9, 0.9 - 2 * CONFIG.success_radius))
    far.execute(np.zeros((CONFIG.action_horizon, 2)))
    assert not far.success and not far.done


def test_layouts_block_the_straight_path_and_leave_both_ways_open():
    targets, agent, goal, obstacle = sample_detour_layouts(400, np.random.default_rng(0), CONFIG)
    goal_position = targets[np.arange(400), goal]
    assert segment_hits_disc(agent, goal_position, obstacle, CONFIG.obstacle_radius).all()
    clear = CONFIG.obstacle_radius + CONFIG.obstacle_clearance
    assert (np.linalg.norm(obstacle[:, None] - targets, axis=-1) >= clear - 1e-9).all()
    assert (np.linalg.norm(obstacle - agent, axis=-1) >= clear - 1e-9).all()
    assert (np.linalg.norm(goal_position - agent, axis=-1) >= CONFIG.min_goal_distance).all()


def test_reset_is_reproducible_from_its_seed():
    first, again, other = DetourWorld(), DetourWorld(), DetourWorld()
    frame, state = first.reset(seed=7)
    frame2, state2 = again.reset(seed=7)
    other.reset(seed=8)
    assert np.array_equal(frame, frame2) and np.array_equal(state, state2)
    assert np.array_equal(first.obstacle, again.obstacle) and first.instruction == again.instruction
    assert not np.array_equal(first.obstacle, other.obstacle)
    assert first.instruction in INSTRUCTIONS
    assert np.isclose(frame, CONFIG.obstacle_level).sum() >= 5  # the obstacle is in the frame


@pytest.mark.parametrize("side", [-1.0, 1.0])
def test_the_scripted_expert_succeeds_on_at_least_98_percent_of_seeds_either_way_round(side):
    rng = np.random.default_rng(1)
    outcomes = []
    for seed in range(200):
        world = DetourWorld()
        world.reset(seed)
        speed = np.array([rng.uniform(*CONFIG.expert_speed)])
        while not world.done:
            chunk = []
            position = world.agent.copy()
            for _ in range(CONFIG.action_horizon):  # the expert plans its chunk ahead, as in its data
                action = expert_action(position[None], world.goal_position[None], world.obstacle[None],
                                       np.array([side]), speed, rng, CONFIG)[0]
                chunk.append(action)
                position = np.clip(position + action, 0.0, 1.0)
            world.execute(np.asarray(chunk))
        outcomes.append(world.success)
    assert np.mean(outcomes) >= 0.98


def test_demonstrations_go_round_on_both_sides_and_never_touch():
    episodes = generate_expert_episodes(256, np.random.default_rng(2), CONFIG)
    start, positions = episodes.positions[:, 0], episodes.positions
    goal_position = episodes.targets[np.arange(256), episodes.goal]
    line = goal_position - start
    moved = positions[:, CONFIG.action_horizon] - start
    lateral = line[:, 0] * moved[:, 1] - line[:, 1] * moved[:, 0]  # its sign: which side after one chunk
    assert 0.35 < np.mean(lateral > 0) < 0.65  # a fair coin: the first moves are bimodal
    hits = np.zeros(256, dtype=bool)
    for i in range(positions.shape[1] - 1):
        hits |= segment_hits_disc(positions[:, i], positions[:, i + 1], episodes.obstacle, CONFIG.obstacle_radius)
    assert not hits.any()
    assert episodes.frames.shape == (256, CONFIG.episode_steps // CONFIG.steps_per_frame + 1, 32, 32)
