"""The bundled pipeline and Omni on 2 and 4 gloo ranks (CFG parallel, sequence parallel, both): the
single-process actions, frames and schedules for every StepCache option, batched episodes with padded
KV contexts, 100 consecutive chunks, and disagreements that fail every rank at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepcache.models.dreamzero.parallel import ParallelConfig
from stepcache.models.dreamzero.training import torch_threads
from stepcache.omni import Omni
from tests.distributed.pipeline_workers import LAYOUTS, OPTION_NAMES, omni_run, skips_and_runs

ATOL = 1e-5


@pytest.fixture(scope="module")
def references(pipeline_setup) -> dict:
    return pipeline_setup["references"]


@pytest.fixture(scope="module")
def model_dir(pipeline_setup) -> str:
    return pipeline_setup["model_dir"]


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request, rank_results) -> list[dict]:
    return rank_results(request.param, "pipeline")


def _assert_same_chunks(mine: list[dict], expected: list[dict], what: str) -> None:
    assert len(mine) == len(expected), what
    for index, (chunk, reference) in enumerate(zip(mine, expected)):
        where = f"{what}, chunk {index}"
        assert chunk["ran"] == reference["ran"], where
        np.testing.assert_allclose(chunk["actions"], reference["actions"], rtol=0, atol=ATOL, err_msg=where)
        np.testing.assert_allclose(chunk["frames"], reference["frames"], rtol=0, atol=ATOL, err_msg=where)
        if "trace" in reference:
            assert [r[0] for r in chunk["trace"]] == [r[0] for r in reference["trace"]], where
            for mine_sim, expected_sim in zip(chunk["similarity"], reference["similarity"], strict=True):
                assert (mine_sim is None) == (expected_sim is None), where
                if mine_sim is not None:
                    assert abs(mine_sim - expected_sim) < 1e-6, where


def test_every_option_gives_the_single_process_actions_frames_and_schedule(ranks, references) -> None:
    runs = references["options"]
    assert all(skips_and_runs(runs[name]) for name in OPTION_NAMES)
    for name in LAYOUTS[len(ranks)]:
        for rank, result in enumerate(ranks):
            for option, chunks in result["layouts"][name]["options"].items():
                _assert_same_chunks(chunks, runs[option], f"{name} rank {rank} {option}")


def test_batched_episodes_with_padded_contexts_match_one_process(ranks, references) -> None:
    expected = references["batched"]
    assert expected[0]["frames"].shape[0] == 1 and expected[1]["frames"].shape[0] == 2
    for name in LAYOUTS[len(ranks)]:
        for rank, result in enumerate(ranks):
            _assert_same_chunks(result["layouts"][name]["batched"], expected, f"{name} rank {rank} batched")


def test_a_hundred_chunks_complete_with_the_single_process_outputs(ranks, references) -> None:
    for rank, result in enumerate(ranks):
        hundred = result["hundred"]
        assert {"".join("R" if r else "." for r in chunk["ran"]) for chunk in hundred["chunks"]} == {"RR."}
        _assert_same_chunks(hundred["chunks"], references["hundred"], f"{hundred['layout']} rank {rank} (100 chunks)")


def test_distributed_omni_gives_the_single_process_outputs(ranks, references, model_dir) -> None:
    with torch.no_grad(), torch_threads(1):
        expected = omni_run(model_dir, references["configs"]["seed_rule"]["cache"], None)
    assert skips_and_runs(expected)
    for rank, result in enumerate(ranks):
        _assert_same_chunks(result["omni"], expected, f"Omni rank {rank}")


def test_disagreements_fail_every_rank_at_once_with_the_difference(ranks) -> None:
    for rank, result in enumerate(ranks):
        errors = {name: message for name, (message, _) in result["errors"].items()}
        # One small check, not a collective timeout (30 s): nobody waited for a peer that never came.
        assert max(seconds for _, seconds in result["errors"].values()) < 10.0
        assert "ranks disagree on the Omni arguments" in errors["omni_config"]
        assert "cache_config rank 0:" in errors["omni_config"]
        assert "ranks disagree on the chunk's inputs" in errors["pipeline_config"]
        assert "stepcache rank 0:" in errors["pipeline_config"]
        assert "noise_generator rank 0:" in errors["seed"]
        assert "ValueError: the StepCache state has no process_group" in errors["no_group"]  # SP: shards differ
        if rank == 1:  # its own error; the others learn that it failed
            assert errors["input"].startswith("ValueError: observation must be finite")
        else:
            assert "rank(s) [1] failed before the chunk's inputs could be checked" in errors["input"]
        assert errors["after"] is None  # and every rank goes on together


def test_omni_parallel_arguments_are_checked_before_anything_starts(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="cfg_parallel must be 1 or 2"):
        Omni(parallel={"cfg_parallel": 3})
    with pytest.raises(ValueError, match="unknown ParallelConfig fields"):
        Omni(parallel={"ranks": 2})
    with pytest.raises(ValueError, match="engine_config does not apply with parallel"):
        Omni(parallel={"cfg_parallel": 2}, engine_config={"max_batch": 4})
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        Omni(parallel=ParallelConfig(cfg_parallel=2))
