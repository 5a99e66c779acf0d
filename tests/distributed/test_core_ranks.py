"""StepCache decisions over velocities split across 2 and 4 gloo ranks: every rank decides alike, and
as one process decides on the whole velocity, for the seed's rule and every policy; a NaN on one rank;
a forced disagreement fails fast with a clear error."""

from __future__ import annotations

import math

import pytest
import torch

from stepcache.state import NON_FINITE
from tests.distributed.core_workers import CONFIGS, feature_bounds


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request, rank_results) -> list[dict]:
    return rank_results(request.param, "core")


# The signals are sums of float32 chunk sums: a sharded velocity is chunked differently from the whole
# one, so they agree with one process to float32 rounding, and exactly across the ranks of a group.
SIGNAL_TOLERANCE = 1e-6


def _same_floats(a: list[float | None], b: list[float | None], tol: float = SIGNAL_TOLERANCE) -> bool:
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            if x is not y:
                return False
        elif math.isnan(x) or math.isnan(y):
            if not (math.isnan(x) and math.isnan(y)):
                return False
        elif abs(x - y) > tol:
            return False
    return True


def test_the_references_exercise_skips_and_runs(ranks) -> None:
    # The decisions compared below are worth comparing only if the rules both skip and run.
    reasons = {r for result in ranks[0]["reference"].values() for r in result["reasons"]}
    assert {"similar", "dissimilar", "refresh", "countdown", "within_budget", "over_budget"} <= reasons
    for name, result in ranks[0]["reference"].items():
        assert any(result["ran"]) and not all(result["ran"]), name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_rank_takes_the_single_process_decisions(ranks, name: str) -> None:
    reference = ranks[0]["reference"][name]
    layouts = [layout for (config, layout) in ranks[0]["decisions"] if config == name]
    assert layouts
    for layout in layouts:
        for rank, result in enumerate(ranks):
            mine = result["decisions"][(name, layout)]
            assert mine["ran"] == reference["ran"], (layout, rank)
            assert mine["reasons"] == reference["reasons"], (layout, rank)
            assert _same_floats(mine["similarities"], reference["similarities"]), (layout, rank)
            assert _same_floats(mine["errors"], reference["errors"]), (layout, rank)
        # Within one layout every rank read the very same numbers (one reduction, one result).
        first = ranks[0]["decisions"][(name, layout)]
        for result in ranks[1:]:
            mine = result["decisions"][(name, layout)]
            assert _same_floats(mine["similarities"], first["similarities"], tol=0.0), layout
            assert _same_floats(mine["errors"], first["errors"], tol=0.0), layout


@pytest.mark.parametrize("name", ["seed", "extrapolate"])
def test_each_rank_answers_with_its_part_of_the_single_process_output(ranks, name: str) -> None:
    # Reuse and extrapolation are elementwise: a rank's answer is its part of the whole answer.
    reference = ranks[0]["reference"][name]["outputs"]
    for result in ranks:
        for (config, _layout), mine in result["decisions"].items():
            if config != name:
                continue
            where = mine["where"]
            for step, (local, whole) in enumerate(zip(mine["outputs"], reference)):
                flat = whole[where["samples"]].flatten(1)
                cuts = feature_bounds(where["shards"], flat.shape[1])
                expected = flat[:, cuts[where["shard"]] : cuts[where["shard"] + 1]]
                torch.testing.assert_close(local, expected, rtol=0, atol=1e-6, msg=f"step {step}")


def test_a_nan_on_one_rank_gives_every_rank_the_same_decision(ranks) -> None:
    reference = ranks[0]["nan_reference"]
    assert NON_FINITE in reference["reasons"]
    for rank, result in enumerate(ranks):
        assert result["nan"]["ran"] == reference["ran"], rank
        assert result["nan"]["reasons"] == reference["reasons"], rank
    # Only the last rank held the NaN.
    assert ranks[0]["nan_rank"] == len(ranks) - 1


def test_the_backend_passes_its_group_to_the_pipeline_state(ranks) -> None:
    reference = ranks[0]["reference"]["seed_loose"]["ran"]
    for result in ranks:
        assert result["backend"]["group_is_world"]
        assert result["backend"]["ran"] == reference


def test_a_rank_with_another_config_fails_fast_naming_the_step_and_the_ranks(ranks) -> None:
    for result in ranks:
        message = result["mismatch"]
        assert message is not None
        assert "disagree at the start of a generation" in message
        assert "differing: config (" in message and "rank 1:" in message and "rank 0:" in message
        assert result["mismatch_s"] < 10.0  # a check, not a collective timeout (30 s)
    assert len({result["mismatch"] for result in ranks}) == 1  # every rank raises the same error


def test_a_rank_with_another_generation_length_fails_fast(ranks) -> None:
    for result in ranks:
        assert result["length_mismatch"] is not None
        assert "step count (rank 0: 15, rank 1: 16" in result["length_mismatch"]


def test_without_the_check_a_rank_with_another_config_fails_every_rank_at_the_generation_start(ranks) -> None:
    for result in ranks:
        message = result["start_config"]
        assert message is not None, "a rank with another config succeeded"
        assert "disagree at the start of a generation" in message
        differing = message.split("differing: ")[1].split(". Every rank")[0]
        assert differing.startswith("config (rank 0:") and "step count" not in differing
        assert "sim_thresholds: rank 0: (0.95, 0.93), rank 1: (0.9, 0.85)" in message
        assert result["start_config_s"] < 10.0  # the fingerprint, not a collective timeout (30 s)
    assert len({result["start_config"] for result in ranks}) == 1


def test_without_the_check_a_rank_with_another_step_count_fails_every_rank_at_the_generation_start(ranks) -> None:
    for result in ranks:
        message = result["start_steps"]
        assert message is not None, "a rank with another step count succeeded"
        differing = message.split("differing: ")[1].split(". Every rank")[0]
        assert differing.startswith("step count (rank 0: 15, rank 1: 16") and "config" not in differing
        assert result["start_steps_s"] < 10.0
    assert len({result["start_steps"] for result in ranks}) == 1


def test_a_rank_that_refuses_its_generation_stops_every_rank_at_the_start(ranks) -> None:
    assert ranks[0]["start_refused"].startswith("ValueError")
    for result in ranks[1:]:
        assert "rank(s) [0] refused the arguments of this generation" in result["start_refused"]
