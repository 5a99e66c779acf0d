"""The policy server over real HTTP: uvicorn on a free loopback port, httpx as the client."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from stepcache.models.dreamzero.world import ReachingWorld
from stepcache.omni import Omni
from stepcache.serving.server import ServerThread, create_app
from tests.serving.helpers import VARIED, slow_forward

TIMEOUT = httpx.Timeout(30.0)


@pytest.fixture(scope="module")
def served(tiny_dir):
    omni = Omni(tiny_dir, cache_backend="step_cache", cache_config=VARIED)
    app = create_app(omni, session_ttl_s=60, max_sessions=6, sweep_interval_s=0.05)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client


def _observation(seed: int = 0, **changes):
    world = ReachingWorld()
    frame, state = world.reset(seed)
    body = {"frame": frame.tolist(), "instruction": world.instruction, "state": state.tolist()}
    body.update(changes)
    return body


def test_happy_path_open_send_observations_get_actions_and_stats_close(served, tiny_dir):
    client = served
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["cache_backend"] == "step_cache" and health["decision"] == "per_session"
    opened = client.post("/sessions", json={"seed": 3})
    assert opened.status_code == 201
    session_id = opened.json()["session_id"]
    assert opened.json()["seed"] == 3 and client.get(f"/sessions/{session_id}").json()["chunk_index"] == 0
    reference = Omni(tiny_dir, cache_backend="step_cache", cache_config=VARIED).open_session(seed=3)
    world = ReachingWorld()
    frame, state = world.reset(0)
    for chunk in range(3):
        body = {"frame": frame.tolist(), "instruction": world.instruction, "state": state.tolist(),
                "return_frames": chunk == 1}
        response = client.post(f"/sessions/{session_id}/chunks", json=body)
        assert response.status_code == 200, response.text
        data = response.json()
        expected = reference.generate(frame, world.instruction, state)
        np.testing.assert_allclose(np.array(data["actions"]), expected.actions, atol=1e-5, rtol=0)
        stats = data["stats"]
        assert stats["schedule"] == expected.stats.schedule and stats["dit_forwards"] == expected.stats.dit_forwards
        assert stats["chunk_index"] == chunk and stats["latency_s"] > 0 and stats["queue_s"] >= 0
        assert stats["server_s"] >= stats["latency_s"] and stats["session_id"] == session_id
        # the documented trace: the same decisions (similarities agree to float32 rounding, as the actions do)
        decisions = [(r["step"], r["ran"], r["reason"]) for r in stats["trace"]]
        assert decisions == [(r["step"], r["ran"], r["reason"]) for r in expected.stats.trace]
        assert len(decisions) == len(stats["schedule"])
        if chunk == 1:
            np.testing.assert_allclose(np.array(data["frames"]), expected.frames, atol=1e-5, rtol=0)
        else:
            assert data["frames"] is None
        frame, state = world.execute(np.array(data["actions"]))
    info = client.get(f"/sessions/{session_id}").json()
    assert info["chunk_index"] == 3 and info["bytes"] > 0 and not info["busy"]
    assert client.post(f"/sessions/{session_id}/reset", json={"seed": 4}).json()["chunk_index"] == 0
    assert client.get("/health").json()["engine"]["chunks"] >= 3
    assert client.delete(f"/sessions/{session_id}").status_code == 204
    assert client.get(f"/sessions/{session_id}").status_code == 404


@pytest.mark.parametrize(("changes", "field"), [
    ({"frame": [[0.0] * 32] * 5}, "frame"),
    ({"frame": [[2.0] * 32] * 32}, "frame"),
    ({"frame": "pixels"}, "frame"),
    ({"frame": None}, "frame"),
    ({"instruction": "fly"}, "instruction"),
    ({"instruction": 7}, "instruction"),
    ({"instruction": True}, "instruction"),
    ({"instruction": None}, "instruction"),
    ({"state": [0.5]}, "state"),
    ({"state": "here"}, "state"),
    ({"state": [0.5, float("inf")]}, "state"),
    ({"return_frames": "yes"}, "return_frames"),
    ({"colour": "red"}, "colour"),
])
def test_each_bad_field_gets_a_422_naming_it(served, changes, field):
    client = served
    session_id = client.post("/sessions", json={}).json()["session_id"]
    try:
        body = _observation(**changes)
        if "state" in changes and isinstance(changes["state"], list) and not np.isfinite(changes["state"]).all():
            import json

            response = client.post(f"/sessions/{session_id}/chunks", content=json.dumps(body),
                                   headers={"content-type": "application/json"})
        else:
            response = client.post(f"/sessions/{session_id}/chunks", json=body)
        assert response.status_code == 422, response.text
        assert field in response.json()["detail"][0]["loc"]
        assert client.get(f"/sessions/{session_id}").json()["chunk_index"] == 0  # nothing happened
    finally:
        client.delete(f"/sessions/{session_id}")


@pytest.mark.parametrize("body", [{"seed": -1}, {"seed": 1.5}, {"seed": "one"}, {"seed": True}, {"sede": 1}])
def test_a_bad_seed_gets_a_422_naming_it(served, body):
    client = served
    response = client.post("/sessions", json=body)
    assert response.status_code == 422
    assert next(iter(body)) in response.json()["detail"][0]["loc"]


def test_a_missing_field_or_a_body_that_is_not_json_gets_a_422(served):
    client = served
    session_id = client.post("/sessions", json={}).json()["session_id"]
    body = _observation()
    del body["state"]
    response = client.post(f"/sessions/{session_id}/chunks", json=body)
    assert response.status_code == 422 and "state" in response.json()["detail"][0]["loc"]
    response = client.post(f"/sessions/{session_id}/chunks", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert response.status_code == 422
    client.delete(f"/sessions/{session_id}")


def test_an_unknown_session_is_a_404(served):
    client = served
    assert client.post("/sessions/nope/chunks", json=_observation()).status_code == 404
    assert client.get("/sessions/nope").status_code == 404
    assert client.delete("/sessions/nope").status_code == 404
    response = client.post("/sessions/nope/reset", json={})
    assert response.status_code == 404 and "unknown session 'nope'" in response.json()["detail"]


def test_sessions_beyond_the_maximum_get_a_503(served):
    client = served
    opened = [client.post("/sessions", json={}) for _ in range(7)]
    try:
        assert [r.status_code for r in opened[:6]] == [201] * 6
        assert opened[6].status_code == 503 and "maximum of 6" in opened[6].json()["detail"]
    finally:
        for response in opened:
            if response.status_code == 201:
                client.delete(f"/sessions/{response.json()['session_id']}")


def test_idle_sessions_expire(tiny_dir):
    omni = Omni(tiny_dir, cache_backend=None)
    app = create_app(omni, session_ttl_s=0.2, sweep_interval_s=0.05)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        session_id = client.post("/sessions", json={}).json()["session_id"]
        assert client.post(f"/sessions/{session_id}/chunks", json=_observation()).status_code == 200
        deadline = time.monotonic() + 10
        while client.get(f"/sessions/{session_id}").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        response = client.post(f"/sessions/{session_id}/chunks", json=_observation())
        assert response.status_code == 404 and "expired after 0.2 s idle" in response.json()["detail"]
        assert client.get("/health").json()["sessions"] == 0


def test_a_second_chunk_on_a_busy_session_is_a_409(tiny_dir):
    omni = Omni(tiny_dir, cache_backend=None)
    slow_forward(omni, 0.01)
    with ServerThread(create_app(omni)) as server, httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        session_id = client.post("/sessions", json={}).json()["session_id"]
        responses = []
        first = threading.Thread(target=lambda: responses.append(
            client.post(f"/sessions/{session_id}/chunks", json=_observation())))
        first.start()
        deadline = time.monotonic() + 10
        while not client.get(f"/sessions/{session_id}").json()["busy"] and time.monotonic() < deadline:
            time.sleep(0.005)
        second = client.post(f"/sessions/{session_id}/chunks", json=_observation())
        first.join(30)
        assert second.status_code == 409 and "one chunk at a time" in second.json()["detail"]
        assert responses[0].status_code == 200


def test_a_server_side_failure_in_one_session_never_corrupts_another(tiny_dir):
    marker = [0.123456, 0.654321]
    omni = Omni(tiny_dir, cache_backend="step_cache", cache_config=VARIED)
    model = omni.pipeline.transformer
    original = model.forward
    failing = {"on": True}

    def forward(video, actions, state, *args, **kwargs):
        if failing["on"] and bool((state == np.float32(2) * np.array(marker, dtype=np.float32) - 1).all(1).any()):
            raise RuntimeError("injected failure")
        return original(video, actions, state, *args, **kwargs)

    model.forward = forward
    with ServerThread(create_app(omni)) as server, httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        broken, healthy, fresh = (client.post("/sessions", json={"seed": 5}).json()["session_id"]
                                  for _ in range(3))
        results = {}

        def send(name: str, session_id: str, body: dict) -> None:
            results[name] = client.post(f"/sessions/{session_id}/chunks", json=body)

        threads = [threading.Thread(target=send, args=("broken", broken, _observation(1, state=marker))),
                   threading.Thread(target=send, args=("healthy", healthy, _observation(2)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert results["broken"].status_code == 500
        assert "injected failure" in results["broken"].json()["detail"]
        assert "retried" in results["broken"].json()["detail"]
        assert results["healthy"].status_code == 200
        alone = Omni(tiny_dir, cache_backend="step_cache", cache_config=VARIED).open_session(seed=5)
        world = ReachingWorld()
        frame, state = world.reset(2)
        expected = alone.generate(frame, world.instruction, state)
        np.testing.assert_allclose(np.array(results["healthy"].json()["actions"]), expected.actions, atol=1e-5)
        failing["on"] = False  # the broken session retries: as if the failure never happened
        retried = client.post(f"/sessions/{broken}/chunks", json=_observation(1, state=marker)).json()
        clean = client.post(f"/sessions/{fresh}/chunks", json=_observation(1, state=marker)).json()
        assert retried["actions"] == clean["actions"] and retried["stats"]["chunk_index"] == 0


def test_responses_are_not_held_back_by_nagles_algorithm(served):
    """Without TCP_NODELAY on the server's sockets every response waits for the client's delayed ACK
    (about 40 ms on Linux)."""
    client = served
    times = []
    for _ in range(10):
        start = time.perf_counter()
        client.get("/health")
        times.append(time.perf_counter() - start)
    assert float(np.median(times)) < 0.03
