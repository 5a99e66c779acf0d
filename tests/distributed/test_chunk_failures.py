"""A distributed Omni chunk that fails on one rank (2 gloo ranks, sequence parallel): every rank fails
together, naming the rank; after a failure while collectives were pending, every later chunk is refused
("restart the group"). Never a hang, never an abort."""

from __future__ import annotations

import numpy as np
import pytest

from tests.distributed.failure_workers import COLLECTIVE_TIMEOUT_S, failure_worker
from tests.distributed.launch import run_ranks


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    from tests.distributed.pipeline_workers import save_model_dir

    model_dir = save_model_dir(tmp_path_factory.mktemp("failures") / "tiny")
    # A hang or an abort on any rank fails here (run_ranks kills the ranks after timeout_s).
    return run_ranks(failure_worker, 2, tmp_path_factory.mktemp("failure-ranks"), model_dir, timeout_s=120,
                     collective_timeout_s=COLLECTIVE_TIMEOUT_S)


def test_a_rank_that_fails_after_the_collectives_fails_every_rank_and_the_retry_succeeds(ranks) -> None:
    own, _ = ranks[1]["after"]
    assert own is not None and own.startswith("ValueError: injected")
    other, seconds = ranks[0]["after"]
    assert other is not None, "rank 0 reported the chunk as served while rank 1 failed it"
    assert "failed on rank(s) [1]" in other and "ValueError: injected" in other and "retry" in other
    assert seconds < COLLECTIVE_TIMEOUT_S  # agreed at once, not after a timeout
    for result in ranks:
        assert result["after_chunk_index"] == 0  # rolled back on every rank
        np.testing.assert_array_equal(result["retried"], result["clean"])
    np.testing.assert_array_equal(ranks[0]["retried"], ranks[1]["retried"])


def test_a_forward_that_fails_mid_chunk_makes_every_rank_refuse_further_chunks(ranks) -> None:
    for rank, result in enumerate(ranks):
        message, seconds = result["mid"]
        assert message is not None, rank
        assert "failed on rank(s)" in message and "rank 1: RuntimeError: injected" in message, message
        assert "restart the group" in message
        assert seconds < 4 * COLLECTIVE_TIMEOUT_S + 5  # the peer's collective timed out; nothing hung
        retry, retry_seconds = result["mid_retry"]
        assert retry is not None and "restart the group" in retry
        assert retry_seconds < 1.0  # refused before any collective
        assert result["mid_chunk_index"] == 0  # the failed chunk was rolled back
        assert result["calls"] == 2  # the retry never reached a forward
