"""How far a session batched with others is from the same session run alone (dreamzero-mini).

Every session's episode is first recorded alone (one session at a time, ``--chunks`` chunks). Then the
sessions are opened again on a fresh ``Omni`` and staggered (session ``s`` is ``s % 4`` chunks ahead,
so contexts of 1 to 4 frames are padded and masked in shared forwards), and ``--rounds`` rounds of
their next chunks start together. Every batched chunk must take the decisions it took alone; the
script prints the largest absolute difference of its frames and actions, overall and per context
length.

    .venv/bin/python benchmarks/batching_rounding.py --sessions 12 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.serving.helpers

from tests.serving.helpers import record_episode

from stepcache.omni import Omni


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chunks = 4 + args.rounds
    with Omni("dreamzero-mini", cache_backend="step_cache") as omni:
        alone = {seed: record_episode(omni, seed, chunks) for seed in range(args.sessions)}
    worst: dict[int, list[float]] = {}
    with Omni("dreamzero-mini", cache_backend="step_cache") as omni:
        sessions = {seed: omni.open_session(seed=seed) for seed in alone}
        for seed, session in sessions.items():
            episode = alone[seed]
            for chunk in range(seed % 4):
                session.generate(episode.observations[chunk], episode.instructions[chunk], episode.states[chunk])
        for round_ in range(args.rounds):
            with omni.engine.paused():
                futures = {}
                for seed, session in sessions.items():
                    chunk, episode = seed % 4 + round_, alone[seed]
                    futures[seed, chunk] = session.submit(episode.observations[chunk], episode.instructions[chunk],
                                                          episode.states[chunk])
            for (seed, chunk), future in futures.items():
                out, ref = future.result(), alone[seed].outputs[chunk]
                if out.stats.ran != ref.stats.ran:
                    raise SystemExit(f"session {seed} chunk {chunk}: decisions differ from running alone")
                entry = worst.setdefault(out.stats.context_frames, [0.0, 0.0])
                entry[0] = max(entry[0], float(np.abs(out.frames - ref.frames).max()))
                entry[1] = max(entry[1], float(np.abs(out.actions - ref.actions).max()))
    print(f"{args.sessions} sessions, {args.rounds} rounds, {args.threads} torch threads: max |batched - alone|")
    for frames in sorted(worst):
        print(f"  context {frames} frames: frames {worst[frames][0]:.3g}, actions {worst[frames][1]:.3g}")
    print(f"  overall: frames {max(v[0] for v in worst.values()):.3g}, actions {max(v[1] for v in worst.values()):.3g}")


if __name__ == "__main__":
    main()
