"""cache-dit as a peer family of the bench, on a tiny random Wan model: its cost is read from its own
statistics (blocks computed over all blocks, per call; and as on a 40-block model), it is removed
exactly, and the bench says in one line when it is not installed. Skipped where cache-dit is absent
(the ``bench`` extra, which scripts/setup.sh installs, has it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from stepcache.tools.benchmark import cache_dit_peer
from stepcache.tools.benchmark.harness import FULL, NFE_40_BLOCKS, Method, PeerCache, Row
from stepcache.tools.benchmark.report import (
    at_40_blocks,
    benchmark_json,
    frontier_table,
    markdown_table,
    rows_from_json,
)
from stepcache.tools.benchmark.wan_digits_target import WanDigitsTarget
from tests.tools.tiny_models import single_thread, tiny_wan_digits

STEPS = 16
requires_cache_dit = pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None,
                                        reason="cache-dit is not installed (the 'bench' extra)")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    digits = tiny_wan_digits(tmp_path_factory.mktemp("tiny-wan"))
    return WanDigitsTarget(digits, samples_per_class=1, scores=False)


@pytest.fixture(scope="module")
def reference(target):
    return target.sample(Method(FULL, {}, STEPS))


def _dbcache(front: int, back: int, threshold: float, **more) -> Method:
    def build():
        cache_dit = cache_dit_peer._cache_dit()
        return {"cache_config": cache_dit.DBCacheConfig(
            Fn_compute_blocks=front, Bn_compute_blocks=back, residual_diff_threshold=threshold,
            max_warmup_steps=2, num_inference_steps=STEPS, **more)}

    return Method(cache_dit_peer.CACHE_DIT, {}, STEPS, peer=PeerCache(cache_dit_peer.CACHE_DIT, {}, build,
                                                                      library=cache_dit_peer.CACHE_DIT))


@requires_cache_dit
def test_the_cost_is_the_blocks_cache_dit_computed_per_call(target, reference):
    blocks = len(target.pipe.transformer.blocks)
    sample = target.sample(_dbcache(1, 0, threshold=100.0))  # every step after the 2 warm-up steps cached
    cached = list(range(2, STEPS))
    assert sample.extra["cached_steps"] == [cached, cached]  # both CFG branches, as cache-dit reports them
    assert sample.nfe == pytest.approx(2 + 14 * 1 / blocks)
    assert sample.nfe_40_blocks == pytest.approx(2 + 14 * 1 / 40)
    # torch's FLOP counter agrees with the block count (what it adds: embeddings and the output head)
    assert sample.extra["flops_nfe"] == pytest.approx(sample.nfe, abs=0.1 * STEPS / blocks)
    assert target.fidelity(sample, reference)["psnr_db"] is not None
    # a back block too: a cached step costs both
    both = target.sample(_dbcache(1, 1, threshold=100.0))
    assert both.nfe == pytest.approx(2 + 14 * 2 / blocks) and both.nfe_40_blocks == pytest.approx(2 + 14 * 2 / 40)


@requires_cache_dit
def test_nothing_cached_is_exact_and_disabling_restores_the_pipeline(target, reference):
    never = target.sample(_dbcache(1, 0, threshold=0.0))
    assert never.extra["cached_steps"] == [[], []] and never.nfe == STEPS == never.nfe_40_blocks
    assert torch.equal(never.outputs["image"], reference.outputs["image"])
    target.sample(_dbcache(1, 0, threshold=100.0))
    again = target.sample(Method(FULL, {}, STEPS))
    assert torch.equal(again.outputs["image"], reference.outputs["image"])


@requires_cache_dit
def test_an_scm_mask_caches_the_steps_it_masks(target):
    cache_dit = cache_dit_peer._cache_dit()
    mask = cache_dit.steps_mask(mask_policy="fast", total_steps=STEPS)
    sample = target.sample(_dbcache(1, 0, threshold=100.0, steps_computation_mask=mask,
                                    steps_computation_policy="static"))
    masked = [step for step, compute in enumerate(mask) if not compute]
    assert masked and sample.extra["cached_steps"] == [masked, masked]


@requires_cache_dit
def test_the_bench_rows_cover_dbcache_taylorseer_and_scm_and_quick_keeps_the_cheap_probe(target):
    peers, skipped = target.peer_caches()
    rows = [p for p in peers if p.library == cache_dit_peer.CACHE_DIT]
    assert not skipped and {r.settings["cache"] for r in rows} == {"DBCache", "DBCache+TaylorSeer", "DBCache+SCM"}
    assert rows[0].settings == {"cache": "DBCache", "Fn": 1, "Bn": 0, "threshold": 0.24}  # --quick's one row
    assert {r.settings["mask"] for r in rows if "mask" in r.settings} == set(cache_dit_peer.SCM_POLICIES)
    sample = target.sample(Method(rows[-1].name, rows[-1].settings, STEPS, peer=rows[-1]))  # an SCM row runs
    assert sample.nfe < STEPS and sample.nfe_40_blocks < sample.nfe


def test_without_cache_dit_the_bench_says_so_in_one_line(target, monkeypatch):
    monkeypatch.setattr(cache_dit_peer, "is_installed", lambda: False)
    peers, skipped = target.peer_caches()
    assert not any(p.library == cache_dit_peer.CACHE_DIT for p in peers) and peers  # diffusers' caches still run
    (reason,) = skipped.values()
    assert "not installed" in reason and "[bench]" in reason and "\n" not in reason


def test_the_40_block_cost_is_a_column_of_the_tables_and_survives_the_json():
    def row(family: str, nfe: float, psnr: float, at_40: float | None = None) -> Row:
        return Row(Method(family, {}, STEPS), nfe, 1.0, 1.0, {"psnr_db": psnr, "ssim": 1.0}, {}, None,
                   nfe_40_blocks=at_40)

    rows = [row(FULL, 16, None), row("planned", 6, 40.0), row(cache_dit_peer.CACHE_DIT, 7.75, 30.0, 5.3)]
    table = frontier_table(rows, [4, 6, 8])
    header, _, at_4, at_6, at_8 = table.splitlines()
    assert at_40_blocks(cache_dit_peer.CACHE_DIT) in header
    assert "30 (5.30)" in at_6 and "30 (7.75)" in at_8 and "30" not in at_4  # each cost at its own budget
    assert NFE_40_BLOCKS in markdown_table(rows).splitlines()[0]
    document = benchmark_json("wan-digits", STEPS, rows)
    assert document["results"][2][NFE_40_BLOCKS] == 5.3 and NFE_40_BLOCKS not in document["results"][1]
    assert [r.nfe_40_blocks for r in rows_from_json(document)] == [None, None, 5.3]
    assert frontier_table(rows_from_json(document), [4, 6, 8]) == table
