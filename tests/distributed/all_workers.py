"""One spawned gloo job per rank count runs every area's worker in turn (core, the diffusers hook, the
DreamZero building blocks, the bundled pipeline and Omni): starting ranks (each imports torch, and
diffusers for the pipeline) costs more on this 2-core machine than most of the work they do."""

from __future__ import annotations

import traceback
from typing import Any


class WorkerFailed:
    """What a rank's worker raised (its traceback), in place of its results."""

    def __init__(self, text: str) -> None:
        self.text = text


def all_workers(rank: int, world: int, option_configs: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """Every area's results on this rank, by area. After a failure the rank stops (its peers may be
    waiting in a collective it will never join: they fail on the collective's timeout)."""
    from tests.distributed.core_workers import core_worker
    from tests.distributed.dreamzero_workers import dreamzero_worker
    from tests.distributed.pipeline_workers import pipeline_worker

    areas: dict[str, Any] = {
        "core": lambda: core_worker(rank, world),
        "dreamzero": lambda: dreamzero_worker(rank, world),
        "pipeline": lambda: pipeline_worker(rank, world, option_configs, model_dir),
    }
    if world == 2:  # the diffusers hook's cases need two ranks
        from tests.distributed.diffusers_workers import diffusers_worker

        areas["diffusers"] = lambda: diffusers_worker(rank, world)
    results: dict[str, Any] = {}
    for area, run in areas.items():
        try:
            results[area] = run()
        except Exception:
            results[area] = WorkerFailed(f"rank {rank}, {area}:\n{traceback.format_exc()}")
            break
    return results
