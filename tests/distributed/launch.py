"""Run a function on several gloo ranks (spawned processes) inside a test, with timeouts everywhere.

Every collective has a timeout (the process group's), and the launcher kills the processes it spawned
when they have not all finished within ``timeout_s``, so a hang fails the test instead of blocking the
suite. Ranks rendezvous through a file in the test's temporary folder (no ports).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

# A collective that waits longer than this raises on the waiting rank (gloo's timeout).
COLLECTIVE_TIMEOUT_S = 30.0


def run_ranks(
    worker: Callable[..., Any], world_size: int, workdir: Path, *args: Any, timeout_s: float = 90.0,
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
) -> list[Any]:
    """``worker(rank, world_size, *args)`` on ``world_size`` spawned ranks of a gloo process group (the
    default group, its collectives' timeout ``collective_timeout_s``); returns what each rank's worker
    returned, by rank. ``worker`` must be a module-level function (it is pickled by name)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rendezvous = workdir / f"rendezvous-{time.monotonic_ns()}"
    context = mp.start_processes(
        _rank_main, args=(worker, world_size, str(rendezvous), str(workdir), args, collective_timeout_s),
        nprocs=world_size, join=False, start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} ranks did not finish within {timeout_s:.0f} s (a hang?)")
    finally:
        for process in context.processes:  # only the processes spawned above, by their handles
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(workdir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _rank_main(
    rank: int, worker: Callable[..., Any], world_size: int, rendezvous: str, workdir: str, args: tuple[Any, ...],
    collective_timeout_s: float,
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # the machine has 2 cores for several ranks
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
    # The launcher's own group: the end's barrier still works after a worker left the default group
    # unusable on purpose (a collective that timed out closes gloo's connections of that group).
    finished = dist.new_group(backend="gloo")
    try:
        result = worker(rank, world_size, *args)
        torch.save(result, Path(workdir) / f"rank{rank}.pt")
        # Every rank done before any tears gloo down: without this, a rank sometimes aborted at exit
        # ("terminate called without an active exception", SIGABRT) in the benchmark's jobs.
        dist.barrier(group=finished)
    finally:
        dist.destroy_process_group()
