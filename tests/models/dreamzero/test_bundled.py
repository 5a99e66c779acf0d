"""The shipped dreamzero-mini weights do their job: closed loop, the agent reaches the named target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepcache import DiffusionCacheConfig, enable_dreamzero_stepcache
from stepcache.models.dreamzero.pipeline import DreamZeroPipeline
from stepcache.models.dreamzero.world import INSTRUCTIONS, ReachingWorld

EPISODES = range(500, 512)  # not the demo's seeds


def _drive(pipe: DreamZeroPipeline, seed: int, instruct) -> tuple[ReachingWorld, list[int]]:
    """Run one episode closed loop; ``instruct(world)`` picks the target index to name."""
    world = ReachingWorld()
    frame, state = world.reset(seed)
    world.goal = instruct(world)  # success is then judged against the named target
    pipe.reset_context()
    generator = torch.Generator().manual_seed(seed)
    forwards = []
    while not world.done:
        out = pipe(frame, INSTRUCTIONS[world.goal], state, generator=generator)
        forwards.append(out.dit_forwards)
        frame, state = world.execute(out.actions[0])
    return world, forwards


@pytest.fixture(scope="module")
def pipe() -> DreamZeroPipeline:
    return DreamZeroPipeline.from_pretrained("dreamzero-mini")


def test_uncached_model_reaches_the_named_target(pipe):
    worlds = [_drive(pipe, seed, lambda w: w.goal)[0] for seed in EPISODES]
    assert np.mean([w.success for w in worlds]) >= 0.9


def test_the_instruction_decides_which_target(pipe):
    # Name another target than the episode drew: the agent must go there instead.
    worlds = [_drive(pipe, seed, lambda w: (w.goal + 1) % 3)[0] for seed in EPISODES]
    assert np.mean([w.success for w in worlds]) >= 0.9


def test_seed_defaults_skip_most_forwards_and_still_reach_the_target(pipe):
    enable_dreamzero_stepcache(pipe, DiffusionCacheConfig())
    runs = [_drive(pipe, seed, lambda w: w.goal) for seed in EPISODES]
    assert np.mean([w.success for w, _ in runs]) >= 0.85
    assert np.mean([f for _, forwards in runs for f in forwards]) <= 8
