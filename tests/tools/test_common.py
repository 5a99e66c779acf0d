"""What the subcommands share: argument types, output folders, run metadata, number format, progress."""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

import stepcache
from stepcache.tools.common import (
    ProgressLines,
    UsageError,
    duration,
    format_number,
    package_dir,
    positive_int,
    prepare_out_dir,
    prepare_out_file,
    progress_bar,
    run_metadata,
    seed_int,
    show_progress,
    write_json,
)


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.0, "0"), (1.234e-5, "1.234e-05"), (-4.5e-7, "-4.500e-07"), (0.0123456, "0.01235"), (3.14159, "3.142"),
     (27.333, "27.33"), (123456.7, "123457"), (math.inf, "inf"), (None, "-")],
)
def test_format_number_examples(value, text):
    assert format_number(value) == text


@given(st.floats(min_value=-1e12, max_value=1e12, allow_nan=False).filter(lambda x: x != 0.0))
def test_a_nonzero_number_never_prints_as_zero_and_keeps_four_digits(value):
    text = format_number(value)
    assert float(text) != 0.0
    assert math.isclose(float(text), value, rel_tol=1e-3, abs_tol=0.5 if abs(value) >= 1e4 else 0.0)


@pytest.mark.parametrize(("parse", "good", "bad"), [(positive_int, "3", ["0", "-2", "1.5", "x"]),
                                                     (seed_int, "0", ["-1", "2.5", ""])])
def test_argument_types_name_the_value_and_what_is_allowed(parse, good, bad):
    assert parse(good) == int(good)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="allowed"):
            parse(text)


def test_run_metadata_names_versions_device_threads_command_and_date():
    args = argparse.Namespace(command_line="stepcache demo --episodes 2")
    meta = run_metadata(args)
    assert meta["stepcache"] == stepcache.__version__
    assert {"torch", "diffusers", "python", "device", "torch_threads"} <= set(meta)
    assert meta["command"] == "stepcache demo --episodes 2"
    assert datetime.fromisoformat(meta["date"]).tzinfo is not None  # ISO 8601 with the UTC offset
    json.dumps(meta)


def test_write_json_turns_non_finite_numbers_into_null(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"psnr": math.inf, "rows": [1.0, math.nan], "p": tmp_path})
    assert json.loads(path.read_text()) == {"psnr": None, "rows": [1.0, None], "p": str(tmp_path)}


def test_output_folders_are_created_checked_and_never_inside_the_package(tmp_path):
    assert prepare_out_dir(tmp_path / "a" / "b").is_dir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UsageError, match="--out: cannot write"):
        prepare_out_dir(a_file / "sub")
    with pytest.raises(UsageError, match="inside the installed stepcache package"):
        prepare_out_dir(package_dir() / "models")
    with pytest.raises(UsageError, match=r"--json: .* is a folder"):
        prepare_out_file(tmp_path)
    assert prepare_out_file(tmp_path / "new" / "r.json") == tmp_path / "new" / "r.json"
    assert not (tmp_path / "new" / "r.json").exists()  # checked, not written


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_say_done_left_elapsed_and_an_estimate_at_most_every_30_s():
    clock, lines = _Clock(), []
    sink = type("Sink", (), {"write": lambda self, text: lines.append(text), "flush": lambda self: None})()
    bar = ProgressLines(total=12, desc="bench", unit="rows", file=sink, clock=clock)
    for finished_at in (10, 20, 45, 50, 80, 200, 210, 215, 220, 230, 240, 250):
        clock.now = finished_at
        bar.update()
    printed = [line for line in "".join(lines).splitlines() if line]
    # The start, the first, then one once 30 s passed since the previous line, then the last.
    assert printed == [
        "bench: 0/12 rows, 0s elapsed",
        "bench: 1/12 rows, 10s elapsed, about 1m50s left",
        "bench: 3/12 rows, 45s elapsed, about 2m15s left",
        "bench: 5/12 rows, 1m20s elapsed, about 1m52s left",
        "bench: 6/12 rows, 3m20s elapsed, about 3m20s left",
        "bench: 10/12 rows, 3m50s elapsed, about 46s left",
        "bench: 12/12 rows, 4m10s elapsed, done",
    ]


def test_progress_lines_for_long_units_and_news_within_one():
    clock, lines = _Clock(), []
    sink = type("Sink", (), {"write": lambda self, text: lines.append(text), "flush": lambda self: None})()
    bar = ProgressLines(total=3, desc="calibrate", unit="phases", interval_s=0, file=sink, clock=clock)
    clock.now = 5
    bar.set_postfix_str("searching")
    bar.update(0)  # news 5 s in: too soon for a line
    assert [line for line in "".join(lines).splitlines() if line] == ["calibrate: 0/3 phases, 0s elapsed"]
    lines.clear()
    clock.now = 31
    bar.update(0)  # still in the first phase, but 30 s of silence: a line
    clock.now = 32
    bar.update(1)
    clock.now = 33
    bar.update(1)  # interval 0: every finished phase has its line
    assert [line for line in "".join(lines).splitlines() if line] == [
        "calibrate: 0/3 phases, 31s elapsed (searching)",
        "calibrate: 1/3 phases, 32s elapsed, about 1m04s left (searching)",
        "calibrate: 2/3 phases, 33s elapsed, about 16s left (searching)",
    ]


