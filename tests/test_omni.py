from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from stepcache import CACHE_BACKEND_ENV, StepCacheBackend, is_stepcache_active
from stepcache.models.dreamzero.pipeline import DreamZeroPipeline
from stepcache.models.dreamzero.training import torch_threads
from stepcache.models.dreamzero.world import ReachingWorld
from stepcache.omni import Omni, SessionBusyError
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


@pytest.mark.parametrize("env", [None, "none"])
def test_a_cache_config_without_a_backend_runs_step_cache(monkeypatch, model_dir, env):
    if env is None:
        monkeypatch.delenv(CACHE_BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(CACHE_BACKEND_ENV, env)
    omni = Omni(model=model_dir, cache_config="fast")
    assert is_stepcache_active(omni.pipeline) and omni.cache_backend_name == "step_cache"
    assert omni.cache_backend.config.to_dict() == Omni(model_dir, "step_cache", "fast").cache_backend.config.to_dict()
    world = ReachingWorld()
    frame, state = world.reset(0)
    assert omni.generate(frame, world.instruction, state).stats.dit_forwards < omni.num_inference_steps


@pytest.mark.parametrize("backend", [None, "none", " NONE "])
def test_a_cache_config_with_no_cache_is_refused(model_dir, backend):
    with pytest.raises(ValueError, match=r"cache_config was given with .*pass cache_backend='step_cache'"):
        Omni(model=model_dir, cache_backend=backend, cache_config="fast")


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


# -- argument errors (issue 13) ---------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model": None}, "model must be a bundled model name"),
    ({"model": 123}, "model must be a bundled model name"),
    ({"model": ""}, "model must be a bundled model name"),
    ({"seed": 1.7}, r"seed must be an integer >= 0, got 1\.7"),
    ({"seed": True}, "seed must be an integer"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\)"),
    ({"pipeline_config": {"steps": 8}}, r"pipeline_config: unknown DreamZeroPipelineConfig fields \['steps'\]"),
    ({"pipeline_config": {"guidance_scale": 0.5}}, "pipeline_config: guidance_scale must be >= 1"),
    ({"pipeline_config": [8]}, "pipeline_config must be a DreamZeroPipelineConfig, a dict"),
    ({"engine_config": {"decision": "vote"}}, "decision must be one of"),
    ({"device": "gpu7"}, "device: "),
    ({"cache_config": {"step_cache_dit_static_steps": [0, 50]}}, "50"),
])
def test_bad_arguments_are_clear_errors_naming_the_argument(model_dir, kwargs, message):
    arguments = {"model": model_dir, "cache_backend": "step_cache", **kwargs}
    with pytest.raises(ValueError, match=message):
        Omni(**arguments)


def test_pipeline_config_may_be_a_dict_of_its_fields(model_dir):
    omni = Omni(model=model_dir, cache_backend=None, pipeline_config={"num_inference_steps": 4})
    world = ReachingWorld()
    frame, state = world.reset(seed=0)
    assert omni.num_inference_steps == 4 and omni.generate(frame, world.instruction, state).stats.dit_forwards == 4
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got 2\.5"):
        omni.start_episode(2.5)
    with pytest.raises(ValueError, match="seed must be an integer"):
        omni.open_session(seed="3")


# -- sessions ---------------------------------------------------------------------------------------


def _replay(generate, world_seed: int, chunks: int):
    world = ReachingWorld()
    frame, state = world.reset(seed=world_seed)
    outputs = []
    for _ in range(chunks):
        out = generate(frame, world.instruction, state)
        outputs.append(out)
        frame, state = world.execute(out.actions)
    return outputs


def test_the_implicit_session_equals_the_pipeline_called_directly(model_dir):
    omni = Omni(model=model_dir, cache_backend="step_cache", seed=4)
    omni.start_episode(seed=4)
    through_omni = _replay(omni.generate, 0, 3)
    direct = Omni(model=model_dir, cache_backend="step_cache").pipeline
    generator = torch.Generator().manual_seed(4)
    world = ReachingWorld()
    frame, state = world.reset(seed=0)
    for out in through_omni:
        expected = direct(frame, world.instruction, state, generator=generator)
        assert np.array_equal(out.actions, expected.actions[0]) and out.stats.ran == expected.ran
        frame, state = world.execute(out.actions)
    assert [out.stats.chunk_index for out in through_omni] == [0, 1, 2] and omni.chunk_index == 3


