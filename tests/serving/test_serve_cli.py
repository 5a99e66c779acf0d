"""``stepcache serve``: usage errors before any work, and a real server process that stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from stepcache.serving.server import bind_socket
from stepcache.tools import cli


def _exit_status(argv: list[str]) -> int:
    """``stepcache serve ARGV``'s exit status (argparse's own errors exit through SystemExit)."""
    try:
        return cli.main(["serve", *argv])
    except SystemExit as exit_info:
        return int(exit_info.code)


@pytest.mark.parametrize(("argv", "message"), [
    (["--port", "70000"], "argument --port: '70000' is not allowed"),
    (["--port", "http"], "argument --port: 'http' is not an integer"),
    (["--session-ttl", "0"], "argument --session-ttl"),
    (["--max-sessions", "0"], "argument --max-sessions"),
    (["--max-request-bytes", "0"], "argument --max-request-bytes"),
    (["--max-request-bytes", "1MB"], "argument --max-request-bytes"),
    (["--decision", "mean"], "argument --decision"),
    (["--host", " "], "argument --host"),
    (["--no-cache", "--cache-config", "{}"], "argument --no-cache"),
    (["--cache-config", '{"velocity_sim_thresholds": [2]}'], "argument --cache-config"),
    (["--model", "no-such-model"], "argument --model"),
    (["--device", "gpu7"], "argument --device"),
    (["--max-message-bytes", "0"], "argument --max-message-bytes"),
    (["--api-key", "short"], "argument --api-key: the API key must be at least 8"),
    (["--api-key", "has a space"], "argument --api-key"),
    (["--host", "0.0.0.0"], "no API key is set; give one (--api-key, or $STEPCACHE_API_KEY), or pass --allow-no"),
])
def test_bad_options_are_one_line_usage_errors(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("STEPCACHE_API_KEY", raising=False)
    assert _exit_status(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_bad_api_key_in_the_environment_is_a_usage_error_naming_the_variable(capsys, monkeypatch):
    monkeypatch.setenv("STEPCACHE_API_KEY", "short")
    assert _exit_status([]) == 2
    assert "$STEPCACHE_API_KEY: the API key must be" in capsys.readouterr().err


def test_a_port_in_use_is_a_usage_error(capsys):
    taken = bind_socket("127.0.0.1", 0)
    try:
        assert _exit_status(["--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
    finally:
        taken.close()


def test_serve_answers_over_http_and_the_openpi_websocket_and_stops_on_ctrl_c(tiny_dir):
    key = "a-key-from-the-environment"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "STEPCACHE_API_KEY": key}
    auth = {"Authorization": f"Api-Key {key}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "stepcache", "serve", "--port", "0", "--model", str(tiny_dir), "--threads", "1",
         "--max-request-bytes", "10000", "--max-message-bytes", "50000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        url = None
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            url = match.group(1) if match else None
        assert url is not None, "the server did not print its address"
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/health").status_code == 401  # the key from $STEPCACHE_API_KEY is required
            client.headers.update(auth)
            health = client.get("/health").json()
            assert health["status"] == "ok" and health["max_message_bytes"] == 50000
            session_id = client.post("/sessions", json={"seed": 1}).json()["session_id"]
            body = {"frame": [[0.0] * 32] * 32, "instruction": "reach the ring", "state": [0.5, 0.5]}
            assert len(client.post(f"/sessions/{session_id}/chunks", json=body).json()["actions"]) == 8
            too_big = client.post(f"/sessions/{session_id}/chunks", json={**body, "padding": "x" * 10_000})
            assert too_big.status_code == 413 and "10000 bytes" in too_big.json()["detail"]
        _openpi_round_trip(url.replace("http://", "ws://", 1), key)
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def _openpi_round_trip(url: str, key: str) -> None:
    """One chunk through the real openpi client, with the key (in a thread: its recv has no timeout)."""
    pytest.importorskip("openpi_client")
    import warnings

    import numpy as np
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    replies = []

    def infer() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # openpi-client's connect() outside a context manager
            policy = WebsocketClientPolicy(url, api_key=key)
        replies.append(policy.infer({"observation/image": np.zeros((32, 32), np.float32),
                                     "observation/state": np.full(2, 0.5, np.float32), "prompt": "reach the ring"}))
        policy._ws.close()

    thread = threading.Thread(target=infer, daemon=True)
    thread.start()
    thread.join(30)
    assert replies and replies[0]["actions"].shape == (8, 2)