def test_durations_are_short():
    assert [duration(s) for s in (0, 59.4, 60, 3599, 3600, 7260)] == ["0s", "59s", "1m00s", "59m59s", "1h00m", "2h01m"]


def test_progress_is_lines_off_a_terminal_and_nothing_with_no_progress(capsys):
    args = argparse.Namespace(no_progress=False)
    assert show_progress(args)  # off a terminal progress is still shown, as lines
    with progress_bar(range(3), total=3, desc="demo", unit="episodes", enabled=show_progress(args)) as bar:
        assert list(bar) == [0, 1, 2]
    err = capsys.readouterr().err
    assert err.startswith("demo: 0/3 episodes, 0s elapsed\ndemo: 1/3 episodes, 0s elapsed, about 0s left\n")
    assert err.rstrip().endswith("demo: 3/3 episodes, 0s elapsed, done") and "\r" not in err
    silenced = argparse.Namespace(no_progress=True)
    assert not show_progress(silenced)
    with progress_bar(total=2, desc="x", unit="it", enabled=show_progress(silenced)) as bar:
        bar.update(2)
    assert capsys.readouterr().err == ""


def test_progress_is_a_tqdm_bar_on_a_terminal(monkeypatch):
    import io
    import sys

    from tqdm import tqdm

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress_bar(total=2, desc="bench", unit="rows", enabled=True) as bar:
        assert isinstance(bar, tqdm)
        bar.update(2)
    drawn = terminal.getvalue()
    assert "\r" in drawn and "2/2" in drawn and "elapsed" not in drawn  # tqdm's bar, not the lines
    with progress_bar(total=2, desc="bench", unit="rows", enabled=False) as bar:  # --no-progress
        bar.update(2)
    assert terminal.getvalue() == drawn


def test_recorded_commands_hold_no_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = f"stepcache bench --json {tmp_path}/b/r.json --out={tmp_path}/o --model wan-digits"
    meta = run_metadata(argparse.Namespace(command_line=line))
    assert meta["command"] == "stepcache bench --json b/r.json --out=o --model wan-digits"


def test_committed_figures_hold_no_absolute_paths():
    from pathlib import Path

    figures = Path(__file__).resolve().parents[2] / "docs" / "figures"
    for path in figures.glob("*.json"):
        document = json.loads(path.read_text())
        command = document.get("command") or document.get("run", {}).get("command") or ""
        assert not any(word.lstrip("-=").startswith("/") for word in command.split()), (path.name, command)


def test_the_committed_figures_are_written_only_with_the_flag(tmp_path):
    from stepcache.tools.common import UsageError, docs_figures_dir, prepare_out_dir, prepare_out_file

    figures = docs_figures_dir()
    assert (figures / "bench-wan-digits.json").is_file()
    with pytest.raises(UsageError, match=r"--out: .*docs/figures.*--update-docs-figures"):
        prepare_out_dir(figures)
    with pytest.raises(UsageError, match=r"--json: .*docs/figures"):
        prepare_out_file(figures / "bench-wan-digits.json")
    assert prepare_out_dir(figures, update_docs_figures=True) == figures
    assert prepare_out_dir(tmp_path / "bench") == tmp_path / "bench"


def test_a_long_unit_still_gets_a_line_every_interval_and_nothing_after_the_end():
    out = io.StringIO()
    bar = ProgressLines(total=3, desc="job", unit="rows", file=out, heartbeat_s=0.1)
    bar.set_postfix_str("row 1 of 3")
    time.sleep(0.45)  # no unit finishes: the heartbeat speaks for it
    start, *quiet_lines = out.getvalue().splitlines()
    assert start == "job: 0/3 rows, 0s elapsed"
    assert len(quiet_lines) >= 2 and all(line.startswith("job: 0/3 rows, ") for line in quiet_lines)
    assert all(line.endswith("(row 1 of 3)") for line in quiet_lines)
    bar.update(3)
    written = out.getvalue()
    time.sleep(0.3)
    assert out.getvalue() == written and written.splitlines()[-1].startswith("job: 3/3 rows")
    closed = ProgressLines(total=3, desc="job", unit="rows", file=io.StringIO(), heartbeat_s=0.05)
    closed.close()
    time.sleep(0.2)
    assert closed.file.getvalue().splitlines() == ["job: 0/3 rows, 0s elapsed"]


def test_the_heartbeat_speaks_when_the_quiet_reaches_its_interval_not_a_tick_later():
    """The longest silence is the interval itself, wherever the last line fell."""
    stamps: list[float] = []
    sink = type("Sink", (), {"write": lambda self, text: stamps.append(time.monotonic()) if text.strip() else None,
                             "flush": lambda self: None})()
    bar = ProgressLines(total=3, desc="job", unit="rows", file=sink, heartbeat_s=1.0)
    time.sleep(0.3)
    bar.update(1)  # the first unit's line, 0.3 s into a heartbeat period
    time.sleep(1.2)
    bar.close()
    assert len(stamps) == 3  # the start, the first unit, one heartbeat
    assert 1.0 <= stamps[2] - stamps[1] < 1.12
