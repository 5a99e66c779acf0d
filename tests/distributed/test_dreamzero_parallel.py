"""The bundled DiT on 2 and 4 gloo ranks: sequence parallelism, CFG parallelism and both give one
process's outputs (each rank its shard), and StepCache over the sharded velocity keeps its schedule."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.dreamzero_workers import LAYOUTS

ATOL = 1e-5


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request, rank_results) -> list[dict]:
    return rank_results(request.param, "dreamzero")


def _shard(video: torch.Tensor, result: dict) -> torch.Tensor:
    """A rank's part of a whole video ``(B, F, S, S)``: rows of ``(B, F * S, S)`` under sequence parallelism."""
    return video.flatten(1, 2)[:, result["rows"]] if result["sp"] > 1 else video


def _layouts(ranks) -> list[str]:
    return list(LAYOUTS[len(ranks)])


def test_each_rank_holds_its_shard_of_the_single_process_forward(ranks) -> None:
    for name in _layouts(ranks):
        shards = []
        for rank, result in enumerate(ranks):
            forward, rows = result[name]["forward"], result[name]["rows"]
            expected = _shard(forward["video_ref"], result[name])
            assert forward["video"].shape == expected.shape, (name, rank)
            torch.testing.assert_close(forward["video"], expected, rtol=0, atol=ATOL, msg=f"{name} rank {rank}")
            torch.testing.assert_close(forward["action"], forward["action_ref"], rtol=0, atol=ATOL)
            torch.testing.assert_close(forward["whole_video"], forward["video_ref"], rtol=0, atol=ATOL)
            shards.append((rows.start, rows.stop))
        if result[name]["sp"] > 1:  # the shards tile the video
            starts = sorted(set(shards))
            assert starts[0][0] == 0 and all(a[1] == b[0] for a, b in zip(starts, starts[1:]))
            assert len(starts) == result[name]["sp"]


def test_prefill_caches_every_token_of_the_frame_on_every_rank(ranks) -> None:
    for name in _layouts(ranks):
        for rank, result in enumerate(ranks):
            forward = result[name]["forward"]
            assert len(forward["keys"]) == len(forward["keys_ref"]) == 2
            for keys, expected in zip(forward["keys"], forward["keys_ref"]):
                torch.testing.assert_close(keys, expected, rtol=0, atol=ATOL, msg=f"{name} rank {rank}")


def test_stepcache_over_sharded_velocities_keeps_the_single_process_schedule_and_outputs(ranks) -> None:
    for name in _layouts(ranks):
        for rank, result in enumerate(ranks):
            loop = result[name]["loop"]
            assert any(loop["ran_ref"]) and not all(loop["ran_ref"])  # the schedule both skips and runs
            assert loop["ran"] == loop["ran_ref"], (name, rank)
            expected = _shard(loop["video_ref"], result[name])
            torch.testing.assert_close(loop["video"], expected, rtol=0, atol=ATOL, msg=f"{name} rank {rank}")
            torch.testing.assert_close(loop["actions"], loop["actions_ref"], rtol=0, atol=ATOL)


def test_a_rank_with_another_config_fails_fast_instead_of_hanging(ranks) -> None:
    for result in ranks:
        assert result["mismatch"] is not None and "disagree at the start of a generation" in result["mismatch"]


def test_layouts_that_cannot_work_are_refused_with_the_numbers(ranks) -> None:
    for result in ranks:
        errors = result["errors"]
        assert "the world has" in errors["world"]
        assert "guidance_scale is 1.0" in errors["guidance"]
        if len(ranks) == 4:  # 4 ranks cannot share the 2 rows of patches of an 8x8 frame of 4x4 patches
            assert "use a rank count that divides 2" in errors["rows"]
        else:
            assert errors["rows"] is None
