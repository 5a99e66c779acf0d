"""A toy 2-D reaching world for the DreamZero-style model: an agent, three targets, an instruction.

The arena is the unit square. Each episode places one target of every kind (square, plus, ring) at
random, well-separated positions and the agent at a random start; the instruction names one kind.
Target positions are never given to the policy: they are visible only in the rendered frames
(32x32 grey, x to the right, y downwards), while the robot state is the agent's own position.

The agent moves by one 2-D action per step (at most ``max_step`` long); a chunk is ``action_horizon``
steps. An episode succeeds when, after some chunk, the agent is within ``success_radius`` of the
instructed target, at most ``max_chunks`` chunks in.

The scripted expert heads for the instructed target at an episode-specific speed, along a path bent
by an episode-specific angle that straightens as it closes in, with a little per-step noise, and
stops on the target. Positions, speed and bend all vary per episode, so a model has to read the
frames rather than memorise trajectories.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

TASK = "reaching"
TARGET_KINDS: tuple[str, ...] = ("square", "plus", "ring")
INSTRUCTIONS: tuple[str, ...] = tuple(f"reach the {kind}" for kind in TARGET_KINDS)

# Sprite pixel offsets (row, col) around a target's centre pixel, and grey levels. Shapes and levels
# both differ, so each kind is recognisable from the frame alone.
_SPRITES: dict[str, tuple[list[tuple[int, int]], float]] = {
    "square": ([(r, c) for r in (-1, 0, 1) for c in (-1, 0, 1)], 0.45),
    "plus": ([(r, 0) for r in (-2, -1, 0, 1, 2)] + [(0, c) for c in (-2, -1, 1, 2)], 0.65),
    "ring": ([(r, c) for r in range(-2, 3) for c in range(-2, 3) if max(abs(r), abs(c)) == 2], 0.85),
}
AGENT_LEVEL = 1.0  # the agent is a 2x2 block drawn over everything else


@dataclass(frozen=True)
class WorldConfig:
    """The task's constants. Defaults are the ones the bundled model was trained on."""

    frame_size: int = 32
    action_horizon: int = 8  # actions per chunk
    frames_per_chunk: int = 2  # future frames predicted per chunk, at evenly spaced action steps
    max_chunks: int = 6  # episode length limit, in chunks
    max_step: float = 0.06  # longest move per action
    success_radius: float = 0.05
    target_margin: float = 0.12  # targets stay this far from the walls
    min_target_separation: float = 0.22
    min_start_distance: float = 0.25  # agent start to every target
    expert_speed: tuple[float, float] = (0.03, 0.06)  # per-episode speed range (per action)
    expert_bend: float = 0.6  # per-episode path bend, radians, drawn from [-bend, bend]
    expert_noise: float = 0.004  # per-action Gaussian noise (std)

    def __post_init__(self) -> None:
        if self.frame_size < 8:
            raise ValueError(f"frame_size must be >= 8, got {self.frame_size}")
        if self.action_horizon < 1 or self.frames_per_chunk < 1:
            raise ValueError(
                f"action_horizon and frames_per_chunk must be >= 1, got {self.action_horizon}, "
                f"{self.frames_per_chunk}"
            )
        if self.action_horizon % self.frames_per_chunk:
            raise ValueError(
                f"action_horizon ({self.action_horizon}) must be a multiple of frames_per_chunk "
                f"({self.frames_per_chunk})"
            )
        if not 0 < self.expert_speed[0] <= self.expert_speed[1] <= self.max_step:
            raise ValueError(f"expert_speed must satisfy 0 < lo <= hi <= max_step, got {self.expert_speed}")

    @property
    def steps_per_frame(self) -> int:
        """Actions between two predicted frames."""
        return self.action_horizon // self.frames_per_chunk

    @property
    def episode_steps(self) -> int:
        return self.max_chunks * self.action_horizon

    def to_dict(self) -> dict:
        return asdict(self)

    # A world config knows its task, so that a model's config.json can name the world it was trained on
    # and the tools (demo, bench, load benchmark) drive that world: see stepcache.models.dreamzero.weights.
    @property
    def task(self) -> str:
        return TASK

    def make_world(self) -> ReachingWorld:
        """A fresh closed-loop episode of this task (call ``reset(seed)`` on it)."""
        return ReachingWorld(self)

    def expert_episodes(self, batch: int, rng: np.random.Generator) -> ExpertEpisodes:
        """``batch`` scripted-expert episodes of this task: the training data."""
        return generate_expert_episodes(batch, rng, self)


