"""Load benchmark of ``stepcache serve``: N simulated robots, closed loop over HTTP, for a bounded time.

One server process per serving mode (``python -m stepcache serve`` on a free loopback port) is started
first; then, for every N and every mode in turn (interleaved, so that a change of load on a shared
machine hits every mode alike), N robot threads each open a session and drive the served model's world
episodes closed loop (observe, POST the observation, execute the returned actions) until the time is
up. Only chunks that complete inside the measured window (after a warm-up) count.

Reported per (mode, N): chunks/s, p50 / p99 chunk latency as the robot sees it (HTTP round trip:
queueing, batching and the chunk itself), DiT forwards per chunk, chunks per forward (batching),
episode success rate, and memory per open session (the tensors a session holds, from the server's
``/health``, and the server's resident-memory growth per session). Modes:

- ``none``: no cache, chunks batched;
- ``step_cache``: the seed's defaults, each session deciding its own steps;
- ``batch_mean``: the seed's defaults, one decision per batch from the mean cosine (upstream's rule);
- ``none_unbatched``: no cache, one chunk at a time (what batching is compared against);
- ``fast`` / ``balanced``: those presets (planned schedules), admitted at once; ``fast_aligned`` /
  ``balanced_aligned``: the same, chunks aligned at cohort boundaries (``--admission-wait-ms``).

``--flat-cost-ms MS`` (in-process only) is a **simulation of a weight-bound accelerator**: every DiT
call (denoising forward and prefill) runs the real model, then waits until MS ms have passed since it
began, so a call costs the same for 2 rows or 128, as a forward of a 1-3B model batched on one GPU
does. Calls whose real cost passed MS are counted (``flat_cost_overruns``); the simulation holds only
where that count is 0. Every row also reports DiT calls per served chunk (denoising + prefill) and
rows per call.

    .venv/bin/python benchmarks/serve_load.py --duration 8 --out sl  # --update-docs-figures: into docs/figures

writes ``serve_load.json`` and ``serve_load.png`` (throughput against N) into ``--out`` and prints a
table. ``--transport inprocess`` drives the sessions of an in-process ``Omni`` from the robot threads
instead (no HTTP; ``--device cuda`` runs the model on a GPU). ``--transport websocket`` makes every
robot an openpi-client ``WebsocketClientPolicy`` (in its own thread) on the same servers' openpi
websocket. Every row also reports, per transport, the bytes of one request and the client's time to
serialise it (JSON text for http, openpi's msgpack for websocket, timed with the same encoder; none
in process). ``--fidelity`` measures what the
batch-mean rule costs: the same inputs replayed through per-session and batch-mean batches, compared
with the uncached outputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from stepcache.tools.benchmark.closed_loop import wilson_interval
from stepcache.tools.common import (
    UsageError,
    add_progress_argument,
    add_update_docs_figures_argument,
    command_line,
    prepare_out_dir,
    progress_bar,
    show_progress,
)

MODES: dict[str, list[str]] = {
    "none": ["--no-cache"],
    "step_cache": [],
    "batch_mean": ["--decision", "batch_mean"],
    "none_unbatched": ["--no-cache", "--no-batching"],
    "fast": ["--cache-config", "fast"],
    "fast_aligned": ["--cache-config", "fast", "--admission-wait-ms", "{wait}"],
    "balanced": ["--cache-config", "balanced"],
    "balanced_aligned": ["--cache-config", "balanced", "--admission-wait-ms", "{wait}"],
}
DEFAULT_MODES = ("none", "step_cache", "batch_mean", "none_unbatched")


@dataclass
class Load:
    """What the robots of one (mode, N) run measured."""

    chunks: list[tuple[float, float, int, float]] = field(default_factory=list)  # (end, latency, forwards, queue)
    requests: list[tuple[int, float]] = field(default_factory=list)  # (request bytes, client serialisation s)
    episodes: list[tuple[float, bool]] = field(default_factory=list)  # (end, success)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def start_server(mode: str, model: str, threads: int, max_sessions: int,
                 wait_ms: float = 0.0) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "stepcache", "serve", "--port", "0", "--model", model, "--threads", str(threads),
               "--max-sessions", str(max_sessions), "--session-ttl", "3600",
               *(arg.format(wait=wait_ms) for arg in MODES[mode])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        match = re.search(r" on (http://127\.0\.0\.1:\d+)", line)
        if match:
            # keep draining the server's output so that it never blocks on a full pipe
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, match.group(1)
    process.kill()
    raise RuntimeError(f"the {mode} server did not start: {' '.join(command)}")


def resident_bytes(pid: int) -> int:
    """The process's resident memory (Linux /proc), 0 where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def robot(index: int, url: str, start_at: float, stop_at: float, load: Load, world_config: Any) -> None:
    """One robot: a session, episodes of the served model's world closed loop until ``stop_at``."""
    with httpx.Client(base_url=url, timeout=600) as client:
        session = client.post("/sessions", json={"seed": index}).json()["session_id"]
        episode = 0
        try:
            while time.perf_counter() < stop_at:
                seed = 10_000 * (index + 1) + episode
                client.post(f"/sessions/{session}/reset", json={"seed": seed}).raise_for_status()
                world = world_config.make_world()
                frame, state = world.reset(seed)
                while not world.done and time.perf_counter() < stop_at:
                    sent = time.perf_counter()
                    body = json.dumps({"frame": frame.tolist(), "instruction": world.instruction,
                                       "state": state.tolist()}).encode()
                    encoded = time.perf_counter()
                    response = client.post(f"/sessions/{session}/chunks", content=body,
                                           headers={"content-type": "application/json"})
                    ended = time.perf_counter()
                    if response.status_code != 200:
                        with load.lock:
                            load.errors.append(f"{response.status_code}: {response.text[:200]}")
                        return
                    data = response.json()
                    if start_at <= ended <= stop_at:
                        with load.lock:
                            load.chunks.append((ended, ended - sent, data["stats"]["dit_forwards"],
                                                data["stats"]["queue_s"]))
                            load.requests.append((len(body), encoded - sent))
                    frame, state = world.execute(np.asarray(data["actions"]))
                if world.done and start_at <= time.perf_counter() <= stop_at:
                    with load.lock:
                        load.episodes.append((time.perf_counter(), world.success))
                episode += 1
        finally:
            client.delete(f"/sessions/{session}")


