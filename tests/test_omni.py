from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stepcache import CACHE_BACKEND_ENV, StepCacheBackend, is_stepcache_active
from stepcache.models.dreamzero.pipeline import DreamZeroPipeline
from stepcache.models.dreamzero.training import torch_threads
from stepcache.models.dreamzero.world import ReachingWorld
from stepcache.omni import Omni
from tests.models.dreamzero.tiny import save_tiny_model


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):  # tiny tensors: a second thread only adds synchronisation
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("omni") / "tiny")


@pytest.mark.parametrize(("env", "active"), [(None, False), ("", False), ("none", False), ("step_cache", True),
                                             ("STEPCACHE", True), ("step_cache_dit", True)])
def test_environment_variable_decides_when_cache_backend_is_not_given(monkeypatch, model_dir, env, active):
    if env is None:
        monkeypatch.delenv(CACHE_BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(CACHE_BACKEND_ENV, env)
    omni = Omni(model=model_dir)
    assert isinstance(omni.pipeline, DreamZeroPipeline)
    assert is_stepcache_active(omni.pipeline) is active
    assert isinstance(omni.cache_backend, StepCacheBackend) is active


def test_explicit_cache_backend_overrides_the_environment(monkeypatch, model_dir):
    monkeypatch.setenv(CACHE_BACKEND_ENV, "step_cache")
    assert not is_stepcache_active(Omni(model=model_dir, cache_backend=None).pipeline)
    assert not is_stepcache_active(Omni(model=model_dir, cache_backend="none").pipeline)
    monkeypatch.setenv(CACHE_BACKEND_ENV, "none")
    assert is_stepcache_active(Omni(model=model_dir, cache_backend="step_cache").pipeline)


def test_bad_backend_or_config_is_a_value_error(monkeypatch, model_dir):
    with pytest.raises(ValueError, match="unknown cache_backend 'teacache'"):
        Omni(model=model_dir, cache_backend="teacache")
    monkeypatch.setenv(CACHE_BACKEND_ENV, "fastercache")
    with pytest.raises(ValueError, match=CACHE_BACKEND_ENV):
        Omni(model=model_dir)
    with pytest.raises(ValueError):
        Omni(model=model_dir, cache_backend="step_cache", cache_config={"velocity_sim_threshold": [0.9]})


def test_generate_continues_the_episode_and_reports_stats(model_dir):
    omni = Omni(model=model_dir, cache_backend="step_cache",
                cache_config={"velocity_sim_thresholds": [-0.99], "velocity_skip_countdowns": [4]})
    world = ReachingWorld()
    frame, state = world.reset(seed=0)
    omni.start_episode(seed=0)
    stats = []
    for _ in range(5):
        out = omni.generate(frame, world.instruction, state)
        assert out.actions.shape == (8, 2) and out.frames.shape == (2, 32, 32)
        assert 0.0 <= out.frames.min() and out.frames.max() <= 1.0
        stats.append(out.stats)
        frame, state = world.execute(out.actions)
    assert [s.chunk_index for s in stats] == [0, 1, 2, 3, 4]
    assert [s.context_frames for s in stats] == [1, 2, 3, 4, 1]  # context resets after 4 chunks
    for s in stats:
        assert s.dit_forwards == 4 and s.prefill_forwards == 1 and s.latency_s > 0
        assert s.schedule == "RR....R....R...."
        assert len(s.trace) == 16 and s.trace[2] == {"step": 2, "ran": False, "reason": "similar",
                                                      "similarity": s.trace[2]["similarity"]}
        assert s.to_dict()["dit_forwards"] == 4
    omni.start_episode(seed=0)
    assert omni.generate(frame, world.instruction, state).stats.context_frames == 1


def test_same_seed_same_chunk_and_uncached_runs_every_step(model_dir):
    world = ReachingWorld()
    frame, state = world.reset(seed=1)
    results = []
    for _ in range(2):
        omni = Omni(model=model_dir, cache_backend=None)
        omni.start_episode(seed=5)
        results.append(omni.generate(frame, "reach the plus", state))
    assert np.array_equal(results[0].actions, results[1].actions)
    assert results[0].stats.dit_forwards == 16 and results[0].stats.trace == []
    assert results[0].stats.cache_backend == "none"


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a bundled model"):
        Omni(model=str(tmp_path / "missing"), cache_backend=None)


def test_bundled_model_loads_by_name():
    omni = Omni(model="dreamzero-mini", cache_backend="step_cache")
    world = ReachingWorld()
    frame, state = world.reset(seed=0)
    out = omni.generate(frame, world.instruction, state)
    assert out.actions.shape == (8, 2) and out.stats.dit_forwards <= 16