def test_an_explicit_session_equals_the_implicit_one_with_the_same_seed(model_dir):
    omni = Omni(model=model_dir, cache_backend="step_cache", seed=9)
    implicit = _replay(omni.generate, 2, 3)
    with omni.open_session(seed=9) as session:
        explicit = _replay(session.generate, 2, 3)
        assert session.chunk_index == 3 and session.nbytes() > 0
    for a, b in zip(implicit, explicit):
        assert np.array_equal(a.actions, b.actions) and a.stats.ran == b.stats.ran
    assert explicit[0].stats.session_id == session.id and implicit[0].stats.session_id == "default"
    omni.close()


def test_two_threads_on_the_implicit_session_get_a_clear_error(model_dir):
    omni = Omni(model=model_dir, cache_backend="step_cache", seed=1)
    reference = _replay(Omni(model=model_dir, cache_backend="step_cache", seed=1).generate, 0, 1)[0]
    original = omni.pipeline.transformer.forward

    def slow(*args, **kwargs):
        time.sleep(0.005)
        return original(*args, **kwargs)

    omni.pipeline.transformer.forward = slow
    world = ReachingWorld()
    frame, state = world.reset(seed=0)
    results, errors = [], []

    def call() -> None:
        try:
            results.append(omni.generate(frame, world.instruction, state))
        except SessionBusyError as error:
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 1 and len(errors) == 1
    assert "omni.generate is already generating a chunk" in str(errors[0]) and "open_session" in str(errors[0])
    assert np.array_equal(results[0].actions, reference.actions)  # the chunk that ran is not corrupted
    omni.close()


def test_a_failed_chunk_rolls_back_through_omni(model_dir):
    clean = _replay(Omni(model=model_dir, cache_backend="step_cache", seed=2).generate, 1, 3)
    omni = Omni(model=model_dir, cache_backend="step_cache", seed=2)
    original = omni.pipeline.transformer.forward
    calls = {"n": 0}

    def fail_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # chunk 1, its second forward
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    omni.pipeline.transformer.forward = fail_once

    def generate_with_retry(*args):
        try:
            return omni.generate(*args)
        except RuntimeError as error:
            assert "injected" in str(error)
            return omni.generate(*args)

    retried = _replay(generate_with_retry, 1, 3)
    assert calls["n"] > 6
    for a, b in zip(clean, retried):
        assert np.array_equal(a.actions, b.actions) and a.stats.trace == b.stats.trace
        assert a.stats.chunk_index == b.stats.chunk_index and a.stats.context_frames == b.stats.context_frames
    omni.close()


def test_sessions_await_their_chunks_together_from_asyncio(model_dir):
    omni = Omni(model=model_dir, cache_backend="step_cache")
    sessions = [omni.open_session(seed=seed) for seed in range(4)]
    world = ReachingWorld()
    frame, state = world.reset(seed=0)

    async def all_at_once():
        with omni.engine.paused():
            tasks = [asyncio.ensure_future(s.agenerate(frame, world.instruction, state)) for s in sessions]
            await asyncio.sleep(0.05)  # every request is queued before the engine admits them
        return await asyncio.gather(*tasks)

    outputs = asyncio.run(all_at_once())
    assert all(out.stats.forward_batch_sizes[0] == 4 for out in outputs)
    alone = Omni(model=model_dir, cache_backend="step_cache").open_session(seed=2).generate(
        frame, world.instruction, state)
    np.testing.assert_allclose(outputs[2].actions, alone.actions, atol=1e-5, rtol=0)
    omni.close()


def test_non_finite_outputs_are_refused_by_the_pipeline_called_directly(model_dir):
    from stepcache.models.dreamzero.pipeline import NonFiniteOutputError

    pipe = Omni(model=model_dir, cache_backend=None).pipeline
    world = ReachingWorld()
    frame, state = world.reset(seed=0)
    with pytest.raises(NonFiniteOutputError, match="state lies outside") as raised:
        pipe(frame, world.instruction, np.array([1e30, 1e30], dtype=np.float32))
    assert raised.value.field == "state" and pipe.context.chunk_index == 0 and pipe.context.kv_cache.num_frames == 0
    assert np.isfinite(pipe(frame, world.instruction, state).actions).all() and pipe.context.chunk_index == 1
