"""The batching engine: batched sessions equal sessions run alone, whatever the batch holds."""

from __future__ import annotations

import gc
import threading
import tracemalloc
import weakref
from concurrent.futures import CancelledError

import numpy as np
import pytest

from stepcache.models.dreamzero.pipeline import NonFiniteOutputError
from stepcache.omni import Omni, SessionBusyError, SessionClosedError
from stepcache.serving import EngineConfig
from tests.serving.helpers import VARIED, assert_same_chunk, record_episode, slow_forward


@pytest.fixture(scope="module")
def solo(tiny_dir):
    """Eight episodes of 3 chunks, each run alone (one session at a time)."""
    omni = Omni(tiny_dir, cache_backend="step_cache", cache_config=VARIED)
    episodes = [record_episode(omni, seed, chunks=3) for seed in range(8)]
    omni.close()
    return episodes


def _omni(tiny_dir, **engine):
    return Omni(tiny_dir, cache_backend="step_cache", cache_config=VARIED, engine_config=engine or None)


def test_eight_batched_sessions_each_equal_running_alone(tiny_dir, solo):
    schedules = {out.stats.schedule for episode in solo for out in episode.outputs}
    assert len(schedules) > 1  # the sessions do decide differently
    with _omni(tiny_dir) as omni:
        sessions = [omni.open_session(seed=episode.seed) for episode in solo]
        for chunk in range(3):
            with omni.engine.paused():  # all eight start together
                futures = [session.submit(ep.observations[chunk], ep.instructions[chunk], ep.states[chunk])
                           for session, ep in zip(sessions, solo)]
            for future, episode in zip(futures, solo):
                out = future.result(timeout=60)
                assert_same_chunk(out, episode.outputs[chunk])
                assert out.stats.forward_batch_sizes[0] == 8  # step 0 computes for all of them at once
                # every forward held exactly the sessions that computed that step
                assert all(1 <= size <= 8 for size in out.stats.forward_batch_sizes)
        stats = omni.engine.stats
        assert stats.chunks == 24 and stats.failed_chunks == 0 and stats.chunks_per_forward > 1
        assert stats.denoise_forwards < sum(out.stats.dit_forwards for ep in solo for out in ep.outputs)


def test_sessions_at_different_chunks_instructions_contexts_and_steps_batch_together(tiny_dir):
    plans = {0: (5, None), 1: (3, 1), 2: (2, None), 3: (2, None)}  # seed: (chunks, instruction switch)
    with Omni(tiny_dir, cache_backend="step_cache", cache_config=VARIED) as omni:
        alone = {seed: record_episode(omni, seed, chunks, switch) for seed, (chunks, switch) in plans.items()}
    with _omni(tiny_dir) as omni:
        sessions = {seed: omni.open_session(seed=seed) for seed in plans}
        results: dict[tuple[int, int], object] = {}

        def submit(seed: int, chunk: int):
            ep = alone[seed]
            return sessions[seed].submit(ep.observations[chunk], ep.instructions[chunk], ep.states[chunk])

        # phase A, one at a time: session 0 is three chunks in, session 1 one chunk in
        for seed, chunk in ((0, 0), (0, 1), (0, 2), (1, 0)):
            results[seed, chunk] = submit(seed, chunk).result(timeout=60)
        # phase B, together: 4 cached frames (session 0), a new instruction (1: context reset), a first chunk
        # (2), and session 3 joining at the engine's fifth step, while the others are five steps in
        late: dict[str, object] = {}
        steps = {"n": 0}

        def join_late() -> None:
            steps["n"] += 1
            if steps["n"] == 5:
                late["future"] = submit(3, 0)

        omni.engine.step_hook = join_late
        with omni.engine.paused():
            futures = {(seed, chunk): submit(seed, chunk) for seed, chunk in ((0, 3), (1, 1), (2, 0))}
        for key, future in futures.items():
            results[key] = future.result(timeout=60)
        results[3, 0] = late["future"].result(timeout=60)
        omni.engine.step_hook = None
        # phase C, together: a context reset after four chunks (0), two-frame contexts (1, 2, 3)
        with omni.engine.paused():
            futures = {(seed, chunk): submit(seed, chunk) for seed, chunk in ((0, 4), (1, 2), (2, 1), (3, 1))}
        for key, future in futures.items():
            results[key] = future.result(timeout=60)

    assert [results[k].stats.context_frames for k in ((0, 3), (1, 1), (2, 0), (3, 0))] == [4, 1, 1, 1]
    assert results[1, 1].stats.context_reset and results[0, 4].stats.context_reset
    assert max(results[0, 3].stats.forward_batch_sizes) >= 3  # the 4-frame and 1-frame contexts shared forwards
    assert max(results[3, 0].stats.forward_batch_sizes) >= 2  # the late session joined a batch in flight
    for (seed, chunk), out in results.items():
        assert_same_chunk(out, alone[seed].outputs[chunk])


