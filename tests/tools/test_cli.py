"""The `stepcache` entry point: subcommands load lazily, each with its own arguments."""

from __future__ import annotations

import pytest

from stepcache.tools import cli


def test_help_lists_the_installed_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "generate", "bench", "calibrate"):
        assert name in out


def test_subcommand_help_shows_its_own_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["calibrate", "--help"])
    assert "--target-forwards" in capsys.readouterr().out


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_calibrate_needs_a_goal(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["calibrate", "--model", "wan-digits"])
    assert exit_info.value.code == 2
    assert "--target-forwards" in capsys.readouterr().err