def instruction_index(instruction: str | int) -> int:
    """Index of an instruction in :data:`INSTRUCTIONS` (text, case and spacing ignored, or index)."""
    if isinstance(instruction, (int, np.integer)) and not isinstance(instruction, bool):
        if 0 <= int(instruction) < len(INSTRUCTIONS):
            return int(instruction)
    elif isinstance(instruction, str):
        key = " ".join(instruction.lower().split())
        if key in INSTRUCTIONS:
            return INSTRUCTIONS.index(key)
        if key in TARGET_KINDS:
            return TARGET_KINDS.index(key)
    raise ValueError(f"unknown instruction {instruction!r}; allowed: {list(INSTRUCTIONS)} or an index 0..2")


def render_frames(agent: np.ndarray, targets: np.ndarray, frame_size: int = 32) -> np.ndarray:
    """Render grey frames in [0, 1].

    Args:
        agent: ``(B, 2)`` agent positions (x, y) in the unit square.
        targets: ``(B, K, 2)`` target positions, one per kind of :data:`TARGET_KINDS`, in that order.

    Returns:
        ``(B, frame_size, frame_size)`` float32 frames.
    """
    frames = np.zeros((np.asarray(agent).shape[0], frame_size, frame_size), dtype=np.float32)
    return draw_targets_and_agent(frames, agent, targets, frame_size)