def test_dreamzero_mini_batched_with_a_padded_four_frame_context_stays_within_the_stated_bound():
    """The bundled model (not the tiny one): a 4-frame context batched with 1-frame ones, padded and
    masked, against each run alone, to the bounds docs/serving.md states."""
    with Omni("dreamzero-mini", cache_backend="step_cache") as omni:
        alone = {seed: record_episode(omni, seed, chunks) for seed, chunks in ((0, 4), (1, 1), (2, 1))}
    with Omni("dreamzero-mini", cache_backend="step_cache") as omni:
        sessions = {seed: omni.open_session(seed=seed) for seed in alone}
        first = alone[0]
        for chunk in range(3):
            sessions[0].generate(first.observations[chunk], first.instructions[chunk], first.states[chunk])
        with omni.engine.paused():
            futures = {seed: sessions[seed].submit(alone[seed].observations[chunk], alone[seed].instructions[chunk],
                                                   alone[seed].states[chunk])
                       for seed, chunk in ((0, 3), (1, 0), (2, 0))}
        outputs = {seed: future.result(timeout=60) for seed, future in futures.items()}
    assert outputs[0].stats.context_frames == 4 and outputs[1].stats.context_frames == 1
    assert max(outputs[0].stats.forward_batch_sizes) == 3  # the padded contexts did share forwards
    for seed, out in outputs.items():
        assert_same_chunk(out, alone[seed].outputs[-1])


def test_the_batch_mean_option_takes_one_decision_per_batch(tiny_dir, solo):
    with _omni(tiny_dir, decision="batch_mean") as omni:
        sessions = [omni.open_session(seed=episode.seed) for episode in solo]
        with omni.engine.paused():
            futures = [session.submit(ep.observations[0], ep.instructions[0], ep.states[0])
                       for session, ep in zip(sessions, solo)]
        outputs = [future.result(timeout=60) for future in futures]
    assert len({out.stats.schedule for out in outputs}) == 1  # one decision for the whole batch
    assert all(out.stats.forward_batch_sizes == [8] * out.stats.dit_forwards for out in outputs)
    alone = [episode.outputs[0].stats.schedule for episode in solo]
    assert any(out.stats.schedule != schedule for out, schedule in zip(outputs, alone))  # others' velocities decided
    with pytest.raises(ValueError, match="decision must be one of"):
        EngineConfig(decision="mean")
    with pytest.raises(ValueError, match="unknown EngineConfig fields"):
        EngineConfig.coerce({"batch": 3})


def test_without_batching_chunks_run_one_at_a_time(tiny_dir, solo):
    with _omni(tiny_dir, batching=False) as omni:
        sessions = [omni.open_session(seed=episode.seed) for episode in solo[:3]]
        with omni.engine.paused():
            futures = [session.submit(ep.observations[0], ep.instructions[0], ep.states[0])
                       for session, ep in zip(sessions, solo)]
        for future, episode in zip(futures, solo):
            out = future.result(timeout=60)
            assert set(out.stats.forward_batch_sizes) == {1}
            assert_same_chunk(out, episode.outputs[0])
        assert out.stats.queue_s > 0  # the third waited for the first two


def test_a_failing_session_fails_alone_and_its_episode_rolls_back(tiny_dir, solo):
    marker = np.array([0.123456, 0.654321], dtype=np.float32)
    with _omni(tiny_dir) as omni:
        model = omni.pipeline.transformer
        original = model.forward
        failing = {"on": True}

        def forward(video, actions, state, *args, **kwargs):
            if failing["on"] and bool((state == marker * 2 - 1).all(dim=1).any()):
                raise RuntimeError("injected failure")
            return original(video, actions, state, *args, **kwargs)

        model.forward = forward
        sessions = [omni.open_session(seed=episode.seed) for episode in solo[:4]]
        with omni.engine.paused():
            futures = [session.submit(ep.observations[0], ep.instructions[0], marker if i == 2 else ep.states[0])
                       for i, (session, ep) in enumerate(zip(sessions, solo))]
        for i, (future, episode) in enumerate(zip(futures, solo)):
            if i == 2:
                with pytest.raises(RuntimeError, match="injected failure"):
                    future.result(timeout=60)
            else:
                assert_same_chunk(future.result(timeout=60), episode.outputs[0])
        broken = sessions[2]
        assert broken.chunk_index == 0 and not broken.busy and broken.context.kv_cache.num_frames == 0
        failing["on"] = False
        for chunk in range(2):  # the retry and the next chunk equal a run that never failed
            ep = solo[2]
            assert_same_chunk(broken.generate(ep.observations[chunk], ep.instructions[chunk], ep.states[chunk]),
                              ep.outputs[chunk])
        assert omni.engine.stats.failed_chunks == 1


