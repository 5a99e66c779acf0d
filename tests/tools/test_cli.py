"""The `stepcache` entry point: lazy subcommands, one-line usage errors before any work, -v, --version."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import stepcache
from stepcache.tools import cli, demo


def _exit_code(argv: list[str]) -> int:
    """``stepcache ARGV``'s exit status: argparse's errors raise SystemExit, the tools' checks return it."""
    try:
        return cli.main(argv)
    except SystemExit as exit_info:
        return int(exit_info.code or 0)


def _assert_one_line_usage_error(argv: list[str], capsys, *fragments: str) -> str:
    code = _exit_code(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_help_lists_the_installed_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "train", "generate", "bench", "calibrate"):
        assert name in out


def test_subcommand_help_shows_its_own_arguments_and_their_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["calibrate", "--help"])
    out = capsys.readouterr().out
    assert "--target-forwards" in out and "--no-progress" in out and "--threads" in out
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--episodes N episodes per row (at most 500) (default: 100)" in out


def test_unknown_subcommand_is_a_usage_error(capsys):
    _assert_one_line_usage_error(["bogus"], capsys, "invalid choice", "'bogus'")


def test_calibrate_needs_a_goal(capsys):
    _assert_one_line_usage_error(["calibrate", "--model", "wan-digits"], capsys, "--target-forwards")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"stepcache {stepcache.__version__}"


