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


# -- hostile and malformed requests ------------------------------------------------------------------


def _raw(client, url: str, text: str):
    return client.post(url, content=text.encode(), headers={"content-type": "application/json"})


def _chunk_text(**raw_fields: str) -> str:
    """A chunk request as JSON text, with some fields replaced by raw JSON tokens (NaN, 1e999, ...)."""
    import json

    body = _observation()
    parts = [f'"{key}": {raw_fields.pop(key) if key in raw_fields else json.dumps(value)}'
             for key, value in body.items()]
    parts += [f'"{key}": {token}' for key, token in raw_fields.items()]
    return "{" + ", ".join(parts) + "}"


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("field", ["frame", "state", "instruction", "return_frames"])
def test_nan_or_infinity_in_a_chunk_is_a_422_naming_the_field(served, token, field):
    client = served
    session_id = client.post("/sessions", json={}).json()["session_id"]
    try:
        rows = ["[" + ", ".join([token] + ["0.0"] * 31) + "]"] + ["[" + ", ".join(["0.0"] * 32) + "]"] * 31
        value = {"frame": "[" + ", ".join(rows) + "]", "state": f"[0.5, {token}]"}.get(field, token)
        response = _raw(client, f"/sessions/{session_id}/chunks", _chunk_text(**{field: value}))
        assert response.status_code == 422, response.text
        assert field in response.json()["detail"][0]["loc"]
        assert client.get(f"/sessions/{session_id}").json()["chunk_index"] == 0
    finally:
        client.delete(f"/sessions/{session_id}")


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1" * 5000, "-" + "9" * 5000])
def test_nan_infinity_or_a_huge_seed_at_open_and_reset_is_a_422_naming_seed(served, token):
    client = served
    response = _raw(client, "/sessions", f'{{"seed": {token}}}')
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "seed"] and len(response.text) < 2000
    session_id = client.post("/sessions", json={}).json()["session_id"]
    try:
        response = _raw(client, f"/sessions/{session_id}/reset", f'{{"seed": {token}}}')
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "seed"]
    finally:
        client.delete(f"/sessions/{session_id}")


@pytest.mark.parametrize(("changes", "field"), [
    ({"state": ["0.5", True]}, "state"),
    ({"state": [0.5, "0.5"]}, "state"),
    ({"state": [True, 0.5]}, "state"),
    ({"frame": [["0.5"] * 32] * 32}, "frame"),
    ({"frame": [[False] * 32] * 32}, "frame"),
])
def test_frame_and_state_are_strict_numbers(served, changes, field):
    client = served
    session_id = client.post("/sessions", json={}).json()["session_id"]
    try:
        response = client.post(f"/sessions/{session_id}/chunks", json=_observation(**changes))
        assert response.status_code == 422, response.text
        assert field in response.json()["detail"][0]["loc"]
    finally:
        client.delete(f"/sessions/{session_id}")


def test_a_422_lists_a_bounded_number_of_errors(served):
    client = served
    session_id = client.post("/sessions", json={}).json()["session_id"]
    try:
        response = client.post(f"/sessions/{session_id}/chunks", json=_observation(frame=[0.0] * 1024))
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert "frame" in detail[0]["loc"] and len(detail) <= 11 and len(response.content) < 4000
        assert "1014 more errors" in detail[-1]["msg"]
    finally:
        client.delete(f"/sessions/{session_id}")


def test_a_state_outside_the_trained_range_is_refused_naming_it(served):
    client = served
    session_id = client.post("/sessions", json={}).json()["session_id"]
    try:
        response = client.post(f"/sessions/{session_id}/chunks", json=_observation(state=[1e30, 1e30]))
        assert response.status_code == 422 and "state" in response.json()["detail"][0]["loc"]
        assert "[0.0, 1.0]" in response.json()["detail"][0]["msg"]
        assert client.get(f"/sessions/{session_id}").json()["chunk_index"] == 0
        assert client.get("/health").json()["inputs"]["state"] == {"shape": [2], "range": [0.0, 1.0]}
    finally:
        client.delete(f"/sessions/{session_id}")


