"""``stepcache train MODEL``: retrain a bundled model from scratch with a fixed seed.

Each bundled model package exposes ``train_bundled(out_dir, *, seed=0, steps=None, progress=True) ->
Path``, which writes ``config.json`` and ``model.safetensors`` into ``out_dir`` and returns that folder;
``progress`` is a bool or, from here, a maker of the shared progress bar (lines when stderr is no terminal).
The weights go to ``--out`` (default ``./MODEL-weights``), never into the installed package, and never
over existing weights unless ``--overwrite`` says so. Load them with ``Omni(model=FOLDER)``,
``DreamZeroPipeline.from_pretrained(FOLDER)`` or ``load_wan_digits(FOLDER)``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import logging
import time
from pathlib import Path
from typing import Any

from stepcache.tools.cli import module_exists
from stepcache.tools.common import (
    DeprecatedAlias,
    UsageError,
    add_json_argument,
    add_progress_argument,
    add_threads_argument,
    is_inside,
    package_dir,
    positive_int,
    prepare_out_dir,
    prepare_out_file,
    progress_bar,
    run_metadata,
    seed_int,
    set_torch_threads,
    show_progress,
    write_json,
)

logger = logging.getLogger(__name__)

# model name -> module that defines train_bundled()
TRAINERS = {
    "dreamzero-mini": "stepcache.models.dreamzero.training",
    "dreamzero-detour": "stepcache.models.dreamzero_detour.training",
    "wan-digits": "stepcache.models.wan_digits.training",
}
WEIGHT_FILES = ("config.json", "model.safetensors")


def default_out_dir(model: str) -> Path:
    """``./MODEL-weights`` in the working directory."""
    return Path(f"{model}-weights")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    available = sorted(name for name, module in TRAINERS.items() if module_exists(module))
    parser.add_argument("model", choices=available, help="which bundled model to train")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="folder for config.json + model.safetensors (default: ./MODEL-weights; never inside "
                        "the installed package)")
    parser.add_argument("--overwrite", action="store_true", help="replace weights already in --out")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed (0 gave the shipped weights)")
    parser.add_argument("--train-steps", type=positive_int, default=None, metavar="N",
                        help="optimizer steps (default: the shipped weights' count)")
    parser.add_argument("--steps", dest="train_steps", type=positive_int, action=DeprecatedAlias,
                        replacement="--train-steps")
    add_threads_argument(parser, note="default: the model's own, 1 for dreamzero-mini and dreamzero-detour")
    add_json_argument(parser, "also write the run (output folder, seconds, versions) to this JSON file")
    add_progress_argument(parser)


def validate(args: argparse.Namespace) -> None:
    out = default_out_dir(args.model) if args.out is None else Path(args.out).expanduser()
    if is_inside(out, package_dir()):
        raise UsageError(
            f"argument --out: {out} is inside the installed stepcache package ({package_dir()}); training never "
            "writes there: choose another folder"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --out: {out} is a file; allowed: a folder")
    existing = [name for name in WEIGHT_FILES if (out / name).exists()]
    if existing and not args.overwrite:
        raise UsageError(
            f"argument --out: {out} already holds {' and '.join(existing)}; pass --overwrite to replace them, "
            "or choose another --out"
        )
    if args.json is not None:
        args.json = prepare_out_file(args.json)
    args.out = prepare_out_dir(out)


def _progress(args: argparse.Namespace) -> Any:
    """What the trainers take as ``progress``: a maker of the shared bar (lines when stderr is no terminal)."""
    if not show_progress(args):
        return False
    return functools.partial(progress_bar, enabled=True)


def run(args: argparse.Namespace) -> int:
    trainer = importlib.import_module(TRAINERS[args.model])
    options = {}
    if args.threads is not None:
        # A trainer that manages its own thread count (dreamzero-mini: 1) must be told; the others inherit it.
        if "num_threads" in inspect.signature(trainer.train_bundled).parameters:
            options["num_threads"] = args.threads
        set_torch_threads(args.threads)
    start = time.perf_counter()
    out = trainer.train_bundled(
        args.out, seed=args.seed, steps=args.train_steps, progress=_progress(args), **options
    )
    elapsed = time.perf_counter() - start
    print(f"stepcache train: {args.model}, seed {args.seed}, {elapsed:.0f} s; wrote {out / WEIGHT_FILES[0]} and "
          f"{out / WEIGHT_FILES[1]}")
    if args.json is not None:
        document = {"model": args.model, "out": str(out), "seed": args.seed, "train_steps": args.train_steps,
                    "elapsed_s": elapsed, "run": run_metadata(args)}
        print(f"wrote {write_json(args.json, document)}")
    return 0