def test_python_dash_m_runs_the_same_command_line():
    done = subprocess.run([sys.executable, "-m", "stepcache", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"stepcache {stepcache.__version__}"


BAD_OPTIONS = [
    (["demo", "--episodes", "0"], ("--episodes", "'0'", ">= 1")),
    (["demo", "--episodes", "-1"], ("--episodes", "'-1'", ">= 1")),
    (["demo", "--threads", "0"], ("--threads", "'0'", ">= 1")),
    (["demo", "--seed", "1.5"], ("--seed", "'1.5'", "integer")),
    (["demo", "--model", "dreamzero-mni"], ("--model", "dreamzero-mni", "dreamzero-mini")),
    (["bench", "--model", "wan-digit"], ("--model", "'wan-digit'", "'wan-digits'", "'dreamzero-mini'")),
    (["bench", "--repeats", "0"], ("--repeats", "'0'", ">= 1")),
    (["bench", "--samples-per-class", "0"], ("--samples-per-class", "'0'", ">= 1")),
    (["bench", "--model", "dreamzero-mini", "--samples-per-class", "2"], ("--samples-per-class", "wan-digits")),
    (["generate", "--classes", "1,12"], ("--classes", "'1,12'", "0..9")),
    (["generate", "--per-class", "0"], ("--per-class", "'0'")),
    (["calibrate", "--target-forwards", "0"], ("--target-forwards", "'0'", "1..")),
    (["calibrate", "--target-forwards", "nan"], ("--target-forwards", "'nan'", "finite")),
    (["calibrate", "--min-psnr", "inf"], ("--min-psnr", "'inf'", "finite")),
    (["calibrate", "--min-psnr", "-5"], ("--min-psnr", "'-5'", "> 0")),
    (["calibrate", "--min-psnr", "0"], ("--min-psnr", "'0'", "> 0")),
    (["serve", "--host", "0.0.0.0.0"], ("--host", "0.0.0.0.0")),
    (["train", "dreamzero-mini", "--train-steps", "0"], ("--train-steps", "'0'")),
    (["train", "dreamzero-mni"], ("invalid choice", "'dreamzero-mni'", "'dreamzero-mini'")),
    (["demo", "--cache-config", "{bad json"], ("--cache-config", "JSON")),
    (["demo", "--cache-config", '{"velocity_sim_thresholds": [1.5]}'], ("--cache-config", "velocity_sim_thresholds")),
    (["generate", "--cache-config", '{"velocity_skip_countdowns": [0, 2]}'], ("--cache-config", "countdowns")),
    (["demo", "--cache-config", '{"no_such_field": 1}'], ("--cache-config", "no_such_field")),
    (["demo", "--cache-config", ""], ("--cache-config", "empty")),
    (["demo", "--cache-config", "missing-config.json"], ("--cache-config", "missing-config.json")),
    (["generate", "--weights", "no-such-folder"], ("--weights", "no-such-folder", "config.json")),
    (["generate", "--guidance-scale", "-1"], ("--guidance-scale", "'-1'", ">= 0")),
]


@pytest.mark.parametrize(("argv", "fragments"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_a_bad_option_is_one_line_naming_it_with_exit_status_2(argv, fragments, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written; if something were, it lands here
    _assert_one_line_usage_error(argv, capsys, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_a_cache_config_file_is_accepted_like_its_json_text(tmp_path):
    config = {"velocity_sim_thresholds": [0.97], "velocity_skip_countdowns": [3]}
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(config))
    parser = cli._build_parser()
    sub = cli._subparser(parser, "demo")
    demo.add_arguments(sub)
    parsed = [parser.parse_args(["demo", "--cache-config", text, "--out", str(tmp_path / "o")]) for text in
              (str(path), json.dumps(config))]
    for args in parsed:
        demo.validate(args)
    assert parsed[0].cache_config == parsed[1].cache_config
    assert parsed[0].cache_config.to_dict()["velocity_sim_thresholds"] == [0.97]


def test_an_empty_cache_config_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    _assert_one_line_usage_error(["demo", "--cache-config", str(empty), "--out", str(tmp_path / "o")], capsys,
                                 "--cache-config", "empty.json")


def test_generate_into_an_unwritable_place_fails_before_sampling(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")

    def no_sampling(*_args, **_kwargs):
        raise AssertionError("loaded the model before checking --out")

    monkeypatch.setattr("stepcache.models.wan_digits.load_wan_digits", no_sampling)
    _assert_one_line_usage_error(["generate", "--out", str(a_file / "out")], capsys, "--out", "a-file")
    _assert_one_line_usage_error(["generate", "--json", str(tmp_path)], capsys, "--json", "folder")


def test_calibrate_rejects_more_forwards_than_steps_before_calibrating(tmp_path, capsys, monkeypatch):
    from stepcache.tools import bench

    def no_target(*_args, **_kwargs):
        raise AssertionError("built the calibration target before checking --target-forwards")

    monkeypatch.setattr(bench, "build_target", no_target)
    argv = ["calibrate", "--model", "dreamzero-mini", "--target-forwards", "99", "--out", str(tmp_path)]
    _assert_one_line_usage_error(argv, capsys, "--target-forwards", "99", "1..16")


def _record_levels(monkeypatch) -> dict[str, object]:
    """Replace the demo by a stub that records what the terminal logging looks like while a tool runs."""
    seen: dict[str, object] = {}

    def fake_run(args):
        seen["stepcache"] = logging.getLogger("stepcache.tools.demo").getEffectiveLevel()
        seen["matplotlib"] = logging.getLogger("matplotlib.font_manager").getEffectiveLevel()
        seen["handlers"] = [type(h).__name__ for h in logging.getLogger().handlers]
        logging.getLogger("stepcache.tools.demo").warning("a library warning")
        logging.getLogger("stepcache.tools.demo").debug("a debug message")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a python warning", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(demo, "validate", lambda args: None)
    monkeypatch.setattr(demo, "run", fake_run)
    monkeypatch.setattr(logging.root, "handlers", [])  # as in a fresh process: main installs the terminal handler
    return seen


@pytest.mark.parametrize("argv", [["demo"], ["-v", "demo"], ["demo", "-v"], ["demo", "--verbose"]])
def test_verbose_before_or_after_the_subcommand_raises_only_stepcache(argv, monkeypatch, capsys):
    seen = _record_levels(monkeypatch)
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    verbose = len(argv) > 1
    assert seen["stepcache"] == (logging.DEBUG if verbose else logging.INFO)
    assert seen["matplotlib"] >= logging.WARNING  # other libraries' debug chatter stays off
    assert "a library warning" in err and "a python warning" in err  # warnings still reach the terminal
    assert ("a debug message" in err) == verbose
    assert "_TqdmLoggingHandler" in seen["handlers"]  # log lines print above a progress bar, not inside it
    assert logging.getLogger("stepcache").level == logging.NOTSET  # put back after the run


def test_the_command_line_is_recorded_for_the_json_outputs(monkeypatch):
    recorded = {}
    monkeypatch.setattr(demo, "validate", lambda args: None)
    monkeypatch.setattr(demo, "run", lambda args: recorded.setdefault("line", args.command_line) and 0)
    cli.main(["demo", "--episodes", "3", "--cache-config", '{"velocity_skip_countdowns": [4, 2]}'])
    assert recorded["line"] == "stepcache demo --episodes 3 --cache-config '{\"velocity_skip_countdowns\": [4, 2]}'"


def test_a_usage_error_raised_by_a_tool_is_one_line_but_a_bug_keeps_its_traceback(monkeypatch, capsys):
    from stepcache.tools.common import UsageError

    def usage_error(args):
        raise UsageError("argument --x: 'y' is not allowed; allowed: z")

    monkeypatch.setattr(demo, "validate", usage_error)
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err == "stepcache demo: error: argument --x: 'y' is not allowed; allowed: z\n"

    def bug(args):
        raise ValueError("a bug, not the user's fault")

    monkeypatch.setattr(demo, "validate", lambda args: None)
    monkeypatch.setattr(demo, "run", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["demo"])


def test_installed_package_ships_py_typed():
    assert (Path(stepcache.__file__).parent / "py.typed").is_file()
