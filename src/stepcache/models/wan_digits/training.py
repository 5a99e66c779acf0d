"""Train wan-digits: class-conditional rectified flow on scikit-learn's 8x8 digits.

Loss: ``|| f(x_sigma, 1000 sigma, e_c) - (noise - x0) ||^2`` with ``x_sigma = (1 - sigma) x0 + sigma noise``,
``sigma ~ U(0, 1)`` and the class prompt ``e_c`` replaced by the null prompt with probability
``label_dropout`` (so one network gives both branches of classifier-free guidance). AdamW with a linear
warm-up and cosine decay; the saved weights are an exponential moving average of the trained ones.
Everything random draws from generators seeded by ``seed``, so a run is repeatable on the same machine
and torch version.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stepcache.models.wan_digits.data import load_digit_pixels, pixels_to_latents
from stepcache.models.wan_digits.pipeline import (
    DEFAULT_EMBEDDING_CONFIG,
    DEFAULT_TRANSFORMER_CONFIG,
    build_class_embeddings,
    build_transformer,
    save_wan_digits,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSettings:
    """Optimisation settings of one training run (the defaults produce the shipped weights).

    Args:
        steps: optimizer steps.
        batch_size: images per step.
        learning_rate: peak AdamW learning rate.
        warmup_steps: linear warm-up length, then cosine decay to 0.
        weight_decay: AdamW weight decay.
        ema_decay: decay of the weight average that is saved.
        label_dropout: probability of training a sample on the null prompt (for CFG).
    """

    steps: int = 1600
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.998
    label_dropout: float = 0.15

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)}; allowed >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: got {self.learning_rate}; allowed > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: got {self.warmup_steps}; allowed >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: got {self.ema_decay}; allowed [0, 1)")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout: got {self.label_dropout}; allowed [0, 1)")


@dataclass
class TrainingResult:
    """The averaged (EMA) modules to save, the per-step loss, and the wall time in seconds."""

    transformer: Any
    class_embeddings: Any
    losses: list[float]
    wall_s: float


def _learning_rate_factor(step: int, settings: TrainingSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _update_average(average: torch.nn.Module, trained: torch.nn.Module, decay: float) -> None:
    for avg, new in zip(average.parameters(), trained.parameters(), strict=True):
        avg.lerp_(new, 1.0 - decay)


def train_wan_digits(
    settings: TrainingSettings | None = None,
    *,
    seed: int = 0,
    transformer_config: dict[str, Any] | None = None,
    progress: bool | Callable[..., Any] = False,
) -> TrainingResult:
    """Train a fresh wan-digits transformer and class-embedding table on all 1797 real digits.

    ``progress``: True for a tqdm bar, or ``progress(total=, desc=, unit=)`` returning a tqdm-like bar.
    """
    settings = settings or TrainingSettings()
    torch.manual_seed(seed)  # parameter initialisation
    transformer = build_transformer(transformer_config)
    class_embeddings = build_class_embeddings(DEFAULT_EMBEDDING_CONFIG, transformer.config.text_dim)
    average_transformer = copy.deepcopy(transformer).requires_grad_(False)
    average_embeddings = copy.deepcopy(class_embeddings).requires_grad_(False)
    transformer.train()

    pixels, labels = load_digit_pixels()
    data = pixels_to_latents(pixels)
    classes = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)  # batches, noise levels, noise, label dropout

    parameters = [*transformer.parameters(), *class_embeddings.parameters()]
    optimizer = torch.optim.AdamW(
        parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, betas=(0.9, 0.99)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(step, settings))

    bar = None
    if callable(progress):  # the caller's bar (stepcache train: a bar on a terminal, lines off one)
        bar = progress(total=settings.steps, desc="train wan-digits", unit="steps")
    elif progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=settings.steps, desc="wan-digits", unit="step")
        except ImportError:  # tqdm is an optional extra; fall back to log lines
            bar = None
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(settings.steps):
        index = torch.randint(len(data), (settings.batch_size,), generator=generator)
        x0, batch_classes = data[index], classes[index].clone()
        drop = torch.rand(settings.batch_size, generator=generator) < settings.label_dropout
        batch_classes[drop] = class_embeddings.null_index
        sigma = torch.rand(settings.batch_size, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1.0 - s) * x0 + s * noise
        velocity = transformer(
            hidden_states=noisy,
            timestep=sigma * 1000.0,  # Wan's timestep units: 0..1000
            encoder_hidden_states=class_embeddings(batch_classes),
            return_dict=False,
        )[0]
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        # Early in training the average would be dominated by the random initialisation: warm its decay up.
        decay = min(settings.ema_decay, (1.0 + step) / (10.0 + step))
        _update_average(average_transformer, transformer, decay)
        _update_average(average_embeddings, class_embeddings, decay)
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        elif progress and (step % 200 == 0 or step == settings.steps - 1):
            logger.info("step %d/%d loss %.4f", step + 1, settings.steps, sum(losses[-50:]) / len(losses[-50:]))
    if bar is not None:
        bar.close()
    wall_s = time.perf_counter() - start
    average_transformer.eval()
    average_embeddings.eval()
    return TrainingResult(average_transformer, average_embeddings, losses, wall_s)


def train_bundled(
    out_dir: str | Path, *, seed: int = 0, steps: int | None = None, progress: bool | Callable[..., Any] = True
) -> Path:
    """Train wan-digits with the shipped settings and write ``config.json`` + ``model.safetensors``.

    ``out_dir`` is required: the shipped weights inside the package are never overwritten by default.
    Returns the folder.
    """
    settings = TrainingSettings() if steps is None else TrainingSettings(steps=int(steps))
    out = Path(out_dir)
    logger.info("training wan-digits: %d steps, batch %d, seed %d", settings.steps, settings.batch_size, seed)
    result = train_wan_digits(settings, seed=seed, transformer_config=DEFAULT_TRANSFORMER_CONFIG, progress=progress)
    tail = result.losses[-100:]
    training_info = {
        "seed": seed,
        "settings": asdict(settings),
        "final_loss": round(sum(tail) / len(tail), 5),
        "wall_s": round(result.wall_s, 1),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "command": " ".join(
            [
                "stepcache train wan-digits",
                *([f"--seed {seed}"] if seed else []),
                *([f"--train-steps {steps}"] if steps else []),
            ]
        ),
    }
    logger.info("trained in %.1f s, final loss %.4f", result.wall_s, training_info["final_loss"])
    return save_wan_digits(out, result.transformer, result.class_embeddings, {"training": training_info})