def robot_websocket(index: int, url: str, start_at: float, stop_at: float, load: Load, world_config: Any) -> None:
    """One robot speaking openpi's protocol: a ``WebsocketClientPolicy`` (one session), episodes closed loop
    (a reset message per episode) until ``stop_at``. The request is packed once more, outside the timed
    round trip, with the client's own packer, to measure its size and serialisation time."""
    import warnings

    from openpi_client import msgpack_numpy
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # openpi-client 0.1.2's connect() outside a `with`
        policy = WebsocketClientPolicy(url.replace("http://", "ws://", 1) + f"/?seed={index}")
    packer = msgpack_numpy.Packer()
    episode = 0
    try:
        while time.perf_counter() < stop_at:
            seed = 10_000 * (index + 1) + episode
            policy.infer({"reset": True, "seed": seed})
            world = world_config.make_world()
            frame, state = world.reset(seed)
            while not world.done and time.perf_counter() < stop_at:
                obs = {"observation/image": frame, "observation/state": state, "prompt": world.instruction}
                sent = time.perf_counter()
                try:
                    reply = policy.infer(obs)
                except RuntimeError as error:
                    with load.lock:
                        load.errors.append(str(error)[:200])
                    return
                ended = time.perf_counter()
                if start_at <= ended <= stop_at:
                    began = time.perf_counter()
                    size = len(packer.pack(obs))
                    packed = time.perf_counter() - began
                    with load.lock:
                        load.chunks.append((ended, ended - sent, reply["stepcache"]["dit_forwards"],
                                            reply["server_timing"]["queue_ms"] / 1000))
                        load.requests.append((size, packed))
                frame, state = world.execute(reply["actions"])
            if world.done and start_at <= time.perf_counter() <= stop_at:
                with load.lock:
                    load.episodes.append((time.perf_counter(), world.success))
            episode += 1
    finally:
        policy._ws.close()


def robot_inprocess(index: int, omni: Any, start_at: float, stop_at: float, load: Load) -> None:
    """One robot on an in-process ``Omni``: a session, episodes closed loop until ``stop_at``."""
    with omni.open_session(seed=index) as session:
        episode = 0
        while time.perf_counter() < stop_at:
            seed = 10_000 * (index + 1) + episode
            session.start_episode(seed)
            world = omni.world_config.make_world()
            frame, state = world.reset(seed)
            while not world.done and time.perf_counter() < stop_at:
                sent = time.perf_counter()
                out = session.generate(frame, world.instruction, state)
                ended = time.perf_counter()
                if start_at <= ended <= stop_at:
                    with load.lock:
                        load.chunks.append((ended, ended - sent, out.stats.dit_forwards, out.stats.queue_s))
                frame, state = world.execute(out.actions)
            if world.done and start_at <= time.perf_counter() <= stop_at:
                with load.lock:
                    load.episodes.append((time.perf_counter(), world.success))
            episode += 1


