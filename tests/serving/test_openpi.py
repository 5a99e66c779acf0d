"""The openpi websocket protocol of ``stepcache serve``, driven by the real ``openpi-client`` (unmodified).

Every server binds a free loopback port and is stopped by its own handle; every client call runs in a
thread with a timeout (the client's ``recv`` has none of its own).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("openpi_client", reason="openpi-client is installed by scripts/setup.sh (--no-deps)")

import msgpack
import websockets.sync.client as ws_client
from openpi_client import action_chunk_broker, msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed, InvalidStatus

from stepcache.models.dreamzero.model import DreamZeroMiniConfig
from stepcache.models.dreamzero.weights import save_model
from stepcache.models.dreamzero.world import ReachingWorld
from stepcache.omni import Omni
from stepcache.serving.openpi import CLOSE_EXPIRED
from stepcache.serving.server import ServerThread, create_app
from tests.models.dreamzero.tiny import make_tiny_model
from tests.serving.helpers import VARIED, slow_forward

# openpi-client 0.1.2 calls websockets' connect() outside a context manager, which websockets 14+ deprecates
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")

WAIT_S = 30.0
ACTIONS_ATOL = 1e-5  # what the issue asks of the websocket path against in-process sessions


def within(seconds: float, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a thread; fails the test if it has not returned after ``seconds``."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(function, '__name__', function)} did not return within {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def wait_until(condition: Callable[[], bool], seconds: float = WAIT_S) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def ws_url(server: ServerThread, query: str = "") -> str:
    return server.url.replace("http://", "ws://", 1) + "/" + (f"?{query}" if query else "")


def connect(server: ServerThread, query: str = "", **kwargs: Any) -> WebsocketClientPolicy:
    return within(WAIT_S, lambda: WebsocketClientPolicy(ws_url(server, query), **kwargs))


def raw_connect(server: ServerThread, query: str = "") -> Any:
    """A bare websocket connection (for messages openpi-client would not send); metadata already read."""
    connection = ws_client.connect(ws_url(server, query), compression=None, max_size=None, open_timeout=WAIT_S,
                                   close_timeout=5)
    connection.recv(timeout=WAIT_S)
    return connection


def observation(frame: np.ndarray, state: np.ndarray, prompt: str, **extra: Any) -> dict[str, Any]:
    return {"observation/image": frame, "observation/state": state, "prompt": prompt, **extra}


@pytest.fixture(scope="module")
def served(tiny_dir):
    omni = Omni(tiny_dir, cache_backend="step_cache", cache_config=VARIED)
    app = create_app(omni, session_ttl_s=60, max_sessions=8, sweep_interval_s=0.05, max_message_bytes=64_000)
    with ServerThread(app) as server:
        yield server, omni


@pytest.fixture(scope="module")
def reference(tiny_dir):
    with Omni(tiny_dir, cache_backend="step_cache", cache_config=VARIED) as omni:
        yield omni


def run_episode(policy: Any, seed: int, chunks: int, horizon: int, broker: bool) -> list[tuple[Any, ...]]:
    """Closed loop through ``policy``: (frame, state, prompt, actions, stepcache entry) per chunk. With
    ``broker``, ``policy`` is an ActionChunkBroker: one action per call, the chunk executed as a whole."""
    world = ReachingWorld()
    frame, state = world.reset(seed)
    record = []
    for _ in range(chunks):
        obs = observation(frame, state, world.instruction)
        if broker:
            steps = [within(WAIT_S, policy.infer, obs) for _ in range(horizon)]
            actions = np.stack([step["actions"] for step in steps])
            entry = steps[0]["stepcache"]
        else:
            reply = within(WAIT_S, policy.infer, obs)
            actions, entry = reply["actions"], reply["stepcache"]
            assert reply["server_timing"]["infer_ms"] > 0 and reply["server_timing"]["queue_ms"] >= 0
            assert reply["server_timing"]["server_ms"] >= reply["server_timing"]["infer_ms"]
            assert "frames" not in reply
        record.append((frame, state, world.instruction, actions, entry))
        frame, state = world.execute(actions)
    return record


def assert_matches_in_process(record: list[tuple[Any, ...]], reference: Omni, seed: int) -> None:
    with reference.open_session(seed=seed) as session:
        for chunk, (frame, state, prompt, actions, entry) in enumerate(record):
            expected = session.generate(frame, prompt, state)
            assert entry["chunk_index"] == chunk and entry["schedule"] == expected.stats.schedule
            assert entry["dit_forwards"] == expected.stats.dit_forwards
            np.testing.assert_allclose(actions, expected.actions, atol=ACTIONS_ATOL, rtol=0)


def test_closed_loop_episodes_through_the_real_client_equal_in_process_sessions(served, reference):
    server, omni = served
    horizon = omni.pipeline.transformer.config.action_horizon
    records: dict[tuple[int, bool], list] = {}

    def drive(seed: int, broker: bool) -> None:
        client = WebsocketClientPolicy(ws_url(server, f"seed={seed}"))
        assert client.get_server_metadata()["seed"] == seed
        policy = action_chunk_broker.ActionChunkBroker(client, action_horizon=horizon) if broker else client
        records[seed, broker] = run_episode(policy, seed, 3, horizon, broker)
        client._ws.close()

    # two clients at once, one of them through ActionChunkBroker
    threads = [threading.Thread(target=drive, args=args, daemon=True) for args in ((3, False), (4, True))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(4 * WAIT_S)
    assert set(records) == {(3, False), (4, True)}, "a client failed or timed out"
    for (seed, _), record in records.items():
        assert_matches_in_process(record, reference, seed)
    wait_until(lambda: not omni.sessions)  # disconnected clients' sessions are closed


def test_metadata_says_what_to_send_and_what_comes_back(served):
    server, omni = served
    policy = connect(server)
    meta = policy.get_server_metadata()
    config = omni.pipeline.transformer.config
    assert meta["model"] == str(omni.model) and meta["stepcache_version"]
    assert meta["observation"]["observation/image"]["shape"] == [config.frame_size, config.frame_size]
    assert meta["observation"]["observation/state"]["shape"] == [config.state_dim]
    assert meta["observation"]["prompt"]["choices"][0] == "reach the square"
    assert meta["actions"]["shape"] == [config.action_horizon, config.action_dim]
    assert (meta["action_horizon"], meta["action_dim"]) == (config.action_horizon, config.action_dim)
    assert meta["cache_backend"] == "step_cache"
    assert meta["cache_config"]["velocity_sim_thresholds"] == VARIED["velocity_sim_thresholds"]
    assert meta["max_message_bytes"] == 64_000 and meta["session_id"] in {s.id for s in omni.sessions}
    within(WAIT_S, policy._ws.close)


def test_frames_only_when_asked_and_reset_starts_a_new_episode(served, reference):
    server, _ = served
    policy = connect(server, "seed=5")
    world = ReachingWorld()
    frame, state = world.reset(7)
    first = within(WAIT_S, policy.infer, observation(frame, state, world.instruction, return_frames=True))
    assert first["frames"].shape[1:] == frame.shape
    frame, state = world.execute(first["actions"])
    within(WAIT_S, policy.infer, observation(frame, state, world.instruction))
    reset = within(WAIT_S, policy.infer, {"reset": True, "seed": 9})
    assert reset == {"reset": True, "seed": 9, "chunk_index": 0}
    frame, state = world.reset(8)
    again = within(WAIT_S, policy.infer, observation(frame, state, world.instruction))
    with reference.open_session(seed=9) as session:
        expected = session.generate(frame, world.instruction, state)
    assert again["stepcache"]["chunk_index"] == 0 and again["stepcache"]["schedule"] == expected.stats.schedule
    np.testing.assert_allclose(again["actions"], expected.actions, atol=ACTIONS_ATOL, rtol=0)
    # a uint8 camera frame is the same frame divided by 255
    quantised = np.round(frame * 255).astype(np.uint8)
    with reference.open_session(seed=9) as session:
        expected = session.generate(quantised.astype(np.float32) / 255, world.instruction, state)
    within(WAIT_S, policy.infer, {"reset": True, "seed": 9})
    from_uint8 = within(WAIT_S, policy.infer, observation(quantised, state, world.instruction))
    np.testing.assert_allclose(from_uint8["actions"], expected.actions, atol=ACTIONS_ATOL, rtol=0)
    within(WAIT_S, policy._ws.close)


def _packed_array(changes: dict[bytes, Any]) -> dict[bytes, Any]:
    return {b"__ndarray__": True, b"data": np.zeros(2, np.float32).tobytes(), b"dtype": "<f4", b"shape": [2],
            **changes}


GOOD = ReachingWorld().reset(0)
BAD_REQUESTS = {
    "missing state": ({"observation/image": GOOD[0], "prompt": "reach the ring"}, "observation/state"),
    "missing image": ({"observation/state": GOOD[1], "prompt": "reach the ring"}, "observation/image"),
    "missing prompt": ({"observation/image": GOOD[0], "observation/state": GOOD[1]}, "prompt"),
    "unknown key": ({**observation(*GOOD, "reach the ring"), "observation/wrist": GOOD[0]}, "observation/wrist"),
    "image int32": (observation(GOOD[0].astype(np.int32), GOOD[1], "reach the ring"), "observation/image"),
    "state int64": (observation(GOOD[0], np.array([0, 1]), "reach the ring"), "observation/state"),
    "state a list": (observation(GOOD[0], [0.5, 0.5], "reach the ring"), "observation/state"),
    "image shape": (observation(GOOD[0][:16], GOOD[1], "reach the ring"), "observation/image"),
    "image rgb": (observation(np.stack([GOOD[0]] * 3, -1), GOOD[1], "reach the ring"), "observation/image"),
    "state shape": (observation(GOOD[0], np.zeros(3, np.float32), "reach the ring"), "observation/state"),
    "state nan": (observation(GOOD[0], np.array([np.nan, 0.5], np.float32), "reach the ring"), "observation/state"),
    "image inf": (observation(np.full_like(GOOD[0], np.inf), GOOD[1], "reach the ring"), "observation/image"),
    "state out of range": (observation(GOOD[0], np.array([1e30, 0.5]), "reach the ring"), "observation/state"),
    "prompt unknown": (observation(*GOOD, "fly"), "prompt"),
    "prompt bytes": (observation(*GOOD, b"reach the ring"), "prompt"),
    "return_frames string": (observation(*GOOD, "reach the ring", return_frames="yes"), "return_frames"),
    "reset not true": ({"reset": 1}, "reset"),
    "reset bad seed": ({"reset": True, "seed": -3}, "seed"),
}
RAW_REQUESTS = {  # packed by hand: what openpi-client would never send
    "not msgpack": (b"\xc1\xc1 not msgpack", "not one msgpack value"),
    "a list": (msgpack.packb([1, 2]), "msgpack map"),
    "trailing bytes": (msgpack.packb({"prompt": "x"}) + b"\x00", "not one msgpack value"),
    "object dtype": (msgpack.packb({**observation(*GOOD, "reach the ring"),
                                    "observation/state": _packed_array({b"dtype": "|O"})},
                                   default=msgpack_numpy.pack_array), "observation/state"),
    "short data": (msgpack.packb({**observation(*GOOD, "reach the ring"),
                                  "observation/state": _packed_array({b"shape": [3]})},
                                 default=msgpack_numpy.pack_array), "observation/state"),
    "huge shape": (msgpack.packb({**observation(*GOOD, "reach the ring"),
                                  "observation/state": _packed_array({b"shape": [2**40, 2**40]})},
                                 default=msgpack_numpy.pack_array), "observation/state"),
    "text frame": ("hello", "binary msgpack"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_each_bad_request_gets_an_error_naming_the_key_and_the_session_stays_usable(served, reference, name):
    server, _ = served
    request, key = BAD_REQUESTS[name]
    policy = connect(server, "seed=2")
    with pytest.raises(RuntimeError, match="Error in inference server") as refused:
        within(WAIT_S, policy.infer, request)
    assert key in str(refused.value) and "Traceback" not in str(refused.value)
    reply = within(WAIT_S, policy.infer, observation(*GOOD, "reach the ring"))
    with reference.open_session(seed=2) as session:  # nothing happened before: the first chunk, as a fresh session's
        expected = session.generate(*GOOD[:1], "reach the ring", GOOD[1])
    assert reply["stepcache"]["chunk_index"] == 0 and reply["stepcache"]["schedule"] == expected.stats.schedule
    np.testing.assert_allclose(reply["actions"], expected.actions, atol=ACTIONS_ATOL, rtol=0)
    within(WAIT_S, policy._ws.close)


@pytest.mark.parametrize("name", list(RAW_REQUESTS))
def test_messages_that_are_not_openpi_requests_get_an_error_and_the_session_stays_usable(served, name):
    server, _ = served
    raw, expected = RAW_REQUESTS[name]
    with raw_connect(server) as connection:
        connection.send(raw)
        answer = connection.recv(timeout=WAIT_S)
        assert isinstance(answer, str) and expected in answer and "Traceback" not in answer
        connection.send(msgpack_numpy.packb(observation(*GOOD, "reach the ring")))
        assert msgpack_numpy.unpackb(connection.recv(timeout=WAIT_S))["actions"].shape == (8, 2)


def test_an_oversized_message_closes_its_connection_with_a_reason_and_frees_only_its_session(served):
    server, omni = served
    healthy = connect(server, "seed=1")
    before = within(WAIT_S, healthy.infer, observation(*GOOD, "reach the ring"))
    with raw_connect(server) as connection:
        wait_until(lambda: len(omni.sessions) == 2)
        connection.send(b"\x00" * 100_000)  # the limit is 64,000
        with pytest.raises(ConnectionClosed) as closed:
            connection.recv(timeout=WAIT_S)
    assert closed.value.rcvd.code == 1009 and "exceeds limit of 64000 bytes" in closed.value.rcvd.reason
    wait_until(lambda: len(omni.sessions) == 1)
    after = within(WAIT_S, healthy.infer, observation(*GOOD, "reach the ring"))
    assert after["stepcache"]["chunk_index"] == before["stepcache"]["chunk_index"] + 1
    within(WAIT_S, healthy._ws.close)


def test_a_bad_query_or_a_full_server_refuses_the_connection(served):
    server, omni = served
    for query, status in (("sed=3", 400), ("seed=-1", 400), ("seed=1.5", 400), ("seed=99999999999999999999", 400)):
        with pytest.raises(InvalidStatus) as refused:
            connect(server, query)
        assert refused.value.response.status_code == status
        assert query.split("=")[0] in refused.value.response.body.decode()
    assert not omni.sessions
    policies = [connect(server) for _ in range(8)]
    with pytest.raises(InvalidStatus) as refused:
        connect(server)
    assert refused.value.response.status_code == 503 and b"maximum of 8" in refused.value.response.body
    for policy in policies:
        within(WAIT_S, policy._ws.close)
    wait_until(lambda: not omni.sessions)


def test_a_client_that_disconnects_mid_chunk_frees_its_session_and_others_are_unchanged(tiny_dir, reference):
    omni = Omni(tiny_dir, cache_backend="step_cache", cache_config=VARIED)
    slow_forward(omni, 0.02)
    with ServerThread(create_app(omni, session_ttl_s=60)) as server:
        healthy = connect(server, "seed=6")
        connection = raw_connect(server, "seed=6")
        wait_until(lambda: len(omni.sessions) == 2)
        leaving = next(s for s in omni.sessions if s.id != healthy.get_server_metadata()["session_id"])
        connection.send(msgpack_numpy.packb(observation(*GOOD, "reach the ring")))
        wait_until(lambda: leaving.busy)
        connection.close()
        wait_until(lambda: leaving.closed and len(omni.sessions) == 1)  # freed while its chunk is in flight
        wait_until(lambda: not leaving.busy)
        record = run_episode(healthy, 6, 2, 8, broker=False)
        assert_matches_in_process(record, reference, 6)
        within(WAIT_S, healthy._ws.close)
        wait_until(lambda: not omni.sessions)


def test_an_idle_session_expires_and_its_connection_closes_with_the_reason(tiny_dir):
    omni = Omni(tiny_dir, cache_backend=None)
    with ServerThread(create_app(omni, session_ttl_s=0.3, sweep_interval_s=0.05)) as server:
        policy = connect(server)
        within(WAIT_S, policy.infer, observation(*GOOD, "reach the ring"))
        wait_until(lambda: not omni.sessions)
        with pytest.raises(ConnectionClosed) as closed:
            within(WAIT_S, policy._ws.recv)
        assert closed.value.rcvd.code == CLOSE_EXPIRED and "expired after 0.3 s idle" in closed.value.rcvd.reason


def test_an_api_key_is_checked_before_any_work_on_both_transports(tiny_dir):
    omni = Omni(tiny_dir, cache_backend=None)
    key = "k3y-for-the-test"
    with ServerThread(create_app(omni, api_key=key)) as server:
        for wrong in (None, "not-the-key"):
            with pytest.raises(InvalidStatus) as refused:
                connect(server, api_key=wrong)
            assert refused.value.response.status_code == 401 and b"Api-Key" in refused.value.response.body
        assert not omni.sessions and omni.engine.stats.chunks == 0
        with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
            assert client.post("/sessions", json={}).status_code == 401
            assert client.get("/health", headers={"Authorization": "Api-Key nope"}).status_code == 401
            assert client.get("/health", headers={"Authorization": f"Api-Key {key}"}).json()["status"] == "ok"
        assert not omni.sessions
        policy = connect(server, api_key=key)
        assert within(WAIT_S, policy.infer, observation(*GOOD, "reach the ring"))["actions"].shape == (8, 2)
        within(WAIT_S, policy._ws.close)


def test_the_shapes_come_from_the_loaded_model(tmp_path):
    config = DreamZeroMiniConfig(hidden_size=32, num_layers=2, num_heads=2, timestep_frequencies=16, frame_size=16,
                                 action_horizon=4, action_dim=3)  # state_dim stays 2: the model reads it as a position
    model = type(make_tiny_model())(config).eval()
    omni = Omni(save_model(model, tmp_path / "other"), cache_backend=None)
    with ServerThread(create_app(omni)) as server:
        policy = connect(server)
        meta = policy.get_server_metadata()
        assert meta["observation"]["observation/image"]["shape"] == [16, 16]
        assert meta["observation"]["observation/state"]["shape"] == [config.state_dim]
        assert meta["actions"]["shape"] == [4, 3]
        reply = within(WAIT_S, policy.infer, observation(np.zeros((16, 16), np.float32), np.full(2, 0.5, np.float32),
                                                         "reach the ring"))
        assert reply["actions"].shape == (4, 3)
        with pytest.raises(RuntimeError, match=r"observation/image must have shape \[16, 16\], got \[32, 32\]"):
            within(WAIT_S, policy.infer, observation(*GOOD, "reach the ring"))
        within(WAIT_S, policy._ws.close)


def test_a_fuzz_of_random_messages_leaves_the_server_up_and_healthy_sessions_unchanged(served, reference):
    server, _ = served
    rng = np.random.default_rng(0)
    healthy = connect(server, "seed=11")
    record_before = run_episode(healthy, 11, 1, 8, broker=False)
    with raw_connect(server) as connection:
        for index in range(60):
            if index % 2:
                raw = rng.bytes(int(rng.integers(0, 200)))
            else:
                keys = ["observation/image", "observation/state", "prompt", "return_frames", "reset", "seed", "x"]
                values = [GOOD[0], GOOD[1], "reach the ring", True, None, -1, 1e308, "a", b"b", [1, 2], {"k": 1},
                          np.full(2, np.nan), rng.random((32, 32)).astype(np.float16)]
                message = {str(rng.choice(keys)): values[int(rng.integers(len(values)))]
                           for _ in range(int(rng.integers(0, 4)))}
                raw = msgpack_numpy.packb(message)
            connection.send(raw)
            answer = connection.recv(timeout=WAIT_S)
            if isinstance(answer, str):
                assert "Traceback" not in answer and answer
    record_after = run_episode(healthy, 11, 1, 8, broker=False)
    assert_matches_in_process(record_before, reference, 11)
    assert record_after[0][4]["chunk_index"] == 1
    within(WAIT_S, healthy._ws.close)
