"""The benchmark on a tiny random DreamZero-mini: every method runs and replays are exact (a calibrated
config driving Omni is tested in tests/calibration/test_entry_points.py)."""

from __future__ import annotations

import json

import pytest

from stepcache import is_stepcache_active
from stepcache.models.dreamzero.pipeline import DreamZeroPipeline
from stepcache.tools.benchmark.dreamzero_target import DIFFUSERS_CACHES, DreamZeroTarget
from stepcache.tools.benchmark.harness import FULL, ORACLE, STATIC_MASK, STEP_CACHE, Method, PeerCache
from stepcache.tools.benchmark.report import benchmark_json
from stepcache.tools.benchmark.suite import run_benchmark, step_cache_method
from tests.models.dreamzero.tiny import make_tiny_model
from tests.tools.tiny_models import single_thread


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def target():
    return DreamZeroTarget(DreamZeroPipeline(make_tiny_model()), episodes=1, closed_loop_episodes=1)


def test_every_method_runs_and_diffusers_caches_are_explained(target):
    result = run_benchmark(target, quick=True, repeats=1)
    families = {row.method.method for row in result.rows}
    assert {FULL, STEP_CACHE, STATIC_MASK, "fewer_steps"} <= families
    assert set(result.skipped_peers) == {*DIFFUSERS_CACHES, "cache_dit"}
    assert all("plain torch" in reason for reason in result.skipped_peers.values())
    document = benchmark_json(target.name, 16, result.rows)
    json.dumps(document)
    for row in document["results"]:
        for key in ("nfe", "wall_s", "speedup", "psnr_db", "ssim", "action_mse", "success_rate", "final_distance"):
            assert key in row, (key, row)
    full = document["results"][0]
    assert full["nfe"] == 16 and full["psnr_db"] is None
    for row in result.rows:
        if row.method.method in (STATIC_MASK, ORACLE):  # fixed schedules: the same forwards every chunk
            assert row.nfe == len(row.run_steps)
        if row.method.method == "fewer_steps":
            assert row.nfe == row.method.num_steps


def test_full_replay_is_exact_and_a_never_firing_cache_changes_nothing(target):
    full = target.sample(Method(FULL, {}, 16))
    again = target.sample(Method(FULL, {}, 16))
    never = target.sample(step_cache_method(16, (1.0,), (1,)))
    for other in (again, never):
        scores = target.fidelity(other, full)
        assert scores["psnr_db"] is None and scores["action_mse"] == 0.0
    assert never.nfe == 16
    assert not is_stepcache_active(target.pipe)  # every sample leaves the pipeline as it found it


def test_peer_caches_are_refused(target):
    peer = PeerCache("first_block_cache", {"threshold": 0.1}, lambda: None)
    peer_method = Method(peer.name, peer.settings, 16, peer=peer)
    with pytest.raises(ValueError, match="does not apply"):
        target.sample(peer_method)