def run_load_inprocess(omni: Any, robots: int, warmup: float, duration: float) -> dict[str, Any]:
    before = omni.engine.stats
    overruns_before = getattr(omni, "flat_cost_overruns", [0])[0]
    rss_before = resident_bytes(os.getpid())
    load = Load()
    start_at = time.perf_counter() + warmup
    stop_at = start_at + duration
    threads = [threading.Thread(target=robot_inprocess, args=(i, omni, start_at, stop_at, load), daemon=True)
               for i in range(robots)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, stop_at - time.perf_counter() - 0.5))
    sessions = omni.sessions
    session_bytes = sum(session.nbytes() for session in sessions) / max(len(sessions), 1)
    rss_open = resident_bytes(os.getpid())
    for thread in threads:
        thread.join()
    after = omni.engine.stats
    row = summarise(load, robots, duration, after.chunk_forwards - before.chunk_forwards,
                    after.denoise_forwards - before.denoise_forwards, session_bytes,
                    (rss_open - rss_before) / max(len(sessions), 1), _calls(before.to_dict(), after.to_dict()))
    if hasattr(omni, "flat_cost_overruns"):
        row["flat_cost_overruns"] = omni.flat_cost_overruns[0] - overruns_before
    return row


def _calls(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """DiT calls per served chunk (denoising + prefill) and rows per call, from the engine's counters
    over the whole run (warm-up included)."""
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in
             ("chunks", "denoise_forwards", "prefill_forwards", "denoise_rows", "prefill_rows")}
    calls = delta["denoise_forwards"] + delta["prefill_forwards"]
    return {
        "dit_calls_per_chunk": calls / delta["chunks"] if delta["chunks"] else math.nan,
        "rows_per_call": (delta["denoise_rows"] + delta["prefill_rows"]) / calls if calls else math.nan,
        "rows_per_denoise_call": delta["denoise_rows"] / delta["denoise_forwards"] if delta["denoise_forwards"]
        else math.nan,
    }


def summarise(load: Load, robots: int, duration: float, forward_chunks: int, forwards: int, session_bytes: float,
              session_rss: float, calls: dict[str, float] | None = None) -> dict[str, Any]:
    latencies = np.array([c[1] for c in load.chunks]) if load.chunks else np.array([math.nan])
    queues = np.array([c[3] for c in load.chunks]) if load.chunks else np.array([math.nan])
    return {
        "robots": robots,
        "chunks": len(load.chunks),
        "chunks_per_s": len(load.chunks) / duration,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "queue_p50_s": float(np.percentile(queues, 50)),
        "queue_p99_s": float(np.percentile(queues, 99)),
        **(calls or {}),
        "dit_forwards_per_chunk": float(np.mean([c[2] for c in load.chunks])) if load.chunks else math.nan,
        "chunks_per_forward": forward_chunks / forwards if forwards else math.nan,
        "episodes": len(load.episodes),
        "success_rate": float(np.mean([e[1] for e in load.episodes])) if load.episodes else math.nan,
        # the 95% Wilson interval of the success rate (over the episodes completed in the window)
        "success_interval": list(wilson_interval(sum(e[1] for e in load.episodes), len(load.episodes)))
        if load.episodes else [math.nan, math.nan],
        "session_tensor_bytes": session_bytes,
        "session_rss_bytes": session_rss,
        "request_bytes": float(np.mean([r[0] for r in load.requests])) if load.requests else 0.0,
        "serialise_ms_per_request": 1000 * float(np.mean([r[1] for r in load.requests])) if load.requests else 0.0,
        "errors": load.errors[:5],
    }