def draw_targets_and_agent(frames: np.ndarray, agent: np.ndarray, targets: np.ndarray, frame_size: int) -> np.ndarray:
    """Draw the target sprites, then the agent over everything, into ``frames`` ``(B, S, S)`` (in place)."""
    agent = np.asarray(agent, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    batch = agent.shape[0]
    rows_b = np.arange(batch)[:, None]
    for kind_index, kind in enumerate(TARGET_KINDS):
        offsets, level = _SPRITES[kind]
        centre = np.floor(targets[:, kind_index] * frame_size).astype(np.int64)  # (B, 2) as (col, row)
        d_row = np.array([o[0] for o in offsets])[None]
        d_col = np.array([o[1] for o in offsets])[None]
        rows = np.clip(centre[:, 1:2] + d_row, 0, frame_size - 1)
        cols = np.clip(centre[:, 0:1] + d_col, 0, frame_size - 1)
        frames[rows_b, rows, cols] = level
    top_left = np.clip(np.rint(agent * frame_size - 1.0).astype(np.int64), 0, frame_size - 2)
    for d_row in (0, 1):
        for d_col in (0, 1):
            frames[np.arange(batch), top_left[:, 1] + d_row, top_left[:, 0] + d_col] = AGENT_LEVEL
    return frames


def goal_sprite_mask(targets: np.ndarray, goal: np.ndarray, frame_size: int = 32) -> np.ndarray:
    """``(B, S, S)`` boolean mask of the pixels of each episode's instructed target's sprite."""
    targets = np.asarray(targets, dtype=np.float64)
    batch = targets.shape[0]
    mask = np.zeros((batch, frame_size, frame_size), dtype=bool)
    for kind_index, kind in enumerate(TARGET_KINDS):
        rows_b = np.flatnonzero(np.asarray(goal) == kind_index)
        if rows_b.size == 0:
            continue
        offsets, _ = _SPRITES[kind]
        centre = np.floor(targets[rows_b, kind_index] * frame_size).astype(np.int64)
        rows = np.clip(centre[:, 1:2] + np.array([o[0] for o in offsets])[None], 0, frame_size - 1)
        cols = np.clip(centre[:, 0:1] + np.array([o[1] for o in offsets])[None], 0, frame_size - 1)
        mask[rows_b[:, None], rows, cols] = True
    return mask


def sample_layouts(
    batch: int, rng: np.random.Generator, config: WorldConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random episode layouts: targets ``(B, K, 2)`` on pixel centres, agent starts ``(B, 2)``,
    instructed target indices ``(B,)``."""
    size = config.frame_size
    lo = int(np.ceil(config.target_margin * size))
    hi = size - lo  # exclusive
    num_kinds = len(TARGET_KINDS)
    targets = np.empty((batch, num_kinds, 2))
    todo = np.arange(batch)
    while todo.size:  # rejection sampling: resample layouts whose targets sit too close together
        cells = rng.integers(lo, hi, size=(todo.size, num_kinds, 2))
        candidate = (cells + 0.5) / size
        gaps = np.linalg.norm(candidate[:, :, None] - candidate[:, None, :], axis=-1)
        gaps[:, np.arange(num_kinds), np.arange(num_kinds)] = np.inf
        ok = gaps.min(axis=(1, 2)) >= config.min_target_separation
        targets[todo[ok]] = candidate[ok]
        todo = todo[~ok]
    goal = rng.integers(0, num_kinds, size=batch)
    agent = np.empty((batch, 2))
    todo = np.arange(batch)
    while todo.size:
        candidate = rng.uniform(0.05, 0.95, size=(todo.size, 2))
        # Away from every target, not just the goal: otherwise "not the nearest" would leak the goal.
        gaps = np.linalg.norm(candidate[:, None] - targets[todo], axis=-1)
        ok = gaps.min(axis=1) >= config.min_start_distance
        agent[todo[ok]] = candidate[ok]
        todo = todo[~ok]
    return targets, agent, goal


def clip_actions(actions: np.ndarray, max_step: float) -> np.ndarray:
    """Scale every 2-D action longer than ``max_step`` down to that length."""
    actions = np.asarray(actions, dtype=np.float64)
    length = np.linalg.norm(actions, axis=-1, keepdims=True)
    return actions * np.minimum(1.0, max_step / np.maximum(length, 1e-12))


def apply_action(agent: np.ndarray, action: np.ndarray, config: WorldConfig) -> np.ndarray:
    """One step of the dynamics: move by the clipped action, stay inside the arena."""
    return np.clip(agent + clip_actions(action, config.max_step), 0.0, 1.0)


def expert_action(
    agent: np.ndarray,
    goal_position: np.ndarray,
    speed: np.ndarray,
    bend: np.ndarray,
    rng: np.random.Generator,
    config: WorldConfig,
) -> np.ndarray:
    """The scripted expert's next actions ``(B, 2)``: towards the goal, bent by ``bend`` radians
    (fading out within 0.4 of the goal), ``min(speed, distance)`` long, plus noise."""
    delta = goal_position - agent
    distance = np.linalg.norm(delta, axis=-1)
    direction = delta / np.maximum(distance, 1e-9)[:, None]
    angle = bend * np.clip(distance / 0.4, 0.0, 1.0)
    cos, sin = np.cos(angle), np.sin(angle)
    direction = np.stack(
        [cos * direction[:, 0] - sin * direction[:, 1], sin * direction[:, 0] + cos * direction[:, 1]], axis=-1
    )
    step = np.minimum(speed, distance)[:, None]
    noise = rng.normal(0.0, config.expert_noise, size=agent.shape)
    return clip_actions(direction * step + noise, config.max_step)


@dataclass
class ExpertEpisodes:
    """A batch of expert episodes, ``B`` of them, ``T = config.episode_steps`` actions each.

    ``frames[:, j]`` is the frame after ``j * steps_per_frame`` actions (``j = 0`` is the start);
    ``positions[:, i]`` the agent position after ``i`` actions.
    """

    frames: np.ndarray  # (B, T // steps_per_frame + 1, S, S) float32
    positions: np.ndarray  # (B, T + 1, 2)
    actions: np.ndarray  # (B, T, 2)
    targets: np.ndarray  # (B, K, 2)
    goal: np.ndarray  # (B,) instructed target index = instruction index
    obstacle: np.ndarray | None = None  # (B, 2) obstacle centres, in worlds that have one


def generate_expert_episodes(batch: int, rng: np.random.Generator, config: WorldConfig) -> ExpertEpisodes:
    """Roll the scripted expert out for ``batch`` fresh random episodes (the training data)."""
    targets, agent, goal = sample_layouts(batch, rng, config)
    goal_position = targets[np.arange(batch), goal]
    speed = rng.uniform(*config.expert_speed, size=batch)
    bend = rng.uniform(-config.expert_bend, config.expert_bend, size=batch)
    steps = config.episode_steps
    positions = np.empty((batch, steps + 1, 2))
    actions = np.empty((batch, steps, 2))
    positions[:, 0] = agent
    for i in range(steps):
        actions[:, i] = expert_action(positions[:, i], goal_position, speed, bend, rng, config)
        positions[:, i + 1] = apply_action(positions[:, i], actions[:, i], config)
    frame_steps = range(0, steps + 1, config.steps_per_frame)
    frames = np.stack([render_frames(positions[:, i], targets, config.frame_size) for i in frame_steps], axis=1)
    return ExpertEpisodes(frames=frames, positions=positions, actions=actions, targets=targets, goal=goal)


class ReachingWorld:
    """One closed-loop episode: reset, then execute action chunks and observe.

    Example:
        >>> world = ReachingWorld()
        >>> frame, state = world.reset(seed=0)
        >>> frame.shape, state.shape
        ((32, 32), (2,))
    """

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        self.targets = np.zeros((len(TARGET_KINDS), 2))
        self.agent = np.zeros(2)
        self.goal = 0
        self.chunks_done = 0
        self.trajectory: list[np.ndarray] = []

    @property
    def instruction(self) -> str:
        return INSTRUCTIONS[self.goal]

    @property
    def goal_position(self) -> np.ndarray:
        return self.targets[self.goal]

    @property
    def distance_to_goal(self) -> float:
        return float(np.linalg.norm(self.agent - self.goal_position))

    @property
    def success(self) -> bool:
        return self.distance_to_goal <= self.config.success_radius

    @property
    def done(self) -> bool:
        return self.success or self.chunks_done >= self.config.max_chunks

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Start a random episode; returns the first frame ``(S, S)`` and the state ``(2,)``."""
        rng = np.random.default_rng(seed)
        targets, agent, goal = sample_layouts(1, rng, self.config)
        self.targets, self.agent, self.goal = targets[0], agent[0], int(goal[0])
        self.chunks_done = 0
        self.trajectory = [self.agent.copy()]
        return self.observe()

    def observe(self) -> tuple[np.ndarray, np.ndarray]:
        frame = render_frames(self.agent[None], self.targets[None], self.config.frame_size)[0]
        return frame, self.agent.astype(np.float32)

    def execute(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Execute one action chunk ``(H, 2)`` step by step; returns the new frame and state."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[1] != 2:
            raise ValueError(f"actions must have shape (H, 2), got {actions.shape}")
        if not np.isfinite(actions).all():
            raise ValueError("actions must be finite")
        for action in actions:
            self._move(action)
            self.trajectory.append(self.agent.copy())
            if self.done_moving:
                break
        self.chunks_done += 1
        return self.observe()

    @property
    def done_moving(self) -> bool:
        """True once the agent can no longer move in this episode (never, here; a crash in a world with
        obstacles)."""
        return False

    def _move(self, action: np.ndarray) -> None:
        self.agent = apply_action(self.agent[None], action[None], self.config)[0]
