"""The benchmark harness on a tiny random Wan model: every method runs and the report is complete."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from stepcache.tools.benchmark import cache_dit_peer
from stepcache.tools.benchmark.harness import FULL, ORACLE, STATIC_MASK, STEP_CACHE, Method
from stepcache.tools.benchmark.oracle import search_schedules
from stepcache.tools.benchmark.report import benchmark_json, markdown_table, plot_fidelity
from stepcache.tools.benchmark.suite import run_benchmark, scaled_static_mask
from stepcache.tools.benchmark.wan_digits_target import WanDigitsTarget
from tests.tools.tiny_models import single_thread, tiny_wan_digits

PEERS = {"first_block_cache", "mag_cache", "taylorseer_cache", "pyramid_attention_broadcast", "faster_cache"}
if cache_dit_peer.is_installed():  # the optional peer family (the bench extra)
    PEERS.add(cache_dit_peer.CACHE_DIT)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    digits = tiny_wan_digits(tmp_path_factory.mktemp("tiny-wan"))
    return WanDigitsTarget(digits, samples_per_class=1, scores=True)


@pytest.fixture(scope="module")
def result(target):
    return run_benchmark(target, quick=True, repeats=1)


def test_every_method_runs_with_every_field(result, tmp_path):
    families = {row.method.method for row in result.rows}
    assert {FULL, STEP_CACHE, STATIC_MASK, "fewer_steps", ORACLE} | PEERS <= families
    document = benchmark_json("wan-digits", 16, result.rows)
    json.dumps(document)  # serialisable: no NaN/inf left
    for row in document["results"]:
        for key in ("method", "config", "nfe", "wall_s", "speedup", "psnr_db", "ssim", "accuracy", "fid"):
            assert key in row, (key, row)
        assert row["nfe"] > 0 and row["wall_s"] > 0 and row["speedup"] > 0
        if row["method"] != FULL:
            assert row["ssim"] is not None
    full = document["results"][0]
    assert full["method"] == FULL and full["psnr_db"] is None and full["nfe"] == 16
    assert "| step_cache |" in markdown_table(result.rows)
    plot_fidelity(result.rows, tmp_path / "plot.png", "test")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_full_against_itself_is_exact(target):
    full = target.sample(Method(FULL, {}, 16))
    again = target.sample(Method(FULL, {}, 16))
    scores = target.fidelity(again, full)
    assert scores["psnr_db"] is None  # infinite: bit-identical
    assert scores["ssim"] == pytest.approx(1.0)


def test_step_cache_forwards_are_whole_steps_and_fewer_steps_are_exact(result):
    for row in result.rows:
        if row.method.method in (STEP_CACHE, STATIC_MASK, ORACLE):
            assert row.nfe == pytest.approx(len(row.run_steps), abs=1e-6)
        if row.method.method == "fewer_steps":
            assert row.nfe == pytest.approx(row.method.num_steps, abs=1e-6)


def test_oracle_is_never_worse_than_the_schedules_it_was_given(result):
    def psnr(row):
        return math.inf if row.fidelity["psnr_db"] is None else row.fidelity["psnr_db"]

    oracle = {len(row.run_steps): psnr(row) for row in result.rows if row.method.method == ORACLE}
    assert oracle
    for row in result.rows:
        if row.method.method in (STEP_CACHE, STATIC_MASK) and len(row.run_steps) in oracle:
            assert oracle[len(row.run_steps)] >= psnr(row) - 1e-9


def test_search_finds_the_optimum_of_a_known_objective():
    weights = [0.0, 5, 1, 1, 4, 1, 1, 1, 3, 1, 1, 1, 1, 2, 1, 6]

    def objective(schedule):
        return sum(weights[s] for s in schedule)

    result = search_schedules(16, [3, 5], objective)
    for k in (3, 5):
        best = max(
            ((0, *c) for c in itertools.combinations(range(1, 16), k - 1)), key=objective
        )
        assert result.best[k][1] == objective(best)
    assert result.evaluations < 200


def test_search_keeps_better_candidates_and_skips_elimination_when_asked():
    def objective(schedule):
        return -abs(sum(schedule) - 30)

    candidate = (0, 14, 16 - 1)  # sum 29
    result = search_schedules(16, [3], objective, candidates=[candidate], refine_rounds=0, eliminate=False)
    assert result.best[3] == (candidate, -1) and result.evaluations == 1


def test_static_mask_scales_to_other_step_counts():
    assert scaled_static_mask(16) == (0, 1, 2, 6, 10, 13, 14, 15)
    mask = scaled_static_mask(31)
    assert mask[0] == 0 and mask[-1] == 30 and len(mask) == 8


def test_the_frontier_buckets_rows_at_the_next_budget_up():
    from stepcache.tools.benchmark.harness import Method, Row
    from stepcache.tools.benchmark.report import frontier, frontier_table

    def row(family, nfe, psnr):
        return Row(Method(family, {}, 16), nfe, 1.0, 1.0, {"psnr_db": psnr}, {}, None)

    rows = [row("full", 16, None), row("fewer_steps", 4, 21.0), row("step_cache", 4.56, 22.0),
            row("step_cache", 4.0, 19.0), row("planned", 4, 28.0), row("planned", 6, 34.0), row("oracle", 11, 50.0)]
    table = frontier(rows, [4, 5, 6, 8, 10])
    assert table[4]["step_cache"].fidelity["psnr_db"] == 19.0  # 4.56 counts at 5, not at 4
    assert table[5]["step_cache"].nfe == 4.56
    assert table[4]["planned"].fidelity["psnr_db"] == 28.0 and "oracle" not in table[10]
    text = frontier_table(rows, [4, 5, 6, 8, 10])
    assert "| <= 4 | 21 (4.00) | 19 (4.00) | 28 (4.00) | planned |" in text


def test_samples_per_class_sizes_the_evaluated_digits(target):
    from stepcache.tools.bench import build_target

    sized = build_target("wan-digits", quick=False, seed=0, pipeline=target.digits, samples_per_class=3)
    assert len(sized.labels) == 30
    assert len(build_target("wan-digits", quick=True, seed=0, pipeline=target.digits).labels) == 10