def run_load(url: str, pid: int, robots: int, warmup: float, duration: float, world_config: Any,
             transport: str = "http") -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=60) as client:
        before = client.get("/health").json()["engine"]
        rss_before = resident_bytes(pid)
        load = Load()
        start_at = time.perf_counter() + warmup
        stop_at = start_at + duration
        drive = robot_websocket if transport == "websocket" else robot
        threads = [threading.Thread(target=drive, args=(i, url, start_at, stop_at, load, world_config), daemon=True)
                   for i in range(robots)]
        for thread in threads:
            thread.start()
        # memory while every session is open and holds its context (just before the end)
        time.sleep(max(0.0, stop_at - time.perf_counter() - 0.5))
        health = client.get("/health").json()
        rss_open = resident_bytes(pid)
        for thread in threads:
            thread.join()
        after = client.get("/health").json()["engine"]
    sessions = max(health["sessions"], 1)
    return summarise(load, robots, duration, after["chunk_forwards"] - before["chunk_forwards"],
                     after["denoise_forwards"] - before["denoise_forwards"], health["session_bytes"] / sessions,
                     (rss_open - rss_before) / sessions, _calls(before, after))


def make_omni(mode: str, model: str, device: str | None, wait_ms: float = 0.0,
              flat_cost_ms: float | None = None) -> Any:
    """The in-process equivalent of ``stepcache serve`` with ``MODES[mode]`` (and the flat-cost
    simulation when ``flat_cost_ms`` is given)."""
    from stepcache.omni import Omni

    engine = {"decision": "batch_mean" if mode == "batch_mean" else "per_session",
              "batching": mode != "none_unbatched", "max_batch": 64,
              "admission_wait_s": wait_ms / 1000 if mode.endswith("_aligned") else 0.0}
    backend = None if mode.startswith("none") else "step_cache"
    preset = mode.removesuffix("_aligned") if mode.startswith(("fast", "balanced")) else None
    omni = Omni(model, cache_backend=backend, cache_config=preset, engine_config=engine, device=device)
    if flat_cost_ms is not None:
        pad_to_flat_cost(omni, flat_cost_ms / 1000)
    return omni


