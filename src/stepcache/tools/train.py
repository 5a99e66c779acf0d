"""``stepcache train MODEL``: retrain a bundled model from scratch with a fixed seed.

Each bundled model package exposes ``train_bundled(out_dir=None, *, seed=0, steps=None,
progress=True) -> Path``, which writes ``config.json`` and ``model.safetensors`` into ``out_dir``
(by default the package's own bundled weights folder) and returns that folder.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

from stepcache.tools.cli import module_exists

logger = logging.getLogger(__name__)

# model name -> module that defines train_bundled()
TRAINERS = {
    "dreamzero-mini": "stepcache.models.dreamzero.training",
    "wan-digits": "stepcache.models.wan_digits.training",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    available = sorted(name for name, module in TRAINERS.items() if module_exists(module))
    parser.add_argument("model", choices=available, help="which bundled model to train")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the bundled weights)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0, as shipped)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: as shipped)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    trainer = importlib.import_module(TRAINERS[args.model])
    out = trainer.train_bundled(args.out, seed=args.seed, steps=args.steps, progress=not args.no_progress)
    logger.info("wrote %s", out)
    return 0
