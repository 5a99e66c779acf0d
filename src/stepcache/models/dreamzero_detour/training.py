"""Train the bundled ``dreamzero-detour`` model: dreamzero-mini's architecture on the detour world.

Training starts from the bundled ``dreamzero-mini`` weights (which ``stepcache train dreamzero-mini``
recreates) and fine-tunes them on fresh scripted-expert detour episodes, with dreamzero-mini's losses
(flow matching on video and actions, CFG instruction dropout, the grounding aids). Starting there
spends the CPU budget on what is new (seeing the obstacle and going around it) rather than on
relearning to read the instruction from the frames, which takes most of dreamzero-mini's own training.

``stepcache train dreamzero-detour`` calls :func:`train_bundled`; the shipped weights came from its
defaults (seed 0).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from stepcache.models.dreamzero.training import TrainingConfig, torch_threads, train
from stepcache.models.dreamzero.weights import load_model, save_model
from stepcache.models.dreamzero_detour.world import DetourConfig

logger = logging.getLogger(__name__)

NAME = "dreamzero-detour"
INIT = "dreamzero-mini"
# Fine-tuning: a lower peak rate and a short warm-up; otherwise dreamzero-mini's settings.
TRAINING = TrainingConfig(steps=1000, learning_rate=5e-4, warmup_steps=50)


def train_bundled(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    progress: bool | Callable[..., Any] = True,
    num_threads: int | None = 1,
) -> Path:
    """Fine-tune dreamzero-mini on the detour world; writes ``config.json`` + ``model.safetensors``
    (with the world's constants, so that tools drive the right world) into ``out_dir``."""
    out = Path(out_dir)
    config = TrainingConfig(**{**asdict(TRAINING), "seed": seed, **({} if steps is None else {"steps": int(steps)})})
    world = DetourConfig()
    init = load_model(INIT)
    start = time.perf_counter()
    with torch_threads(num_threads):
        model, history = train(init.config, config, world, progress=progress, init=init, name=NAME)
    elapsed = time.perf_counter() - start
    final = float(np.mean([h["loss"] for h in history[-50:]]))
    save_model(model, out, extra={
        "world": {"task": world.task, **world.to_dict()},
        "training": {**asdict(config), "init": INIT, "seconds": round(elapsed, 1), "final_loss": round(final, 5)},
    })
    logger.info("trained %s in %.0f s (final loss %.4f); wrote %s", NAME, elapsed, final, out)
    return out