def test_a_non_finite_chunk_is_refused_naming_the_input_and_rolls_back(tiny_dir, solo):
    huge = np.array([1e30, 1e30], dtype=np.float32)  # finite, but far outside the arena: NaN actions
    with _omni(tiny_dir) as omni:
        sessions = [omni.open_session(seed=episode.seed) for episode in solo[:3]]
        with omni.engine.paused():  # batched with healthy sessions
            futures = [session.submit(ep.observations[0], ep.instructions[0], huge if i == 1 else ep.states[0])
                       for i, (session, ep) in enumerate(zip(sessions, solo))]
        for i, (future, episode) in enumerate(zip(futures, solo)):
            if i == 1:
                with pytest.raises(NonFiniteOutputError, match=r"actions .*not finite.*state lies outside \[0, 1\]"):
                    future.result(timeout=60)
                assert future.exception().field == "state"
            else:
                assert_same_chunk(future.result(timeout=60), episode.outputs[0])
        broken, ep = sessions[1], solo[1]
        assert broken.chunk_index == 0 and broken.chunks_served == 0 and broken.context.kv_cache.num_frames == 0
        for chunk in range(2):  # the retry and the next chunk equal a run that never failed
            assert_same_chunk(broken.generate(ep.observations[chunk], ep.instructions[chunk], ep.states[chunk]),
                              ep.outputs[chunk])
        with pytest.raises(NonFiniteOutputError, match="state"):  # the implicit session too
            omni.generate(ep.observations[0], ep.instructions[0], huge)
        assert omni.chunk_index == 0


def test_many_threads_on_their_own_sessions_are_never_silently_wrong(tiny_dir, solo):
    errors: list[BaseException] = []
    with _omni(tiny_dir) as omni:
        def drive(episode) -> None:
            try:
                with omni.open_session(seed=episode.seed) as session:
                    for chunk in range(3):
                        out = session.generate(episode.observations[chunk], episode.instructions[chunk],
                                               episode.states[chunk])
                        assert_same_chunk(out, episode.outputs[chunk])
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        threads = [threading.Thread(target=drive, args=(episode,)) for episode in solo]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors, errors[0]


def test_two_threads_on_one_session_get_a_clear_error(tiny_dir, solo):
    with _omni(tiny_dir) as omni:
        slow_forward(omni, 0.005)
        session = omni.open_session(seed=solo[0].seed)
        ep = solo[0]
        future = session.submit(ep.observations[0], ep.instructions[0], ep.states[0])
        with pytest.raises(SessionBusyError, match=r"already generating a chunk.*open_session"):
            session.generate(ep.observations[0], ep.instructions[0], ep.states[0])
        assert_same_chunk(future.result(timeout=60), ep.outputs[0])  # the first is untouched
        assert_same_chunk(session.generate(ep.observations[1], ep.instructions[1], ep.states[1]), ep.outputs[1])


def test_a_closed_session_refuses_use_and_a_cancelled_chunk_leaves_no_trace(tiny_dir, solo):
    with _omni(tiny_dir) as omni:
        ep = solo[0]
        session = omni.open_session(seed=ep.seed)
        with omni.engine.paused():
            future, request = session._submit(ep.observations[0], ep.instructions[0], ep.states[0], None)
            request.cancel()
        with pytest.raises(CancelledError):
            future.result(timeout=60)
        assert session.chunk_index == 0 and not session.busy
        assert_same_chunk(session.generate(ep.observations[0], ep.instructions[0], ep.states[0]), ep.outputs[0])
        session.close()
        assert session.closed and session.id not in {s.id for s in omni.sessions}
        with pytest.raises(SessionClosedError, match="is closed"):
            session.generate(ep.observations[1], ep.instructions[1], ep.states[1])
        with pytest.raises(SessionClosedError):
            session.start_episode(1)
        session.close()  # idempotent


def test_the_worker_thread_ends_when_idle_and_restarts(tiny_dir, solo):
    with _omni(tiny_dir, idle_shutdown_s=0.05) as omni:
        ep = solo[0]
        session = omni.open_session(seed=ep.seed)
        session.generate(ep.observations[0], ep.instructions[0], ep.states[0])
        for _ in range(200):
            if not omni.engine.running:
                break
            threading.Event().wait(0.01)
        assert not omni.engine.running
        assert_same_chunk(session.generate(ep.observations[1], ep.instructions[1], ep.states[1]), ep.outputs[1])
    assert not omni.engine.running


def test_a_thousand_open_close_cycles_leave_memory_flat(tiny_dir, solo):
    ep = solo[0]
    with _omni(tiny_dir) as omni:
        def cycles(count: int) -> list[weakref.ref]:
            refs = []
            for i in range(count):
                session = omni.open_session(seed=i)
                if i % 250 == 0:  # now and then a real chunk, so that a KV cache is held and freed too
                    session.generate(ep.observations[0], ep.instructions[0], ep.states[0])
                if i % 100 == 0:
                    refs.append(weakref.ref(session.context.kv_cache))
                session.close()
            return refs

        cycles(100)  # warm-up: caches, lazily built tables, the worker thread
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        refs = cycles(1000)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        assert growth < 64 * 1024, f"{growth} bytes more after 1000 open/close cycles"
        assert omni.sessions == [] and all(ref() is None for ref in refs)
