"""The detour world: the reaching task with an obstacle across the straight path, which blocks any
move that touches it.

Everything the reaching world has stays (three targets, an instruction naming one, 32x32 grey frames,
the agent's own position as the state, 2-D moves of at most ``max_step``). What is new is one round
obstacle (a disc, grey level ``obstacle_level``) placed across the straight line from the agent's
start to the instructed target. A move that would touch it does not happen: the agent stays where it
was, and the episode's time runs on (``contact_ends_episode=True`` ends the episode as a failure
instead). The scripted expert goes
around it, on a side drawn at random per episode (half left, half right), through a waypoint beside
the obstacle, then heads for the target and stops on it.

Why this task, for judging a cache: it makes success depend on the quality of the sampled actions,
and in the direction that matters for a step-skipping cache. The demonstrated first moves are
bimodal (left or right of the obstacle), and their mean points at the obstacle. A sampler that
commits to one mode goes around. One that blurs the two modes towards their mean (too few
denoising steps, or reused velocities that are too far off) drives at the obstacle and gets stuck
against it.
A precise-placement task would not show this. On the reaching world, 4 steps instead of 16 stop
*closer* to the target, because a blurrier sampler is closer to the mean, which is what placement
rewards. See docs/dreamzero.md for the measurements behind this choice.

Success: after some chunk, the agent is within ``success_radius`` of the instructed target, at most
``max_chunks`` chunks in. Contact is tested along every move (the segment, not only its end point), so
a long step cannot jump through the obstacle's edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stepcache.models.dreamzero.world import (
    ExpertEpisodes,
    ReachingWorld,
    WorldConfig,
    apply_action,
    clip_actions,
    draw_targets_and_agent,
    sample_layouts,
)

TASK = "detour"


@dataclass(frozen=True)
class DetourConfig(WorldConfig):
    """The detour task's constants. Defaults are the ones the bundled ``dreamzero-detour`` was trained on."""

    max_chunks: int = 8  # the expert arrives within 2-4 chunks; the rest is time to recover from contact
    success_radius: float = 0.04
    min_goal_distance: float = 0.45  # agent start to the instructed target: room for an obstacle between
    obstacle_radius: float = 0.05
    obstacle_level: float = 0.25  # grey level, below every target's, above the background's 0
    obstacle_position: tuple[float, float] = (0.4, 0.6)  # share of the start-to-goal line where it sits
    obstacle_jitter: float = 0.02  # sideways offset from that line, drawn from [-jitter, jitter]
    obstacle_clearance: float = 0.06  # the obstacle's edge to the targets, the start and the waypoints' path
    waypoint_clearance: float = 0.09  # how far beyond the obstacle's edge the expert passes
    expert_speed: tuple[float, float] = (0.035, 0.06)
    expert_bend: float = 0.0  # the detour itself varies the path; no extra bend
    # On contact the move is blocked (the agent stays where it was) and the episode goes on: contact costs
    # time, not the episode. True ends the episode as a failure instead.
    contact_ends_episode: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.obstacle_radius < 0.25:
            raise ValueError(f"DetourConfig.obstacle_radius must be in (0, 0.25), got {self.obstacle_radius}")
        lo, hi = self.obstacle_position
        if not 0 < lo <= hi < 1:
            raise ValueError(f"DetourConfig.obstacle_position must satisfy 0 < lo <= hi < 1, got {(lo, hi)}")

    @property
    def task(self) -> str:
        return TASK

    def make_world(self) -> DetourWorld:
        return DetourWorld(self)

    def expert_episodes(self, batch: int, rng: np.random.Generator) -> ExpertEpisodes:
        return generate_expert_episodes(batch, rng, self)


