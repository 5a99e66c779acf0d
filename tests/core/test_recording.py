"""Recording generations through the core: every step's decision and computed prediction."""

from __future__ import annotations

import pytest
import torch

from stepcache import StepCacheConfig, VelocityCache
from stepcache.recording import record_generations


def test_a_recording_holds_every_computed_prediction_of_every_generation():
    cache = VelocityCache(StepCacheConfig(static_run_steps=(0, 1, 4)))
    outputs = []
    with record_generations() as recording:
        for generation in range(2):
            with cache.generation(6):
                for i in range(6):
                    outputs.append(cache.step(lambda i=i, g=generation: (torch.full((1, 3), float(i + 10 * g)), "x"),
                                              timestep=1.0 - i / 6))
    cache.reset(6)  # outside the block: not recorded
    cache.step(lambda: torch.ones(1, 3))
    assert len(recording.generations) == 2
    for g, generation in enumerate(recording.generations):
        assert generation.complete and generation.num_steps == 6
        assert [s.ran for s in generation.steps] == [True, True, False, False, True, False]
        assert generation.timesteps == pytest.approx([1.0 - i / 6 for i in range(6)])
        computed = [v for v in generation.velocities if v is not None]
        assert [float(v[0, 0]) for v in computed] == [0 + 10 * g, 1 + 10 * g, 4 + 10 * g]


def test_recorded_predictions_are_copies():
    buffer = torch.zeros(1, 2)
    cache = VelocityCache(StepCacheConfig(enabled=False))
    with record_generations() as recording, cache.generation(2):
        for _ in range(2):
            buffer.add_(1.0)
            cache.step(lambda: buffer)
    assert [float(v[0, 0]) for v in recording.generations[0].velocities] == [1.0, 2.0]


def test_blocks_do_not_nest():
    with record_generations(), pytest.raises(RuntimeError, match="already open"), record_generations():
        pass
