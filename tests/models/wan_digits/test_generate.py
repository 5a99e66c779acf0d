"""``stepcache generate --model wan-digits`` writes its side-by-side PNG and reports forwards."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from stepcache.tools.cli import main


def test_generate_writes_png_and_prints_forwards(tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["generate", "--model", "wan-digits", "--classes", "1,7", "--per-class", "2", "--steps", "6"]
    assert main([*argv, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    plain = int(re.search(r"without StepCache:\s+(\d+) DiT forwards", printed).group(1))
    cached = int(re.search(r"with StepCache:\s+(\d+) DiT forwards", printed).group(1))
    assert plain == 12  # 6 steps x (cond + uncond)
    assert cached <= plain


def test_generate_never_skipping_config_matches_exactly(tmp_path, capsys):
    never_skip = '{"velocity_sim_thresholds": [1.0], "velocity_skip_countdowns": [1]}'
    argv = ["generate", "--classes", "3", "--per-class", "1", "--steps", "4", "--cache-config", never_skip]
    assert main([*argv, "--out", str(tmp_path / "g.png")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"with StepCache:\s+8 DiT forwards", printed)
    assert "PSNR with vs without inf dB" in printed


def test_generate_rejects_a_bad_cache_config(tmp_path, capsys):
    argv = ["generate", "--cache-config", '{"no_such_field": 1}', "--out", str(tmp_path / "g.png")]
    assert main(argv) == 2
    assert "no_such_field" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_generate_rejects_bad_classes():
    with pytest.raises(SystemExit):
        main(["generate", "--classes", "1,12"])
