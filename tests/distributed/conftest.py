from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stepcache.models.dreamzero.training import torch_threads
from tests.distributed.all_workers import WorkerFailed, all_workers
from tests.distributed.launch import run_ranks

RANK_COUNTS = [2, 4]


@pytest.fixture(scope="session")
def pipeline_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The pipeline tests' single-process references and configs, and the tiny model's folder (the
    ranks load it through Omni)."""
    from tests.distributed.pipeline_workers import save_model_dir, single_process_references

    with torch_threads(1):  # a tiny model: a second thread only adds synchronisation on 2 loaded cores
        references = single_process_references()
    return {"references": references, "model_dir": save_model_dir(tmp_path_factory.mktemp("omni-ranks") / "tiny")}


@pytest.fixture(scope="session")
def rank_results(
    tmp_path_factory: pytest.TempPathFactory, pipeline_setup: dict[str, Any]
) -> Iterator[Callable[[int, str], list[Any]]]:
    """``rank_results(world, area)``: that area's results on each of ``world`` ranks, by rank. The job
    of each rank count runs once, for every area, when first asked for."""
    jobs: dict[int, list[dict[str, Any]]] = {}

    def results(world: int, area: str) -> list[Any]:
        if world not in jobs:
            jobs[world] = run_ranks(all_workers, world, tmp_path_factory.mktemp(f"ranks{world}"),
                                    pipeline_setup["references"]["configs"], pipeline_setup["model_dir"],
                                    timeout_s=300)
        by_rank = [job.get(area) for job in jobs[world]]
        failures = [r.text for r in by_rank if isinstance(r, WorkerFailed)]
        if failures or any(r is None for r in by_rank):
            pytest.fail("\n".join(failures) or f"{area} did not run on every rank (an earlier area failed)")
        return by_rank

    yield results
