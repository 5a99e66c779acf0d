"""Closed-loop episodes many at once, and the Wilson interval every success rate is reported with."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from stepcache.models.dreamzero.world import WorldConfig
from stepcache.models.dreamzero_detour.world import DetourConfig
from stepcache.tools.benchmark.closed_loop import replay_episodes, run_episodes, success_summary, wilson_interval
from tests.models.dreamzero.tiny import save_tiny_model


@pytest.mark.parametrize(("successes", "trials", "expected"), [
    (8, 10, (0.4902, 0.9433)),
    (0, 10, (0.0, 0.2775)),  # 0/n: the upper end is z^2 / (n + z^2)
    (10, 10, (0.7225, 1.0)),  # n/n: the lower end is n / (n + z^2)
    (150, 300, (0.4438, 0.5562)),  # p = 1/2: centred, half-width z * sqrt(1/(4n) + z^2/(4n^2)) / (1 + z^2/n)
    (1, 1, (0.2065, 1.0)),
])
def test_wilson_interval_matches_known_values(successes, trials, expected):
    low, high = wilson_interval(successes, trials)
    assert (round(low, 4), round(high, 4)) == expected


def test_wilson_interval_refuses_impossible_counts():
    with pytest.raises(ValueError, match="trials must be >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"successes must be in 0..5"):
        wilson_interval(6, 5)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("world_config", [WorldConfig(max_chunks=3), DetourConfig(max_chunks=3)],
                         ids=["reaching", "detour"])
def test_episodes_batched_take_the_same_actions_as_run_alone(tiny_model, world_config):
    from stepcache.omni import Omni

    seeds = [11, 12, 13, 14]
    with contextlib.closing(Omni(tiny_model, cache_backend="step_cache", cache_config="fast")) as omni:
        batched = run_episodes(omni, world_config, seeds, sessions=3)
        alone = run_episodes(omni, world_config, seeds, sessions=1)
        again = run_episodes(omni, world_config, seeds, sessions=3)
    assert [r.seed for r in batched] == seeds
    for a, b, c in zip(batched, alone, again):
        assert a.chunks == b.chunks and a.success == b.success and a.ran == b.ran
        for x, y, z in zip(a.actions, b.actions, c.actions):
            np.testing.assert_allclose(x, y, atol=1e-5)
            assert np.array_equal(x, z)  # the same rounds, the same batches: bit for bit
    summary = success_summary(batched)
    assert summary["episodes"] == 4 and summary["successes"] == sum(r.success for r in batched)
    low, high = summary["success_interval"]
    assert low <= summary["success_rate"] <= high


def test_a_replay_feeds_back_the_reference_inputs_with_the_same_noise(tiny_model):
    from stepcache.omni import Omni

    world = WorldConfig(max_chunks=2)
    with contextlib.closing(Omni(tiny_model, cache_backend=None)) as omni:
        reference = run_episodes(omni, world, [3, 4], sessions=2)
        replayed = replay_episodes(omni, reference, sessions=2)
    for ref, rep in zip(reference, replayed):
        assert len(rep.actions) == len(ref.actions)
        for x, y in zip(ref.actions, rep.actions):
            np.testing.assert_allclose(x, y, atol=1e-5)
