"""What the subcommands share: argument types, output folders, run metadata, number format, progress."""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

import stepcache
from stepcache.tools.common import (
    UsageError,
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


def test_no_progress_bar_off_a_terminal(capsys):
    args = argparse.Namespace(no_progress=False)
    assert not show_progress(args)  # pytest's captured stderr is not a terminal
    with progress_bar(total=2, desc="x", unit="it", enabled=False) as bar:
        bar.update(2)
    assert capsys.readouterr().err == ""


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
