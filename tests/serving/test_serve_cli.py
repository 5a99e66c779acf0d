"""``stepcache serve``: usage errors before any work, and a real server process that stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
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
])
def test_bad_options_are_one_line_usage_errors(argv, message, capsys):
    assert _exit_status(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_port_in_use_is_a_usage_error(capsys):
    taken = bind_socket("127.0.0.1", 0)
    try:
        assert _exit_status(["--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
    finally:
        taken.close()


def test_serve_answers_over_http_and_stops_on_ctrl_c(tiny_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "stepcache", "serve", "--port", "0", "--model", str(tiny_dir), "--threads", "1",
         "--max-request-bytes", "10000"],
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
            assert client.get("/health").json()["status"] == "ok"
            session_id = client.post("/sessions", json={"seed": 1}).json()["session_id"]
            body = {"frame": [[0.0] * 32] * 32, "instruction": "reach the ring", "state": [0.5, 0.5]}
            assert len(client.post(f"/sessions/{session_id}/chunks", json=body).json()["actions"]) == 8
            too_big = client.post(f"/sessions/{session_id}/chunks", json={**body, "padding": "x" * 10_000})
            assert too_big.status_code == 413 and "10000 bytes" in too_big.json()["detail"]
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
