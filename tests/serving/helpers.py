"""Shared helpers of the serving tests: tiny models, recorded episodes and solo replays."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stepcache.models.dreamzero.world import INSTRUCTIONS, ReachingWorld
from stepcache.omni import Omni, OmniOutput

# Thresholds the tiny random model's velocities straddle: episodes take different schedules.
VARIED = {"velocity_sim_thresholds": [0.999, 0.99], "velocity_skip_countdowns": [4, 2]}


@dataclass
class Episode:
    """An episode's inputs, chunk by chunk (what a replay feeds), and the outputs of one run of it."""

    seed: int
    instructions: list[str] = field(default_factory=list)
    observations: list[np.ndarray] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    outputs: list[OmniOutput] = field(default_factory=list)


def record_episode(omni: Omni, seed: int, chunks: int, instruction_switch: int | None = None) -> Episode:
    """Drive a fresh session closed loop for ``chunks`` chunks (world seed and noise seed ``seed``);
    from chunk ``instruction_switch`` on, name the next target instead (a new instruction)."""
    world = ReachingWorld()
    frame, state = world.reset(seed)
    episode = Episode(seed)
    with omni.open_session(seed=seed) as session:
        for chunk in range(chunks):
            goal = world.goal if instruction_switch is None or chunk < instruction_switch else (world.goal + 1) % 3
            episode.instructions.append(INSTRUCTIONS[goal])
            episode.observations.append(frame)
            episode.states.append(state)
            out = session.generate(frame, episode.instructions[-1], state)
            episode.outputs.append(out)
            frame, state = world.execute(out.actions)
    return episode


# What docs/serving.md states for a session batched with others against the same session alone (float32
# summation order of batched and masked forwards, amplified on the video by CFG).
ACTIONS_ATOL = 1e-7
FRAMES_ATOL = 5e-5


def assert_same_chunk(a: OmniOutput, b: OmniOutput) -> None:
    """Identical decisions, outputs within the bounds docs/serving.md states."""
    assert a.stats.ran == b.stats.ran
    assert a.stats.dit_forwards == b.stats.dit_forwards
    assert a.stats.context_frames == b.stats.context_frames and a.stats.chunk_index == b.stats.chunk_index
    np.testing.assert_allclose(a.actions, b.actions, atol=ACTIONS_ATOL, rtol=0)
    np.testing.assert_allclose(a.frames, b.frames, atol=FRAMES_ATOL, rtol=0)


def slow_forward(omni: Omni, seconds: float) -> None:
    """Make every denoising forward of ``omni``'s DiT take at least ``seconds`` (to overlap requests)."""
    import time

    model = omni.pipeline.transformer
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return original(*args, **kwargs)

    model.forward = forward
