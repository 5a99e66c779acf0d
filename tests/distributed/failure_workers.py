"""Rank workers for test_chunk_failures.py: a chunk of a distributed Omni that fails on one rank."""

from __future__ import annotations

from typing import Any

import stepcache.models.dreamzero.pipeline as pipeline_module
from tests.distributed.pipeline_workers import INSTRUCTION, PIPELINE, _error_of, episode_inputs

# The default group's collectives time out after this long here (run_ranks): a rank left waiting for a
# failed peer in a forward's collective fails after it.
COLLECTIVE_TIMEOUT_S = 3.0


def failure_worker(rank: int, world: int, model_dir: str) -> dict[str, Any]:
    from stepcache.omni import Omni

    results: dict[str, Any] = {}
    omni = Omni(model=model_dir, cache_backend="step_cache", pipeline_config=PIPELINE, seed=3,
                parallel={"sequence_parallel": world})
    try:
        (observation, state), = episode_inputs(1, seed=21)

        # Rank 1 fails after the chunk's last collective (building its outputs): every rank fails, naming
        # it, and rolls back; the retry then gives what a chunk that never failed gives.
        def failing_output(**fields: Any) -> Any:
            raise ValueError("injected: rank 1 could not build the chunk's outputs")

        with omni.open_session(seed=5) as session:
            real_output = pipeline_module.ChunkOutput
            if rank == 1:
                pipeline_module.ChunkOutput = failing_output
            try:
                results["after"] = _error_of(lambda: session.generate(observation, INSTRUCTION, state))
            finally:
                pipeline_module.ChunkOutput = real_output
            results["after_chunk_index"] = session.chunk_index
            results["retried"] = session.generate(observation, INSTRUCTION, state).actions
        with omni.open_session(seed=5) as session:
            results["clean"] = session.generate(observation, INSTRUCTION, state).actions

        # Rank 1's forward raises mid-chunk, while rank 0 waits for it in the forward's collectives: every
        # rank fails with "restart the group", and so does every later chunk, at once (no collective).
        dit = omni.pipeline.dit
        real_forward, calls = dit._forward, [0]

        def forward(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if rank == 1 and calls[0] == 2:  # the chunk computes more than one forward
                raise RuntimeError("injected: rank 1's forward failed")
            return real_forward(*args, **kwargs)

        dit._forward = forward
        with omni.open_session(seed=5) as session:
            results["mid"] = _error_of(lambda: session.generate(observation, INSTRUCTION, state))
            results["mid_retry"] = _error_of(lambda: session.generate(observation, INSTRUCTION, state))
            results["mid_chunk_index"] = session.chunk_index
        results["calls"] = calls[0]
    finally:
        omni.close()
    return results
