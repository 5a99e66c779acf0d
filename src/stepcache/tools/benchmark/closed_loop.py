"""Closed-loop episodes of a DreamZero-style model's world, many at once, and their success rate with
its uncertainty.

:func:`run_episodes` drives one world episode per :class:`~stepcache.omni.Session` of an ``Omni``
(observe, generate a chunk, execute it, until the episode is done), ``sessions`` episodes at a time.
Every round submits the next chunk of every episode in flight while the engine's admission is held,
so the chunks of a round start together: the batch composition, and so every floating-point result,
depends only on the seeds and on ``sessions``, never on thread timing. Each episode's noise is seeded
by its world seed, so a method sees the same noise per episode whatever else runs beside it. The
batching engine decides per session and keeps a session's outputs within float32 rounding of running
alone (see docs/serving.md); ``sessions=1`` runs each episode alone, which is what latency is timed on.

:func:`replay_episodes` feeds the observations of earlier episodes back, open loop, with the same
noise, so that two methods' actions and predicted frames compare one to one.

:func:`wilson_interval` is the 95% Wilson score interval of a success rate, the interval every
closed-loop report in the project draws (it stays inside [0, 1] and behaves at 0% and 100%, where
the normal approximation collapses to a point).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The two-sided 95% normal quantile.
Z_95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of a binomial proportion (95% by default).

    Example:
        >>> [round(x, 4) for x in wilson_interval(8, 10)]
        [0.4902, 0.9433]
    """
    if trials <= 0:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in 0..{trials}, got {successes}")
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class EpisodeRecord:
    """One closed-loop (or replayed) episode of one method."""

    seed: int
    success: bool
    chunks: int
    final_distance: float
    crashed: bool = False
    latencies: list[float] = field(default_factory=list)
    forwards: list[int] = field(default_factory=list)
    observations: list[np.ndarray] = field(default_factory=list)  # frame at each chunk start
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)  # (H, 2) per chunk
    frames: list[np.ndarray] = field(default_factory=list)  # (F, S, S) predicted per chunk
    ran: list[list[bool]] = field(default_factory=list)
    similarity: list[list[float | None]] = field(default_factory=list)
    trajectory: np.ndarray | None = None
    targets: np.ndarray | None = None
    obstacle: np.ndarray | None = None
    goal: int = 0
    instruction: str = ""

    def add_chunk(self, observation: np.ndarray, state: np.ndarray, out: Any) -> None:
        self.observations.append(observation)
        self.states.append(state)
        self.actions.append(out.actions)
        self.frames.append(out.frames)
        self.latencies.append(out.stats.latency_s)
        self.forwards.append(out.stats.dit_forwards)
        self.ran.append(out.stats.ran)
        self.similarity.append(out.stats.velocity_similarity)


def _finish(record: EpisodeRecord, world: Any) -> EpisodeRecord:
    record.success, record.chunks = world.success, world.chunks_done
    record.crashed = bool(getattr(world, "crashed", False))
    record.final_distance = world.distance_to_goal
    record.trajectory = np.asarray(world.trajectory)
    record.targets, record.goal = world.targets.copy(), world.goal
    obstacle = getattr(world, "obstacle", None)
    record.obstacle = None if obstacle is None else np.asarray(obstacle).copy()
    return record


def _in_rounds(omni: Any, sessions: int, episodes: Sequence[Any],
               start: Callable[[Any], Any], step: Callable[[Any, Any], bool],
               on_done: Callable[[Any], None] | None) -> None:
    """Run ``episodes`` ``sessions`` at a time: ``start(episode)`` makes its state, then every round
    ``step(state, output)`` gets the chunk its state asked for (``state.request``) and says whether
    the episode is over."""
    slots = [omni.open_session(seed=0) for _ in range(min(sessions, len(episodes)))]
    todo = list(episodes)[::-1]
    active: dict[int, Any] = {}
    try:
        while todo or active:
            for index, session in enumerate(slots):
                if index not in active and todo:
                    state = start(todo.pop())
                    session.start_episode(state.seed)
                    active[index] = state
            with omni.engine.paused():  # the round's chunks start together (see the module docstring)
                futures = {index: slots[index].submit(*state.request) for index, state in active.items()}
            for index, future in futures.items():
                state = active[index]
                if step(state, future.result()):
                    del active[index]
                    if on_done is not None:
                        on_done(state.record)
    finally:
        for session in slots:
            session.close()


