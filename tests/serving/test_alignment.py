"""Aligned computed steps: the engine's bounded admission wait (``EngineConfig.admission_wait_s``)."""

from __future__ import annotations

import time

import pytest

from stepcache.omni import Omni
from stepcache.serving import EngineConfig
from tests.serving.helpers import assert_same_chunk, record_episode

STEP_S = 0.02  # every engine step made this slow, so that a chunk (16 steps) is in flight ~0.3 s


def _omni(tiny_dir, wait_s: float) -> Omni:
    omni = Omni(tiny_dir, cache_backend="step_cache", cache_config="fast",
                engine_config={"admission_wait_s": wait_s})
    omni.engine.step_hook = lambda: time.sleep(STEP_S)
    return omni


@pytest.fixture(scope="module")
def alone(tiny_dir):
    """Three episodes of 2 chunks with the planned "fast" preset, each run alone."""
    with Omni(tiny_dir, cache_backend="step_cache", cache_config="fast") as omni:
        return [record_episode(omni, seed, chunks=2) for seed in range(3)]


def _submit(session, episode, chunk):
    return session.submit(episode.observations[chunk], episode.instructions[chunk], episode.states[chunk])


def test_a_chunk_arriving_mid_cohort_waits_for_the_boundary_and_its_outputs_do_not_change(tiny_dir, alone):
    """B and C arrive while A is in flight: they wait for A to end and for A's robot to come back, then
    the three start together, share every forward, and each gets the outputs it gets alone."""
    with _omni(tiny_dir, wait_s=30.0) as omni:
        sessions = [omni.open_session(seed=episode.seed) for episode in alone]
        first = _submit(sessions[0], alone[0], 0)
        time.sleep(4 * STEP_S)  # A is a few steps in
        later = [_submit(session, episode, 0) for session, episode in zip(sessions[1:], alone[1:])]
        a = first.result(timeout=60)
        assert set(a.stats.forward_batch_sizes) == {1}  # nobody joined A mid-chunk
        assert_same_chunk(a, alone[0].outputs[0])
        time.sleep(0.1)  # A's robot takes a while to come back: B and C wait for it
        a_next = _submit(sessions[0], alone[0], 1)
        b, c = (future.result(timeout=60) for future in later)
        for out, episode in zip((b, c), alone[1:]):
            assert out.stats.queue_s > 0.2  # through A's chunk and the gathering
            assert set(out.stats.forward_batch_sizes) == {3}  # aligned: every computed step shared
            assert_same_chunk(out, episode.outputs[0])
        assert_same_chunk(a_next.result(timeout=60), alone[0].outputs[1])


def test_the_admission_wait_is_bounded(tiny_dir, alone):
    """With a wait shorter than A's chunk, B joins A mid-chunk once it has waited the bound."""
    bound = 0.1
    with _omni(tiny_dir, wait_s=bound) as omni:
        a_session, b_session = omni.open_session(seed=0), omni.open_session(seed=1)
        first = _submit(a_session, alone[0], 0)
        a_done: list[float] = []
        first.add_done_callback(lambda _: a_done.append(time.perf_counter()))
        time.sleep(2 * STEP_S)
        b_sent = time.perf_counter()
        second = _submit(b_session, alone[1], 0)
        a, b = first.result(timeout=60), second.result(timeout=60)
        assert bound <= b.stats.queue_s <= bound + 0.25  # at most a step (and scheduling) past the bound
        assert b_sent + b.stats.queue_s < a_done[0]  # admitted while A was in flight
        assert_same_chunk(a, alone[0].outputs[0])
        assert_same_chunk(b, alone[1].outputs[0])


def test_at_a_boundary_the_cohort_gathers_the_chunks_that_just_finished(tiny_dir, alone):
    """Two chunks finished together; their next chunks arrive 0.15 s apart: the first waits for the
    second (they were a cohort), and they start together; with nobody coming back, the gathering ends
    at the bound."""
    with _omni(tiny_dir, wait_s=5.0) as omni:
        sessions = [omni.open_session(seed=episode.seed) for episode in alone[:2]]
        with omni.engine.paused():
            futures = [_submit(session, episode, 0) for session, episode in zip(sessions, alone)]
        for future in futures:
            future.result(timeout=60)
        early = _submit(sessions[0], alone[0], 1)
        time.sleep(0.15)
        late = _submit(sessions[1], alone[1], 1)
        outs = [early.result(timeout=60), late.result(timeout=60)]
        assert outs[0].stats.queue_s >= 0.1
        for out, episode in zip(outs, alone):
            assert set(out.stats.forward_batch_sizes) == {2}
            assert_same_chunk(out, episode.outputs[1])
    with _omni(tiny_dir, wait_s=0.3) as omni:
        sessions = [omni.open_session(seed=episode.seed) for episode in alone[:2]]
        with omni.engine.paused():
            futures = [_submit(session, episode, 0) for session, episode in zip(sessions, alone)]
        for future in futures:
            future.result(timeout=60)
        lone = _submit(sessions[0], alone[0], 1).result(timeout=60)  # the other robot never comes back
        assert 0.25 <= lone.stats.queue_s <= 0.3 + 0.25


def test_a_lone_session_never_waits(tiny_dir, alone):
    """One robot in closed loop: each chunk finds the one that finished and starts at once."""
    with _omni(tiny_dir, wait_s=5.0) as omni, omni.open_session(seed=0) as session:
        for chunk in range(2):
            out = _submit(session, alone[0], chunk).result(timeout=60)
            assert out.stats.queue_s < 0.05
            assert_same_chunk(out, alone[0].outputs[chunk])


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), True, "1"])
def test_the_admission_wait_is_checked(value):
    with pytest.raises(ValueError, match="admission_wait_s"):
        EngineConfig(admission_wait_s=value)
