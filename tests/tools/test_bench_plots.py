"""The bench plots redrawn from a bench JSON (``stepcache bench --replot``): legend outside the data,
only the best runnable row of each forward budget labelled."""

from __future__ import annotations

import json
import shutil

import pytest

from stepcache.tools import bench, cli
from stepcache.tools.benchmark.report import labelled_rows, plot_fidelity, plot_frontier, rows_from_json
from stepcache.tools.common import docs_figures_dir


def _result(method, config, nfe, psnr, wall):
    return {"method": method, "config": config, "num_steps": 16, "nfe": nfe, "wall_s": wall, "speedup": 16 / nfe,
            "psnr_db": psnr, "ssim": None, "run_steps": None}


def _document():
    results = [_result("full", {}, 16, None, 1.6)]
    results += [_result("fewer_steps", {"num_steps": n}, n, 10 + n, n / 10) for n in (4, 6, 8, 10)]
    results += [_result("planned", {"step_cache_dit_forward_budget": n}, n, 20 + 2 * n, n / 9) for n in (4, 6, 8)]
    results += [_result("oracle", {"step_cache_dit_static_steps": list(range(n))}, n, 60, n / 9) for n in (4, 8)]
    return {"model": "wan-digits", "steps": 16, "quick": False, "seed": 0, "results": results}


def _inside(inner, outer):
    return (inner.x0 >= outer.x0 - 1 and inner.x1 <= outer.x1 + 1
            and inner.y0 >= outer.y0 - 1 and inner.y1 <= outer.y1 + 1)


def _overlaps(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legends_lie_outside_every_axes(tmp_path):
    rows = rows_from_json(_document())
    for legend in (plot_fidelity(rows, tmp_path / "b.png", "t", budgets=[4, 6, 8, 10]),
                   plot_frontier(rows, [4, 6, 8, 10], tmp_path / "f.png", "t")):
        fig = legend.figure
        box = legend.get_window_extent()  # as laid out when the figure was saved
        assert fig.axes and all(not _overlaps(box, axis.get_window_extent()) for axis in fig.axes)
        assert _inside(box, fig.bbox)  # outside the data, not cut off the figure
        assert {t.get_text() for t in legend.get_texts()} >= {"planned", "fewer_steps", "oracle"}
    assert (tmp_path / "b.png").stat().st_size > 10_000 and (tmp_path / "f.png").stat().st_size > 10_000


def test_only_the_best_runnable_row_per_budget_is_labelled():
    rows = rows_from_json(_document())
    chosen = labelled_rows(rows, [4, 6, 8, 10])
    # the oracle is best at 4 and 8 but is no method; at 10 only fewer_steps has a row
    assert [(r.method.method, r.nfe) for r in chosen] == [("planned", 4), ("planned", 6), ("planned", 8),
                                                          ("fewer_steps", 10)]


def test_replot_redraws_the_committed_json_without_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "build_target", lambda *a, **k: pytest.fail("--replot must not run the bench"))
    source = tmp_path / "bench-wan-digits.json"
    shutil.copy(docs_figures_dir() / "bench-wan-digits.json", source)
    assert cli.main(["bench", "--replot", str(source), "--out", str(tmp_path / "o")]) == 0
    for name in ("bench-wan-digits.png", "frontier-wan-digits.png"):
        assert (tmp_path / "o" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(("content", "extra", "message"), [
    ('{"results": [{"method": "full"}]}', [], "lacks"),
    ("not json", [], "--replot"),
    (None, [], "cannot read"),
    (json.dumps(_document()), ["--json", "x.json"], "drop --json"),
])
def test_replot_errors_are_one_line_exit_2(tmp_path, capsys, content, extra, message):
    source = tmp_path / "b.json"
    if content is not None:
        source.write_text(content)
    assert cli.main(["bench", "--replot", str(source), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_replot_needs_out_and_respects_docs_figures(tmp_path, capsys):
    source = tmp_path / "b.json"
    source.write_text(json.dumps(_document()))
    for argv in (["bench", "--replot", str(source)], ["bench", "--replot", str(source), "--out",
                                                      str(docs_figures_dir())]):
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "needs --out" in err and "--update-docs-figures" in err