@dataclass
class _Running:
    seed: int
    world: Any
    record: EpisodeRecord
    request: tuple[Any, str, Any]


def run_episodes(omni: Any, world_config: Any, seeds: Sequence[int], *, sessions: int = 32,
                 on_done: Callable[[EpisodeRecord], None] | None = None) -> list[EpisodeRecord]:
    """Drive one closed-loop episode per world seed (its noise seeded by the same seed); returns the
    records in the order of ``seeds``. ``on_done(record)`` runs as each episode ends."""

    def start(seed: int) -> _Running:
        world = world_config.make_world()
        frame, state = world.reset(seed)
        record = EpisodeRecord(seed=seed, success=False, chunks=0, final_distance=math.nan,
                               instruction=world.instruction)
        return _Running(seed, world, record, (frame, world.instruction, state))

    def step(running: _Running, out: Any) -> bool:
        frame, _, state = running.request
        running.record.add_chunk(frame, state, out)
        frame, state = running.world.execute(out.actions)
        running.request = (frame, running.world.instruction, state)
        if running.world.done:
            _finish(running.record, running.world)
            return True
        return False

    done: dict[int, EpisodeRecord] = {}

    def collect(record: EpisodeRecord) -> None:
        done[record.seed] = record
        if on_done is not None:
            on_done(record)

    _in_rounds(omni, sessions, list(seeds), start, step, collect)
    return [done[seed] for seed in seeds]


@dataclass
class _Replaying:
    seed: int
    reference: EpisodeRecord
    record: EpisodeRecord
    chunk: int = 0

    @property
    def request(self) -> tuple[Any, str, Any]:
        ref = self.reference
        return ref.observations[self.chunk], ref.instruction, ref.states[self.chunk]


def replay_episodes(omni: Any, references: Sequence[EpisodeRecord], *, sessions: int = 32) -> list[EpisodeRecord]:
    """Feed each reference episode's observations and states back, open loop, with the same noise
    seed; returns one record per reference (its outputs; outcome fields copied from the reference)."""

    def start(reference: EpisodeRecord) -> _Replaying:
        record = EpisodeRecord(seed=reference.seed, success=reference.success, chunks=reference.chunks,
                               final_distance=reference.final_distance, crashed=reference.crashed,
                               instruction=reference.instruction)
        return _Replaying(reference.seed, reference, record)

    def step(replaying: _Replaying, out: Any) -> bool:
        frame, _, state = replaying.request
        replaying.record.add_chunk(frame, state, out)
        replaying.chunk += 1
        return replaying.chunk >= len(replaying.reference.observations)

    done: dict[int, EpisodeRecord] = {}
    _in_rounds(omni, sessions, list(references), start, step, lambda record: done.__setitem__(record.seed, record))
    return [done[reference.seed] for reference in references]


def success_summary(records: Sequence[EpisodeRecord]) -> dict[str, Any]:
    """Success rate with its 95% Wilson interval, crash rate, and mean chunks to success."""
    wins = sum(r.success for r in records)
    low, high = wilson_interval(wins, len(records))
    to_success = [r.chunks for r in records if r.success]
    return {
        "episodes": len(records),
        "successes": wins,
        "success_rate": wins / len(records),
        "success_interval": [low, high],
        "crash_rate": float(np.mean([r.crashed for r in records])),
        "mean_chunks_to_success": float(np.mean(to_success)) if to_success else math.nan,
    }