def render_frames(agent: np.ndarray, targets: np.ndarray, obstacle: np.ndarray, config: DetourConfig) -> np.ndarray:
    """``(B, S, S)`` grey frames: the obstacle disc (every pixel whose centre lies inside it), then the
    targets and the agent over it, as in the reaching world."""
    size = config.frame_size
    centres = (np.arange(size) + 0.5) / size
    obstacle = np.asarray(obstacle, dtype=np.float64)
    dx = centres[None, None, :] - obstacle[:, 0, None, None]
    dy = centres[None, :, None] - obstacle[:, 1, None, None]
    frames = np.where(dx**2 + dy**2 <= config.obstacle_radius**2, config.obstacle_level, 0.0).astype(np.float32)
    return draw_targets_and_agent(frames, agent, targets, size)


def segment_hits_disc(start: np.ndarray, end: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """``(B,)`` whether the segment from ``start`` to ``end`` (``(B, 2)`` each) comes within ``radius``
    of ``centre``."""
    move = end - start
    length2 = np.maximum(np.sum(move * move, axis=-1), 1e-18)
    t = np.clip(np.sum((centre - start) * move, axis=-1) / length2, 0.0, 1.0)
    closest = start + t[:, None] * move
    return np.linalg.norm(closest - centre, axis=-1) < radius


def _unit_normal(direction: np.ndarray) -> np.ndarray:
    return np.stack([-direction[:, 1], direction[:, 0]], axis=-1)


def sample_detour_layouts(
    batch: int, rng: np.random.Generator, config: DetourConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random layouts: targets ``(B, K, 2)``, agent starts ``(B, 2)``, goals ``(B,)``, obstacle centres
    ``(B, 2)``.

    A layout is kept only if the obstacle is clear of every target and of the start, and both detour
    waypoints (left and right) lie inside the arena: then either way around is open, and the
    demonstrated choice is a fair coin.
    """
    targets = np.empty((batch, 3, 2))
    agent = np.empty((batch, 2))
    goal = np.empty(batch, dtype=np.int64)
    obstacle = np.empty((batch, 2))
    todo = np.arange(batch)
    keep_clear = config.obstacle_radius + config.obstacle_clearance
    detour = config.obstacle_radius + config.waypoint_clearance
    while todo.size:
        t, a, g = sample_layouts(todo.size, rng, config)
        goal_position = t[np.arange(todo.size), g]
        line = goal_position - a
        distance = np.linalg.norm(line, axis=-1)
        direction = line / np.maximum(distance, 1e-9)[:, None]
        normal = _unit_normal(direction)
        share = rng.uniform(*config.obstacle_position, size=todo.size)
        sideways = rng.uniform(-config.obstacle_jitter, config.obstacle_jitter, size=todo.size)
        o = a + share[:, None] * line + sideways[:, None] * normal
        ok = distance >= config.min_goal_distance
        ok &= np.linalg.norm(o - a, axis=-1) >= keep_clear
        ok &= (np.linalg.norm(o[:, None] - t, axis=-1) >= keep_clear).all(axis=1)
        for side in (-1.0, 1.0):
            waypoint = o + side * detour * normal
            ok &= ((waypoint >= 0.06) & (waypoint <= 0.94)).all(axis=1)
        done = todo[ok]
        targets[done], agent[done], goal[done], obstacle[done] = t[ok], a[ok], g[ok], o[ok]
        todo = todo[~ok]
    return targets, agent, goal, obstacle


def expert_action(
    agent: np.ndarray,
    goal_position: np.ndarray,
    obstacle: np.ndarray,
    side: np.ndarray,
    speed: np.ndarray,
    rng: np.random.Generator,
    config: DetourConfig,
) -> np.ndarray:
    """The expert's next actions ``(B, 2)``: towards the waypoint on its side of the obstacle while the
    obstacle is still ahead (measured along the obstacle-to-goal line), then towards the goal;
    ``min(speed, distance)`` long, plus noise. It depends on the position only (and the episode's side
    and speed), so a policy can read its phase from the state."""
    to_goal = goal_position - obstacle
    direction = to_goal / np.maximum(np.linalg.norm(to_goal, axis=-1), 1e-9)[:, None]
    offset = side * (config.obstacle_radius + config.waypoint_clearance)
    waypoint = obstacle + offset[:, None] * _unit_normal(direction)
    ahead = np.sum((agent - obstacle) * direction, axis=-1) < 0.0
    aim = np.where(ahead[:, None], waypoint, goal_position)
    delta = aim - agent
    distance = np.linalg.norm(delta, axis=-1)
    # Keep the expert's pace through the waypoint: it is a point to pass, not to stop at.
    goal_distance = np.linalg.norm(goal_position - agent, axis=-1)
    step = np.minimum(speed, np.where(ahead, np.inf, goal_distance))
    move = delta / np.maximum(distance, 1e-9)[:, None] * step[:, None]
    noise = rng.normal(0.0, config.expert_noise, size=agent.shape)
    return clip_actions(move + noise, config.max_step)


def generate_expert_episodes(batch: int, rng: np.random.Generator, config: DetourConfig) -> ExpertEpisodes:
    """Roll the scripted expert out for ``batch`` fresh random detour episodes (the training data)."""
    targets, agent, goal, obstacle = sample_detour_layouts(batch, rng, config)
    goal_position = targets[np.arange(batch), goal]
    side = rng.choice([-1.0, 1.0], size=batch)
    speed = rng.uniform(*config.expert_speed, size=batch)
    steps = config.episode_steps
    positions = np.empty((batch, steps + 1, 2))
    actions = np.empty((batch, steps, 2))
    positions[:, 0] = agent
    for i in range(steps):
        actions[:, i] = expert_action(positions[:, i], goal_position, obstacle, side, speed, rng, config)
        positions[:, i + 1] = apply_action(positions[:, i], actions[:, i], config)
    frame_steps = range(0, steps + 1, config.steps_per_frame)
    frames = np.stack([render_frames(positions[:, i], targets, obstacle, config) for i in frame_steps], axis=1)
    return ExpertEpisodes(frames=frames, positions=positions, actions=actions, targets=targets, goal=goal,
                          obstacle=obstacle)


class DetourWorld(ReachingWorld):
    """One closed-loop detour episode: the reaching world's interface, plus an obstacle that ends the
    episode on contact (:attr:`crashed`).

    Example:
        >>> world = DetourWorld()
        >>> frame, state = world.reset(seed=0)
        >>> frame.shape, state.shape, world.crashed
        ((32, 32), (2,), False)
    """

    config: DetourConfig

    def __init__(self, config: DetourConfig | None = None) -> None:
        super().__init__(config or DetourConfig())
        self.obstacle = np.zeros(2)
        self.crashed = False
        self.contacts = 0

    @property
    def success(self) -> bool:
        return not self.crashed and self.distance_to_goal <= self.config.success_radius

    @property
    def done(self) -> bool:
        return self.crashed or super().done

    @property
    def done_moving(self) -> bool:
        return self.crashed

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        targets, agent, goal, obstacle = sample_detour_layouts(1, rng, self.config)
        self.targets, self.agent, self.goal, self.obstacle = targets[0], agent[0], int(goal[0]), obstacle[0]
        self.chunks_done = 0
        self.crashed = False
        self.contacts = 0
        self.trajectory = [self.agent.copy()]
        return self.observe()

    def observe(self) -> tuple[np.ndarray, np.ndarray]:
        frame = render_frames(self.agent[None], self.targets[None], self.obstacle[None], self.config)[0]
        return frame, self.agent.astype(np.float32)

    def _move(self, action: np.ndarray) -> None:
        start = self.agent
        end = apply_action(start[None], action[None], self.config)[0]
        if segment_hits_disc(start[None], end[None], self.obstacle[None], self.config.obstacle_radius)[0]:
            if self.config.contact_ends_episode:
                self.crashed = True
                self.agent = end
            self.contacts += 1
            return  # blocked: the move does not happen
        self.agent = end
