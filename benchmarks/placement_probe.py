"""Why the main job's task is a detour and not precise placement: fewer steps place *better*.

Drives ``dreamzero-mini`` closed loop in the reaching world for every chunk of the episode (no early
stop on success), at several step counts, and reports the distribution of the final distance to the
named target and the share of episodes that end within a few tolerances. A task judged by "stop within
r of the target" would rank fewer steps above the full schedule: a sampler with fewer steps is closer to
the mean of the demonstrated actions, and for a single target the mean is what placement rewards. The
detour world instead has two demonstrated ways round an obstacle whose mean points at the obstacle
(docs/dreamzero.md).

    .venv/bin/python benchmarks/placement_probe.py --episodes 40
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

TOLERANCES = (0.005, 0.01, 0.015, 0.02, 0.03, 0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--steps", default="16,4,2", help="comma-separated denoising step counts")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    from stepcache.models.dreamzero.pipeline import DreamZeroPipeline

    torch.set_num_threads(1)
    pipe = DreamZeroPipeline.from_pretrained("dreamzero-mini")
    config = pipe.world_config
    results = {}
    for steps in (int(s) for s in args.steps.split(",")):
        start = time.perf_counter()
        final = []
        for episode in range(args.episodes):
            world = config.make_world()
            frame, state = world.reset(10_000 + episode)  # not the demo's or the bench's seeds
            pipe.reset_context()
            generator = torch.Generator().manual_seed(episode)
            for _ in range(config.max_chunks):
                out = pipe(frame, world.instruction, state, generator=generator, num_inference_steps=steps)
                frame, state = world.execute(out.actions[0])
            final.append(world.distance_to_goal)
        final = np.asarray(final)
        results[steps] = {
            "final_distance_quantiles": dict(zip(("p10", "p25", "p50", "p75", "p90"),
                                                 np.quantile(final, [0.1, 0.25, 0.5, 0.75, 0.9]).round(4).tolist())),
            "within": {str(r): float(np.mean(final <= r)) for r in TOLERANCES},
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"{steps:>2} steps: final distance median {results[steps]['final_distance_quantiles']['p50']:.4f}; "
              + ", ".join(f"within {r}: {100 * share:.0f}%" for r, share in results[steps]["within"].items()),
              flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"episodes": args.episodes, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
