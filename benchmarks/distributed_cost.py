"""What StepCache's cross-rank agreement costs, against the forwards it saves, on 1, 2 and 4 gloo ranks.

    python benchmarks/distributed_cost.py                      # every layout, prints a Markdown table
    python benchmarks/distributed_cost.py --chunks 4 --json out.json
    python benchmarks/distributed_cost.py --layouts "SP 2" "CFG 2" --chunks 1     # some layouts only

Each layout of the bundled DreamZero-mini DiT (1 rank: one process; 2: sequence parallel, CFG parallel;
4: sequence parallel, 2 CFG x 2 SP) runs in its own spawned gloo job on this machine, one thread per
rank. Per layout, on rank 0 (every rank waits at a barrier before each timed loop):

- ``signals``: the decision signals of one step, ``velocity_signals(latest, previous, group)``: the
  local per-sample sums of the rank's shard of the guided video velocity plus the one ``all_reduce``
  (median over ``--repeats`` calls; without a group on 1 rank);
- ``check``: what ``check_consistency=True`` adds to one decision (its two ``all_gather`` calls): the
  median of ``plan_step`` with the check minus without it;
- ``start``: what the fingerprint at a generation's start costs (its one ``all_gather`` of 6 int64,
  always on with a group): the median of ``StepCacheState.reset(16)`` with the group minus without;
- ``forward``: one denoising forward of the parallel DiT (median of 20);
- chunk latency of the bundled ``DreamZeroPipeline`` (16 steps, ``pipe(frame, instruction, state)``,
  median over ``--chunks`` chunks after one warm-up chunk; on 1 rank the one-process pipeline, on
  several ``DreamZeroPipeline(..., parallel=groups)`` with StepCache enabled through the backend on
  ``pipeline.decision_group``) with StepCache off, on, and on with the check; and the forwards per
  chunk. A distributed chunk includes the pipeline's own collectives: the input check at its start,
  the gather of the frames and the reduction of its per-step similarity diagnostics at its end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stepcache.tools.common import add_progress_argument, progress_bar, show_progress

LAYOUTS = [  # (name, ranks, cfg_parallel)
    ("1 process", 1, 1),
    ("SP 2", 2, 1),
    ("CFG 2", 2, 2),
    ("SP 4", 4, 1),
    ("CFG 2 x SP 2", 4, 2),
]
STEPS = 16


def _median_us(fn, repeats: int) -> float:
    dist.barrier()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e6 * statistics.median(times)


def _measure(rank: int, world: int, cfg_parallel: int, repeats: int, chunks: int) -> dict[str, Any]:
    from stepcache import StepCacheBackend, StepCacheConfig
    from stepcache.models.dreamzero import ReachingWorld, load_model
    from stepcache.models.dreamzero.model import KVCache
    from stepcache.models.dreamzero.parallel import ParallelGroups, ParallelWorldActionDiT
    from stepcache.models.dreamzero.pipeline import DreamZeroPipeline, DreamZeroPipelineConfig
    from stepcache.models.dreamzero.world import instruction_index
    from stepcache.state import StepCacheState, velocity_signals

    groups = ParallelGroups.create(cfg_parallel=cfg_parallel, sequence_parallel=world // cfg_parallel)
    dit = ParallelWorldActionDiT(load_model("dreamzero-mini"), groups, guidance_scale=5.0)
    group = dit.decision_group if world > 1 else None
    env = ReachingWorld()
    frame, state = env.reset(seed=1)
    latent = torch.as_tensor(frame, dtype=torch.float32)[None] * 2.0 - 1.0
    model_state = torch.as_tensor(state, dtype=torch.float32)[None] * 2.0 - 1.0
    instruction = torch.tensor([instruction_index(env.instruction)])
    config = dit.model.config
    result: dict[str, Any] = {}
    with torch.no_grad():
        kv_cache = KVCache()
        dit.prefill(latent, instruction, kv_cache)
        video = dit.shard_video(torch.randn(1, config.future_frames, config.frame_size, config.frame_size))
        actions = torch.randn(1, config.action_horizon, config.action_dim)
        t = torch.full((1,), 900.0)
        out = dit(video, actions, model_state, t, t, instruction, kv_cache)
        previous = dit(video, actions, model_state, t * 0.9, t * 0.9, instruction, kv_cache).video
        result["forward_ms"] = _median_us(
            lambda: dit(video, actions, model_state, t, t, instruction, kv_cache), 20) / 1000
        result["signals_us"] = _median_us(lambda: velocity_signals(out.video, previous, group), repeats)
        result["local_sums_us"] = _median_us(lambda: velocity_signals(out.video, previous), repeats)
        result["velocity_bytes_per_rank"] = out.video.numel() * out.video.element_size()
        if group is not None:
            history = [(previous,), (out.video,)]
            plain = StepCacheState(StepCacheConfig(), process_group=group)
            checked = StepCacheState(StepCacheConfig(), process_group=group, check_consistency=True)
            plain.plan_step(history), checked.plan_step(history)  # the signals are reduced once, then reused
            result["check_us"] = (_median_us(lambda: checked.plan_step(history), repeats)
                                  - _median_us(lambda: plain.plan_step(history), repeats))
            alone = StepCacheState(StepCacheConfig())
            result["start_us"] = (_median_us(lambda: plain.reset(STEPS), repeats)
                                  - _median_us(lambda: alone.reset(STEPS), repeats))

        def chunk_ms(cache: bool, check: bool = False) -> tuple[float, float]:
            pipe = DreamZeroPipeline(dit.model, DreamZeroPipelineConfig(num_inference_steps=STEPS),
                                     parallel=groups if world > 1 else None)
            if cache:
                backend = StepCacheBackend(None)  # the default config (the seed's rule)
                if world > 1:
                    backend.enable(pipe, process_group=pipe.decision_group, check_consistency=check)
                else:
                    backend.enable(pipe)
            generator = torch.Generator().manual_seed(0)
            latencies, forwards = [], []
            for chunk in range(chunks + 1):  # the context is cleared every 4 chunks, as DreamZero does
                dist.barrier()
                started = time.perf_counter()
                out = pipe(frame, env.instruction, state, generator=generator)
                if chunk:  # the first chunk warms up
                    latencies.append(1000 * (time.perf_counter() - started))
                    forwards.append(out.dit_forwards)
            return statistics.median(latencies), statistics.mean(forwards)

        result["chunk_off_ms"], _ = chunk_ms(False)
        result["chunk_on_ms"], result["forwards_on"] = chunk_ms(True)
        if group is not None:
            result["chunk_check_ms"], _ = chunk_ms(True, check=True)
    return result


def _rank_main(rank: int, world: int, cfg_parallel: int, rendezvous: str, out: str, repeats: int,
               chunks: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = _measure(rank, world, cfg_parallel, repeats, chunks)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        dist.barrier()  # no rank tears gloo down while a peer still talks to it (seen: SIGABRT at exit)
    finally:
        dist.destroy_process_group()


def run_layout(world: int, cfg_parallel: int, repeats: int, chunks: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        mp.start_processes(_rank_main, args=(world, cfg_parallel, str(Path(folder) / "rendezvous"), str(out),
                                             repeats, chunks), nprocs=world, start_method="spawn")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="calls per timed collective")
    parser.add_argument("--chunks", type=int, default=6, help="timed chunks per setting (after one warm-up)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--layouts", nargs="+", choices=[name for name, _, _ in LAYOUTS],
                        help="measure these layouts only (default: every one)")
    add_progress_argument(parser)
    args = parser.parse_args()
    rows = []
    layouts = [layout for layout in LAYOUTS if not args.layouts or layout[0] in args.layouts]
    # Each layout is a spawned job of many seconds: a progress line after every one.
    with progress_bar(total=len(layouts), desc="distributed_cost", unit="layouts", enabled=show_progress(args),
                      interval_s=0) as bar:
        for name, world, cfg_parallel in layouts:
            result = run_layout(world, cfg_parallel, args.repeats, args.chunks)
            rows.append({"layout": name, "ranks": world, **result})
            bar.set_postfix_str(name)
            bar.update()
    print("| layout | ranks | forward ms | signals us (local sums) | check us | start us | pipeline chunk off ms | "
          "chunk on ms (forwards) | chunk on + check ms | per-step cost of the reduction |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        check = f"{row['check_us']:.0f}" if "check_us" in row else "-"
        start = f"{row['start_us']:.0f}" if "start_us" in row else "-"
        checked = f"{row['chunk_check_ms']:.1f}" if "chunk_check_ms" in row else "-"
        share = row["signals_us"] / (10 * row["forward_ms"])  # us / (ms * 1000) in percent
        print(f"| {row['layout']} | {row['ranks']} | {row['forward_ms']:.2f} | {row['signals_us']:.0f} "
              f"({row['local_sums_us']:.0f}) | {check} | {start} | {row['chunk_off_ms']:.1f} | "
              f"{row['chunk_on_ms']:.1f} "
              f"({row['forwards_on']:.0f}/{STEPS}) | {checked} | {share:.1f}% of a forward |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