def test_a_non_finite_chunk_is_a_500_never_served_and_rolled_back(tiny_dir):
    omni = Omni(tiny_dir, cache_backend=None)
    model = omni.pipeline.transformer
    original = model.forward
    poisoned = {"on": True}

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        if poisoned["on"] and hasattr(out, "action"):
            out.action = out.action * float("nan")
        return out

    model.forward = forward
    with ServerThread(create_app(omni)) as server, httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        session_id = client.post("/sessions", json={}).json()["session_id"]
        response = client.post(f"/sessions/{session_id}/chunks", json=_observation())
        assert response.status_code == 500 and "not finite" in response.json()["detail"]
        assert client.get(f"/sessions/{session_id}").json()["chunk_index"] == 0
        poisoned["on"] = False
        response = client.post(f"/sessions/{session_id}/chunks", json=_observation())
        assert response.status_code == 200 and response.json()["stats"]["chunk_index"] == 0


def test_the_api_schema_still_describes_the_bodies(served):
    paths = served.get("/openapi.json").json()["paths"]
    chunk = paths["/sessions/{session_id}/chunks"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"frame", "instruction", "state", "return_frames"} <= set(chunk["properties"])
    assert "seed" in paths["/sessions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]


def test_an_unknown_session_404_says_why_and_what_to_do(served):
    detail = served.get("/sessions/gone").json()["detail"]
    assert "closed, expired, or lost when the server restarted" in detail and "POST /sessions" in detail


@pytest.fixture()
def limited(tiny_dir, monkeypatch):
    """A server refusing bodies above 10,000 bytes, and a count of the bodies it parsed."""
    from stepcache.serving import server as server_module

    parsed = []
    original = server_module._parse_json

    def counting(raw):
        parsed.append(len(raw))
        return original(raw)

    monkeypatch.setattr(server_module, "_parse_json", counting)
    omni = Omni(tiny_dir, cache_backend=None)
    with ServerThread(create_app(omni, max_request_bytes=10_000)) as server, \
            httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client, parsed


def test_an_oversized_body_is_a_413_before_it_is_parsed(limited):
    client, parsed = limited
    session_id = client.post("/sessions", json={}).json()["session_id"]
    parsed.clear()
    assert client.post(f"/sessions/{session_id}/chunks", json=_observation()).status_code == 200  # ~5 KB
    assert len(parsed) == 1
    big = _observation(padding="x" * 20_000)
    for url in (f"/sessions/{session_id}/chunks", "/sessions", f"/sessions/{session_id}/reset"):
        response = client.post(url, json=big)
        assert response.status_code == 413 and "10000 bytes" in response.json()["detail"], response.text
    assert len(parsed) == 1


def test_an_oversized_streamed_body_without_content_length_is_a_413(limited):
    client, parsed = limited
    session_id = client.post("/sessions", json={}).json()["session_id"]
    parsed.clear()

    def body():
        yield b'{"frame": "'
        for _ in range(1000):  # 10 MB, sent without a Content-Length (chunked)
            yield b"x" * 10_000
        yield b'"}'

    response = client.post(f"/sessions/{session_id}/chunks", content=body(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413 and not parsed
    assert client.get(f"/sessions/{session_id}").json()["chunk_index"] == 0


def test_reading_a_body_stops_as_soon_as_it_passes_the_limit():
    import asyncio

    from stepcache.serving.server import RequestTooLarge, _read_body

    consumed = []

    class Streamed:  # what the handler sees of a chunked request: no Content-Length
        def __init__(self) -> None:
            self.headers: dict[str, str] = {}

        async def stream(self):
            for index in range(1000):
                consumed.append(index)
                yield b"x" * 10_000

    with pytest.raises(RequestTooLarge):
        asyncio.run(_read_body(Streamed(), 25_000))
    assert len(consumed) == 3  # 30,000 bytes read of 10 MB
