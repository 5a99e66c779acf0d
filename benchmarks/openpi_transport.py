"""The openpi websocket transport of ``stepcache serve``: its overhead for a DROID-sized observation, and a fuzz.

``--overhead N``: serialisation + transport cost of one request/reply on loopback for a DROID-sized
observation (three 180x320x3 uint8 camera images, an 8-value state, a prompt), over the websocket
(openpi-client's ``WebsocketClientPolicy``, msgpack) and over JSON HTTP (httpx, the JSON text of the
same arrays), N requests each. The bundled model does not take DROID inputs, so the server here is a
uvicorn app made of the serving code's own decoding and checks (``openpi.unpack_request`` and
``chunks.checked_array`` per key; the HTTP side ``server._parse_json`` then the same checks, without
pydantic's per-element validation, which would only slow JSON further) that answers an action chunk
of zeros instead of running a model: what is timed is everything but the inference.

``--fuzz N``: N random messages (random byte strings, random dicts of real and made-up keys with
arrays of random dtype and shape, NaN, strings, oversized messages) against a live ``stepcache serve``
process on the bundled model, while two healthy robots run episodes; reports how each was answered,
checks that no reply holds a traceback, that the server is up afterwards and that the healthy
sessions' actions equal in-process sessions fed the same inputs.

    .venv/bin/python benchmarks/openpi_transport.py --overhead 200 --fuzz 1000 --out ot
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI, Request, WebSocket  # at module level: FastAPI resolves the handlers' annotations here

from stepcache.tools.common import command_line

warnings.filterwarnings("ignore", "connect\\(\\) must be used", DeprecationWarning)  # openpi-client 0.1.2's connect

DROID_IMAGES = ("observation/exterior_image_1_left", "observation/exterior_image_2_left",
                "observation/wrist_image_left")
DROID_IMAGE_SHAPE = (180, 320, 3)
DROID_STATE_SHAPE = (8,)
DROID_ACTION_SHAPE = (24, 32)  # DreamZero's DROID action chunk: horizon 24, action dim 32


def droid_observation(rng: np.random.Generator) -> dict[str, Any]:
    obs: dict[str, Any] = {key: rng.integers(0, 256, DROID_IMAGE_SHAPE, dtype=np.uint8) for key in DROID_IMAGES}
    obs["observation/state"] = rng.random(DROID_STATE_SHAPE).astype(np.float32)
    obs["prompt"] = "put the marker in the cup"
    return obs


def overhead_app() -> Any:
    """Both transports on one uvicorn app: decode, check every key, answer a zero action chunk."""
    from stepcache.serving.chunks import checked_array
    from stepcache.serving.openpi import pack, unpack_request
    from stepcache.serving.server import _parse_json

    app = FastAPI()
    app.state.max_message_bytes = 1 << 20

    def checked(message: dict[str, Any]) -> None:
        for key in DROID_IMAGES:
            checked_array(np.asarray(message[key], dtype=np.uint8), key, DROID_IMAGE_SHAPE, (0, 255))
        checked_array(message["observation/state"], "observation/state", DROID_STATE_SHAPE)

    def reply(started: float) -> dict[str, Any]:
        return {"actions": np.zeros(DROID_ACTION_SHAPE, np.float32),
                "server_timing": {"infer_ms": 0.0, "server_ms": 1000 * (time.perf_counter() - started)}}

    @app.websocket("/")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_bytes(pack({"server": "overhead"}))
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            started = time.perf_counter()
            checked(unpack_request(message["bytes"]))
            await websocket.send_bytes(pack(reply(started)))

    @app.post("/chunks")
    async def chunks(request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        checked(_parse_json(await request.body()))
        answer = reply(started)
        answer["actions"] = answer["actions"].tolist()
        return answer

    return app


def measure_overhead(requests: int) -> dict[str, Any]:
    from openpi_client import msgpack_numpy
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from stepcache.serving.server import ServerThread

    rng = np.random.default_rng(0)
    obs = droid_observation(rng)
    as_json = {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in obs.items()}
    result: dict[str, Any] = {"observation": {"images": [list(DROID_IMAGE_SHAPE)] * 3, "state": list(DROID_STATE_SHAPE),
                                              "raw_bytes": int(sum(v.nbytes for v in obs.values()
                                                                   if isinstance(v, np.ndarray)))}}
    with ServerThread(overhead_app()) as server:
        policy = WebsocketClientPolicy(server.url.replace("http://", "ws://", 1))
        times, packs = [], []
        for index in range(requests + 5):
            start = time.perf_counter()
            out = policy.infer(obs)
            elapsed = time.perf_counter() - start
            assert out["actions"].shape == DROID_ACTION_SHAPE
            if index >= 5:  # the first few warm the connection
                times.append(elapsed)
                begin = time.perf_counter()
                packed = msgpack_numpy.Packer().pack(obs)
                packs.append(time.perf_counter() - begin)
        policy._ws.close()
        result["websocket"] = {"round_trip_p50_ms": 1000 * float(np.median(times)),
                               "round_trip_p99_ms": 1000 * float(np.percentile(times, 99)),
                               "request_bytes": len(packed), "client_pack_p50_ms": 1000 * float(np.median(packs))}
        times, dumps = [], []
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for index in range(max(requests // 10, 10) + 2):  # JSON is slow: fewer requests give a stable median
                start = time.perf_counter()
                body = json.dumps(as_json).encode()
                encoded = time.perf_counter()
                response = client.post("/chunks", content=body, headers={"content-type": "application/json"})
                actions = np.asarray(response.json()["actions"], dtype=np.float32)
                elapsed = time.perf_counter() - start
                assert actions.shape == DROID_ACTION_SHAPE
                if index >= 2:
                    times.append(elapsed)
                    dumps.append(encoded - start)
        result["json_http"] = {"round_trip_p50_ms": 1000 * float(np.median(times)),
                               "round_trip_p99_ms": 1000 * float(np.percentile(times, 99)),
                               "request_bytes": len(body), "client_encode_p50_ms": 1000 * float(np.median(dumps))}
    result["json_over_websocket_p50"] = (result["json_http"]["round_trip_p50_ms"]
                                         / result["websocket"]["round_trip_p50_ms"])
    return result


# -- fuzz --------------------------------------------------------------------------------------------

def start_server(model: str, threads: int) -> tuple[subprocess.Popen, str, list[str]]:
    command = [sys.executable, "-m", "stepcache", "serve", "--port", "0", "--model", model, "--threads", str(threads),
               "--session-ttl", "3600"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        log.append(line)
        match = re.search(r" on (http://127\.0\.0\.1:\d+)", line)
        if match:
            threading.Thread(target=lambda: log.extend(process.stdout), daemon=True).start()
            return process, match.group(1), log
    process.kill()
    raise RuntimeError(f"the server did not start: {' '.join(command)}")


def random_message(rng: np.random.Generator, good: dict[str, Any]) -> bytes:
    from openpi_client import msgpack_numpy

    kind = rng.random()
    if kind < 0.4:
        return rng.bytes(int(rng.integers(0, 4096)))
    if kind < 0.42:
        return rng.bytes(1_100_000)  # above the default 1 MiB limit: the connection is closed (1009)
    if kind < 0.47:
        return msgpack_numpy.packb(good)  # a valid chunk now and then: sessions must keep working
    keys = [*good, "return_frames", "reset", "seed", "observation/wrist", "", "x" * 300]
    dtypes = [np.uint8, np.int32, np.float16, np.float32, np.float64, np.bool_]
    message: dict[str, Any] = {}
    for _ in range(int(rng.integers(0, 6))):
        key = keys[int(rng.integers(len(keys)))]
        choice = int(rng.integers(9))
        shape = tuple(int(n) for n in rng.integers(0, 40, int(rng.integers(0, 4))))
        if choice == 0:
            value: Any = good.get(key, 1)
        elif choice == 1:
            value = (rng.random(shape) * 3 - 1).astype(dtypes[int(rng.integers(len(dtypes)))])
        elif choice == 2:
            value = np.full(shape or (2,), [np.nan, np.inf, -np.inf][int(rng.integers(3))], np.float32)
        elif choice == 3:
            value = rng.bytes(int(rng.integers(0, 64)))
        elif choice == 4:
            value = "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, int(rng.integers(0, 30))))
        elif choice == 5:
            value = [float(x) for x in rng.random(int(rng.integers(0, 10)))]
        elif choice == 6:
            value = {"nested": {b"__ndarray__": True, b"data": rng.bytes(8), b"dtype": "<f4", b"shape": [3]}}
        elif choice == 7:
            value = int(rng.integers(-2**62, 2**62))
        else:
            value = bool(rng.integers(2))
        message[key] = value
    return msgpack_numpy.packb(message)


def fuzz(model: str, requests: int, threads: int) -> dict[str, Any]:
    import websockets.sync.client as ws_client
    from openpi_client import msgpack_numpy
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    from websockets.exceptions import ConnectionClosed

    from stepcache.models.dreamzero.world import ReachingWorld
    from stepcache.omni import Omni

    rng = np.random.default_rng(1)
    process, url, log = start_server(model, threads)
    ws_url = url.replace("http://", "ws://", 1) + "/"
    counts = {"error_text": 0, "reply": 0, "closed": 0, "traceback_in_reply": 0, "empty_error": 0}
    healthy_records: dict[int, list] = {}

    def healthy(seed: int, stop: threading.Event) -> None:
        """Episodes closed loop (a reset message between them) until the fuzz ends; every chunk recorded."""
        policy = WebsocketClientPolicy(f"{ws_url}?seed={seed}")
        record: list[tuple[Any, ...]] = []
        episode = 0
        while not stop.is_set():
            episode_seed = 1000 * seed + episode
            policy.infer({"reset": True, "seed": episode_seed})
            world = ReachingWorld()
            frame, state = world.reset(episode_seed)
            while not world.done and not stop.is_set():
                out = policy.infer({"observation/image": frame, "observation/state": state,
                                    "prompt": world.instruction})
                record.append((episode_seed, frame, state, world.instruction, out["actions"],
                               out["stepcache"]["schedule"]))
                frame, state = world.execute(out["actions"])
            episode += 1
        healthy_records[seed] = record
        policy._ws.close()

    try:
        stop = threading.Event()
        robots = [threading.Thread(target=healthy, args=(seed, stop), daemon=True) for seed in (101, 102)]
        for robot in robots:
            robot.start()
        world = ReachingWorld()
        frame, state = world.reset(0)
        good = {"observation/image": frame, "observation/state": state, "prompt": world.instruction}
        connection = None
        for _ in range(requests):
            if connection is None:
                connection = ws_client.connect(ws_url, compression=None, max_size=None, open_timeout=30)
                connection.recv(timeout=30)
            try:
                connection.send(random_message(rng, good))
                answer = connection.recv(timeout=120)
            except ConnectionClosed:
                counts["closed"] += 1
                connection = None
                continue
            if isinstance(answer, str):
                counts["error_text"] += 1
                counts["traceback_in_reply"] += "Traceback" in answer
                counts["empty_error"] += not answer.strip()
            else:
                counts["reply"] += 1
                text = repr(msgpack_numpy.unpackb(answer))
                counts["traceback_in_reply"] += "Traceback" in text
        if connection is not None:
            connection.close()
        stop.set()
        for robot in robots:
            robot.join(300)
        with httpx.Client(base_url=url, timeout=30) as client:
            health = client.get("/health").json()
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    worst, same_schedules, chunks = 0.0, True, 0
    with Omni(model, cache_backend="step_cache") as omni:
        for seed, record in healthy_records.items():
            with omni.open_session(seed=seed) as session:
                episode_seed = None
                for new_seed, frame, state, prompt, actions, schedule in record:
                    if new_seed != episode_seed:
                        session.start_episode(new_seed)
                        episode_seed = new_seed
                    expected = session.generate(frame, prompt, state)
                    worst = max(worst, float(np.abs(expected.actions - actions).max()))
                    same_schedules &= expected.stats.schedule == schedule
                    chunks += 1
    return {"requests": requests, "answers": counts, "server_up_after": health["status"] == "ok",
            "server_log_tracebacks": sum("Traceback" in line for line in log),
            "healthy_chunks": chunks, "healthy_max_action_diff_vs_inprocess": worst,
            "healthy_same_schedules": same_schedules}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overhead", type=int, default=0, metavar="N", help="N websocket requests (N/10 JSON)")
    parser.add_argument("--fuzz", type=int, default=0, metavar="N", help="N random messages against a live server")
    parser.add_argument("--model", default="dreamzero-mini")
    parser.add_argument("--threads", type=int, default=1, help="the fuzzed server's torch threads")
    parser.add_argument("--out", type=Path, default=None, help="folder for openpi_transport.json")
    args = parser.parse_args(argv)
    if args.overhead < 0 or args.fuzz < 0 or not (args.overhead or args.fuzz):
        parser.error("give --overhead N and/or --fuzz N (N >= 1)")
    document: dict[str, Any] = {"command": f"python {command_line()}",  # paths relative, nothing machine-specific
                                "cpu_count": os.cpu_count()}
    if args.overhead:
        document["overhead"] = measure_overhead(args.overhead)
        print("overhead:", json.dumps(document["overhead"], indent=1), flush=True)
    if args.fuzz:
        document["fuzz"] = fuzz(args.model, args.fuzz, args.threads)
        print("fuzz:", json.dumps(document["fuzz"], indent=1), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "openpi_transport.json").write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.out / 'openpi_transport.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