def pad_to_flat_cost(omni: Any, cost_s: float) -> None:
    """SIMULATION: make every DiT call of ``omni`` (forward and prefill) last ``cost_s``, whatever its
    rows: the real call runs, then the calling thread sleeps for the rest. Overruns (a real call longer
    than ``cost_s``) are counted in ``omni.flat_cost_overruns[0]``."""
    import torch

    model = omni.pipeline.transformer
    omni.flat_cost_overruns = [0]
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    for name in ("forward", "prefill"):
        original = getattr(model, name)

        def padded(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = _original(*args, **kwargs)
            sync()
            left = cost_s - (time.perf_counter() - start)
            if left > 0:
                time.sleep(left)
            else:
                omni.flat_cost_overruns[0] += 1
            return out

        setattr(model, name, padded)


def forward_cost(model: str, device: str | None, rows: tuple[int, ...] = (2, 8, 32, 128)) -> dict[str, float]:
    """Milliseconds per denoising forward of the DiT with ``rows`` rows (2 = one session with CFG), with a
    2-frame context: what batching can gain is how far this stays below linear in the rows."""
    import torch

    from stepcache.models.dreamzero.model import KVCache
    from stepcache.models.dreamzero.weights import load_model

    dit = load_model(model).to(device or "cpu")
    cfg = dit.config
    costs = {}
    with torch.no_grad():
        for count in rows:
            cache = KVCache()
            instruction = torch.tensor([0, cfg.null_instruction] * (count // 2), device=device)
            for _ in range(2):
                dit.prefill(torch.zeros(count, cfg.frame_size, cfg.frame_size, device=device), instruction, cache)
            inputs = (torch.randn(count, cfg.future_frames, cfg.frame_size, cfg.frame_size, device=device),
                      torch.randn(count, cfg.action_horizon, cfg.action_dim, device=device),
                      torch.zeros(count, cfg.state_dim, device=device), torch.full((count,), 900.0, device=device),
                      torch.full((count,), 900.0, device=device), instruction, cache)
            for _ in range(3):
                dit(*inputs)
            repeats = max(5, 400 // count)
            if device and device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                dit(*inputs)
            if device and device.startswith("cuda"):
                torch.cuda.synchronize()
            costs[str(count)] = 1000 * (time.perf_counter() - start) / repeats
    return costs


def fidelity(model: str, sessions: int, chunks: int, device: str | None) -> dict[str, Any]:
    """Replay the same inputs (``sessions`` uncached closed-loop episodes of ``chunks`` chunks) through
    batches of all the sessions at once, with per-session and with batch-mean decisions, and through
    each session alone; compare forwards, schedules and actions."""
    reference = make_omni("none", model, device)
    inputs, uncached = [], []
    for index in range(sessions):
        world = reference.world_config.make_world()
        frame, state = world.reset(20_000 + index)
        episode, outputs = [], []
        with reference.open_session(seed=index) as session:
            for _ in range(chunks):
                episode.append((frame, world.instruction, state))
                out = session.generate(frame, world.instruction, state)
                outputs.append(out)
                frame, state = world.execute(out.actions)
        inputs.append(episode)
        uncached.append(outputs)
    reference.close()

    def replay(mode: str, together: bool) -> list[list[Any]]:
        omni = make_omni(mode, model, device)
        opened = [omni.open_session(seed=index) for index in range(sessions)]
        outputs: list[list[Any]] = [[] for _ in range(sessions)]
        for chunk in range(chunks):
            if together:
                with omni.engine.paused():
                    futures = [s.submit(*inputs[i][chunk]) for i, s in enumerate(opened)]
                for i, future in enumerate(futures):
                    outputs[i].append(future.result())
            else:
                for i, s in enumerate(opened):
                    outputs[i].append(s.generate(*inputs[i][chunk]))
        omni.close()
        return outputs

    alone = replay("step_cache", together=False)
    result: dict[str, Any] = {"sessions": sessions, "chunks": chunks}
    for name, outputs in (("step_cache", replay("step_cache", True)), ("batch_mean", replay("batch_mean", True))):
        pairs = [(o, a, u) for session in range(sessions)
                 for o, a, u in zip(outputs[session], alone[session], uncached[session])]
        result[name] = {
            "dit_forwards_per_chunk": float(np.mean([o.stats.dit_forwards for o, _, _ in pairs])),
            "schedules_as_alone": float(np.mean([o.stats.ran == a.stats.ran for o, a, _ in pairs])),
            "action_mse_vs_none": float(np.mean([np.mean(((o.actions - u.actions) / 0.06) ** 2) for o, _, u in pairs])),
            "worst_chunk_action_mse_vs_none": float(max(np.mean(((o.actions - u.actions) / 0.06) ** 2)
                                                        for o, _, u in pairs)),
        }
    return result


def plot(results: dict[str, list[dict[str, Any]]], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, rows in results.items():
        ax.plot([r["robots"] for r in rows], [r["chunks_per_s"] for r in rows], "o-", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("robots (concurrent sessions)")
    ax.set_ylabel("chunks / s")
    ax.set_title(f"stepcache serve: throughput against load ({device})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", default="1,4,16,64", help="comma-separated N")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of {list(MODES)}")
    parser.add_argument("--admission-wait-ms", type=float, default=200.0, metavar="MS",
                        help="the *_aligned modes' bounded admission wait (EngineConfig.admission_wait_s)")
    parser.add_argument("--flat-cost-ms", type=float, default=None, metavar="MS",
                        help="SIMULATION (inprocess only): every DiT call lasts MS ms whatever its rows")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per (mode, N)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before the measurement starts")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--model", default="dreamzero-mini")
    parser.add_argument("--out", type=Path, default=None, help="folder for NAME.json and NAME.png")
    add_update_docs_figures_argument(parser)
    parser.add_argument("--name", default="serve_load", help="file name (no suffix) of the outputs")
    parser.add_argument("--transport", choices=("http", "websocket", "inprocess"), default="http",
                        help="http: robots talk to stepcache serve processes over its JSON API; websocket: as "
                             "openpi-client policies over its openpi websocket; inprocess: to an Omni's sessions")
    parser.add_argument("--device", default=None, help="inprocess only: where the model runs (cpu, cuda)")
    parser.add_argument("--forward-cost", action="store_true", help="also time one DiT forward of 2 to 128 rows")
    parser.add_argument("--fidelity", type=int, default=0, metavar="SESSIONS",
                        help="also replay SESSIONS uncached episodes through per-session and batch-mean batches")
    add_progress_argument(parser)
    args = parser.parse_args(argv)
    from stepcache.models.dreamzero.weights import load_world_config

    world_config = load_world_config(args.model)  # the robots drive the world the served model was trained on
    robots = [int(n) for n in args.robots.split(",") if n]  # --robots "": only --fidelity
    modes = [mode for mode in args.modes.split(",") if mode]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or (robots and min(robots) < 1) or args.duration <= 0 or args.warmup < 0 or args.fidelity < 0:
        parser.error(f"bad --modes {unknown} / --robots / --duration / --warmup")
    if args.flat_cost_ms is not None and (args.transport != "inprocess" or not args.flat_cost_ms > 0):
        parser.error("--flat-cost-ms needs --transport inprocess (the simulation pads the in-process model) and "
                     f"a number of milliseconds > 0, got {args.flat_cost_ms} with --transport {args.transport}")
    if not args.admission_wait_ms >= 0:
        parser.error(f"--admission-wait-ms must be >= 0, got {args.admission_wait_ms}")
    if args.out is not None:
        try:
            prepare_out_dir(args.out, update_docs_figures=args.update_docs_figures)
        except UsageError as err:
            parser.error(str(err))
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    started = time.time()
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    omnis: dict[str, Any] = {}
    if args.transport == "inprocess":
        import torch

        torch.set_num_threads(args.threads)
    try:
        for mode in modes:
            if args.transport != "inprocess":
                servers[mode] = start_server(mode, args.model, args.threads, max(robots, default=0) + 8,
                                             args.admission_wait_ms)
            else:
                omnis[mode] = make_omni(mode, args.model, args.device, args.admission_wait_ms, args.flat_cost_ms)
        bar = progress_bar(total=len(robots) * len(modes), desc="serve_load", unit="rows",
                           enabled=show_progress(args), interval_s=0)  # rows last --warmup + --duration: a line each
        for n in robots:
            for mode in modes:
                bar.set_postfix_str(f"{mode} N={n}")
                if args.transport != "inprocess":
                    process, url = servers[mode]
                    row = run_load(url, process.pid, n, args.warmup, args.duration, world_config, args.transport)
                else:
                    row = run_load_inprocess(omnis[mode], n, args.warmup, args.duration)
                results[mode].append(row)
                print(f"{mode:>15} N={n:<3} {row['chunks_per_s']:6.2f} chunks/s"
                      f"  p50 {1000 * row['latency_p50_s']:7.1f} ms"
                      f"  p99 {1000 * row['latency_p99_s']:7.1f} ms  {row['dit_forwards_per_chunk']:5.2f} fwd/chunk"
                      f"  {row['chunks_per_forward']:5.2f} chunks/fwd  {row['dit_calls_per_chunk']:5.2f} calls/chunk"
                      f"  {row['rows_per_call']:5.1f} rows/call  queue p99 {1000 * row['queue_p99_s']:6.1f} ms"
                      f"{'  overruns ' + str(row['flat_cost_overruns']) if row.get('flat_cost_overruns') else ''}"
                      f"  success {row['success_rate']:.2f} [{row['success_interval'][0]:.2f}, "
                      f"{row['success_interval'][1]:.2f}]"
                      f" ({row['episodes']} ep)  {row['session_tensor_bytes'] / 1024:.0f} KiB/session"
                      f"  {row['request_bytes'] / 1024:.1f} KiB/request  {row['serialise_ms_per_request']:.3f} ms "
                      "serialise"
                      f"{'  ERRORS ' + str(row['errors']) if row['errors'] else ''}", flush=True)
                bar.update()
        bar.close()
    finally:
        for omni in omnis.values():
            omni.close()
        for process, _ in servers.values():
            process.terminate()
        for process, _ in servers.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    document: dict[str, Any] = {
        "command": f"{Path(sys.executable).name} {command_line()}", "transport": args.transport,
        "device": args.device or "cpu", "duration_s": args.duration, "warmup_s": args.warmup,
        "torch_threads": args.threads, "cpu_count": os.cpu_count(), "results": results,
        "admission_wait_ms": args.admission_wait_ms,
        "flat_cost_ms": args.flat_cost_ms,  # not None: a SIMULATION of a row-independent forward cost
    }
    if args.forward_cost:
        if args.transport == "inprocess" or not robots:
            import torch

            torch.set_num_threads(args.threads)
        document["forward_ms_by_rows"] = forward_cost(args.model, args.device)
        print("ms per DiT forward by rows:", json.dumps(document["forward_ms_by_rows"]), flush=True)
    if args.fidelity:
        document["fidelity"] = fidelity(args.model, args.fidelity, 4, args.device)
        print("fidelity:", json.dumps(document["fidelity"]), flush=True)
    elapsed = time.time() - started
    document["elapsed_s"] = elapsed
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.out / f'{args.name}.json'}")
        if robots:
            label = document["device"] if args.flat_cost_ms is None else (
                f"SIMULATION: flat {args.flat_cost_ms:g} ms per DiT call")
            plot(results, args.out / f"{args.name}.png", label)
            print(f"wrote {args.out / f'{args.name}.png'}")
    print(f"{elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
