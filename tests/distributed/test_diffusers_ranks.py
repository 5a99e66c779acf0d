"""The diffusers hook on 2 gloo ranks: a transformer whose output stays sharded across the ranks, and
one CFG branch per rank, take the decisions one process takes on the whole output."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def ranks(rank_results) -> list[dict]:
    return rank_results(2, "diffusers")


@pytest.mark.parametrize("case", ["sharded", "branches"])
def test_every_rank_takes_the_single_process_decisions(ranks, case: str) -> None:
    reference = ranks[0][case]["reference"]
    assert any(reference["ran"]) and not all(reference["ran"])  # the schedule both skips and runs
    for rank, result in enumerate(ranks):
        trace = result[case]["trace"]
        assert trace["ran"] == reference["ran"], rank
        assert trace["reasons"] == reference["reasons"], rank
        for mine, expected in zip(trace["similarities"], reference["similarities"], strict=True):
            assert (mine is None) == (expected is None)
            if mine is not None:
                assert math.isclose(mine, expected, abs_tol=1e-6)  # float32 chunk sums


def test_a_sharded_output_gives_the_single_process_latents(ranks) -> None:
    for result in ranks:
        torch.testing.assert_close(result["sharded"]["latents"], result["sharded"]["latents_ref"], rtol=0, atol=1e-5)


def test_one_branch_per_rank_gives_the_single_process_latents_with_half_the_forwards(ranks) -> None:
    for result in ranks:
        branches = result["branches"]
        torch.testing.assert_close(branches["latents"], branches["latents_ref"], rtol=0, atol=1e-5)
        assert 2 * branches["trace"]["forwards"] == branches["reference"]["forwards"]
