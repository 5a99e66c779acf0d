"""``stepcache bench``: StepCache against running fewer steps, DreamZero's static mask, diffusers' own
caches and an oracle, on one bundled model, same seeds, one process.

Prints a markdown table; ``--json`` writes the rows, ``--out`` a plot of fidelity against forwards
and against wall time (and the table as markdown).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from stepcache.tools.benchmark.harness import BenchTarget
from stepcache.tools.benchmark.report import benchmark_json, markdown_table, plot_fidelity, write_json
from stepcache.tools.benchmark.suite import run_benchmark

logger = logging.getLogger(__name__)

MODELS = ("wan-digits", "dreamzero-mini")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default="wan-digits", help="bundled model (default wan-digits)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer samples, settings and repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 3, quick 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="write the plot and table here")


def build_target(model: str, *, quick: bool, seed: int) -> BenchTarget:
    """The bundled model as a benchmark target (imports only what that model needs)."""
    if model not in MODELS:
        raise ValueError(f"no benchmark target for model {model!r}; available: {list(MODELS)}")
    if model == "dreamzero-mini":
        from stepcache.models.dreamzero.pipeline import DreamZeroPipeline
        from stepcache.tools.benchmark.dreamzero_target import DreamZeroTarget

        return DreamZeroTarget(
            DreamZeroPipeline.from_pretrained(model),
            episodes=2 if quick else 8,
            closed_loop_episodes=4 if quick else 30,
            seed=seed,
        )
    from stepcache.models.wan_digits import load_wan_digits
    from stepcache.tools.benchmark.wan_digits_target import WanDigitsTarget

    return WanDigitsTarget(load_wan_digits(), samples_per_class=1 if quick else 10, seed=seed)


def run(args: argparse.Namespace) -> int:
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    target = build_target(args.model, quick=args.quick, seed=args.seed)
    with tqdm(desc=f"bench {args.model}", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:

        def progress(message: str) -> None:
            bar.set_postfix_str(message[:60])
            bar.update()

        result = run_benchmark(target, quick=args.quick, repeats=repeats, progress=progress)

    table = markdown_table(result.rows)
    print(f"\n{args.model}: {target.num_steps} steps, fidelity against the full-step output of the same seed\n")
    print(table)
    for name, reason in result.skipped_peers.items():
        print(f"\n{name}: not run ({reason})")
    if result.oracle is not None:
        search = "candidates + local moves" if args.quick else "candidates + backward elimination + local moves"
        print(f"\noracle: {result.oracle.evaluations} schedules sampled ({search})")

    document = benchmark_json(
        target.name,
        target.num_steps,
        result.rows,
        quick=args.quick,
        repeats=repeats,
        skipped_peers=result.skipped_peers,
        oracle_schedules_sampled=None if result.oracle is None else result.oracle.evaluations,
    )
    if args.json:
        write_json(args.json, document)
        print(f"wrote {args.json}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        plot_path = args.out / f"bench-{args.model}.png"
        plot_fidelity(result.rows, plot_path, f"{args.model}: fidelity vs compute ({target.num_steps} steps)")
        (args.out / f"bench-{args.model}.md").write_text(table + "\n")
        print(f"wrote {plot_path}")
    return 0
