"""Where the tools write (``--out`` is a folder, ``--json`` a file) and what their outputs say about the run."""

from __future__ import annotations

import json
from types import SimpleNamespace

from stepcache.tools import bench, calibrate, cli, generate


def _parse(tool, argv):
    parser = cli._build_parser()
    tool.add_arguments(cli._subparser(parser, argv[0]))
    args = parser.parse_args(argv)
    tool.validate(args)
    return args


def test_quick_bench_results_are_marked_not_for_timing(tmp_path, monkeypatch, capsys):
    messages = ["measuring forwards of the caches", "oracle search over budgets [4]", "sampling full", "timing 1/1 x"]

    def fake_run_benchmark(target, *, quick, repeats, progress, calibrated):
        for message in messages:
            progress(message)
        return SimpleNamespace(rows=[], skipped_peers={}, oracle=None)

    monkeypatch.setattr(bench, "build_target", lambda model, **_: SimpleNamespace(name=model, num_steps=16))
    monkeypatch.setattr(bench, "calibrate_bundled", lambda model, **_: SimpleNamespace(choices=[]))
    monkeypatch.setattr(bench, "run_benchmark", fake_run_benchmark)
    monkeypatch.setattr(bench, "plot_fidelity", lambda rows, path, title, **_: path.write_text(title))
    monkeypatch.setattr(bench, "plot_frontier", lambda rows, budgets, path, title: path.write_text(title))
    args = _parse(bench, ["bench", "--quick", "--json", str(tmp_path / "b.json"), "--out", str(tmp_path / "o")])
    assert bench.run(args) == 0
    assert "NOT FOR TIMING" in capsys.readouterr().out
    document = json.loads((tmp_path / "b.json").read_text())
    assert document["quick"] is True and document["for_timing"] is False and "NOT FOR TIMING" in document["note"]
    assert document["run"]["stepcache"] and document["run"]["command"]
    assert "NOT FOR TIMING" in (tmp_path / "o" / "bench-wan-digits.md").read_text()
    assert "not for timing" in (tmp_path / "o" / "bench-wan-digits.png").read_text()  # the plot's title


def test_bench_phases_in_order():
    assert [bench._phase(m) for m in ("measuring forwards", "oracle search", "sampling a", "timing 1/3 b")] == [
        0, 1, 2, 2]


def test_out_is_a_folder_with_stable_file_names(tmp_path):
    args = _parse(generate, ["generate", "--out", str(tmp_path / "g")])
    assert args.png == tmp_path / "g" / "wan-digits-stepcache.png"
    args = _parse(calibrate, ["calibrate", "--model", "dreamzero-mini", "--target-forwards", "6", "--out",
                              str(tmp_path / "c")])
    assert args.config_path == tmp_path / "c" / "stepcache-dreamzero-mini-calibrated.json"


def test_out_naming_a_file_still_works_with_a_deprecation_note(tmp_path, capsys):
    args = _parse(generate, ["generate", "--out", str(tmp_path / "grid.png")])
    assert args.png == tmp_path / "grid.png"
    args = _parse(calibrate, ["calibrate", "--target-forwards", "6", "--out", str(tmp_path / "cal.json")])
    assert args.config_path == tmp_path / "cal.json"
    err = capsys.readouterr().err
    assert err.count("deprecated") == 2 and "--out is a folder" in err


def test_generate_defaults_to_the_recommended_preset_and_the_seed_is_one_flag_away(tmp_path):
    from stepcache import DiffusionCacheConfig

    args = _parse(generate, ["generate", "--out", str(tmp_path)])
    assert args.cache_config == DiffusionCacheConfig.preset("balanced")
    args = _parse(generate, ["generate", "--out", str(tmp_path), "--cache-config", "seed"])
    assert args.cache_config == DiffusionCacheConfig()
