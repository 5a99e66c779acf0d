"""``stepcache generate --model wan-digits``: the same digits with and without StepCache, side by side.

Both runs start from the same noise (same seed). The tool prints, for each, the DiT forwards that
actually ran (counted at the transformer's first layer, independently of StepCache's own stats), the
sampling time (after an untimed warm-up run), and how often a classifier trained on the real digits
agrees with the requested class; then the PSNR of the cached digits against the uncached ones. The PNG
shows three panels: without, with, and their absolute difference.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

MODELS = ("wan-digits",)


def _class_list(text: str) -> list[int]:
    try:
        classes = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes: {text!r} is not a comma-separated list of digits") from None
    if not classes or any(not 0 <= c <= 9 for c in classes):
        raise argparse.ArgumentTypeError(f"--classes: {text!r}; allowed: digits 0..9, e.g. 0,1,2")
    return classes


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default="wan-digits", help="bundled model (default wan-digits)")
    parser.add_argument("--weights", type=Path, default=None, help="weights folder (default: the bundled one)")
    parser.add_argument("--classes", type=_class_list, default=list(range(10)), help="digits, e.g. 3,1,4 (default 0-9)")
    parser.add_argument("--per-class", type=_positive_int, default=4, help="samples per class (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed, shared by both runs (default 0)")
    parser.add_argument("--steps", type=_positive_int, default=None, help="scheduler steps (default: the model's, 16)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument(
        "--cache-config",
        default=None,
        help='StepCache settings as JSON, e.g. \'{"velocity_sim_thresholds": [0.97], "velocity_skip_countdowns": [2]}\''
        " (default: the StepCache defaults)",
    )
    parser.add_argument("--repeats", type=_positive_int, default=1, help="timed runs per setting; median (default 1)")
    parser.add_argument("--out", type=Path, default=Path("wan-digits-stepcache.png"), help="PNG to write")


def _count_forwards(transformer: torch.nn.Module) -> tuple[Callable[[], int], Any]:
    """A counter of forwards that really run: a pre-hook on the first layer, which a reused output never reaches."""
    calls = [0]

    def count(_module: torch.nn.Module, _inputs: Any) -> None:
        calls[0] += 1

    handle = transformer.patch_embedding.register_forward_pre_hook(count)
    return (lambda: calls[0]), handle


def _sample(digits, labels: list[int], args: argparse.Namespace) -> torch.Tensor:
    return digits.sample(labels, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed)


def _timed_sample(digits, labels, args, count: Callable[[], int]) -> tuple[torch.Tensor, int, float]:
    """Sample ``args.repeats`` times; return the pixels, forwards per run and the median seconds."""
    seconds = []
    for _ in range(args.repeats):
        before = count()
        start = time.perf_counter()
        pixels = _sample(digits, labels, args)
        seconds.append(time.perf_counter() - start)
        forwards = count() - before
    return pixels, forwards, statistics.median(seconds)


def _psnr(reference: torch.Tensor, test: torch.Tensor, peak: float) -> float:
    mse = float(((reference - test) ** 2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak**2 / mse)


def _montage(pixels: np.ndarray, rows: int, cols: int, fill: float) -> np.ndarray:
    """(rows*cols, 8, 8) images, column-major by class, -> one array with 1-pixel gutters."""
    size = pixels.shape[-1]
    out = np.full((rows * (size + 1) + 1, cols * (size + 1) + 1), fill, dtype=np.float32)
    for index, image in enumerate(pixels):
        top, left = 1 + (index % rows) * (size + 1), 1 + (index // rows) * (size + 1)
        out[top : top + size, left : left + size] = image
    return out


def _write_png(path: Path, panels: list[tuple[str, np.ndarray, float]], rows: int, cols: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Roughly 0.3 inch per digit, so the tiles stay square whatever the grid.
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (0.3 * cols + 0.4), 0.3 * rows + 1.1))
    for ax, (caption, pixels, vmax) in zip(np.atleast_1d(axes), panels):
        grid = _montage(pixels, rows, cols, fill=vmax * 0.25)
        ax.imshow(grid, cmap="gray_r", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(caption, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from stepcache import as_diffusion_cache_config
    from stepcache.integrations.diffusers import apply_step_cache, get_step_cache_stats, remove_step_cache
    from stepcache.models.wan_digits import DigitClassifier, load_wan_digits
    from stepcache.models.wan_digits.data import PIXEL_MAX

    try:  # a bad --cache-config fails before any sampling
        cache_config = as_diffusion_cache_config(args.cache_config)
    except (ValueError, json.JSONDecodeError) as err:
        print(f"stepcache generate: --cache-config: {err}", file=sys.stderr)
        return 2
    digits = load_wan_digits(args.weights)
    args.steps = digits.default_num_inference_steps if args.steps is None else args.steps
    args.guidance_scale = digits.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
    labels = [c for c in args.classes for _ in range(args.per_class)]
    classifier = DigitClassifier()
    count, handle = _count_forwards(digits.pipe.transformer)
    try:
        # Untimed warm-up: the first call pays one-off costs (allocations, kernel selection).
        _sample(digits, labels, args)
        plain, plain_forwards, plain_s = _timed_sample(digits, labels, args, count)
        apply_step_cache(digits.pipe, cache_config)
        try:
            cached, cached_forwards, cached_s = _timed_sample(digits, labels, args, count)
            stats = get_step_cache_stats(digits.pipe)
        finally:
            remove_step_cache(digits.pipe)
    finally:
        handle.remove()

    plain_acc, cached_acc = classifier.accuracy(plain, labels), classifier.accuracy(cached, labels)
    psnr = _psnr(plain / PIXEL_MAX, cached / PIXEL_MAX, peak=1.0)
    header = (
        f"{args.model}: {len(args.classes)} classes x {args.per_class}, {args.steps} steps, "
        f"guidance {args.guidance_scale:g}, seed {args.seed}"
    )
    print(header)
    print(f"  without StepCache: {plain_forwards:3d} DiT forwards, {plain_s:.3f} s, classifier agrees {plain_acc:.1%}")
    print(
        f"  with StepCache:    {cached_forwards:3d} DiT forwards, {cached_s:.3f} s, classifier agrees {cached_acc:.1%}"
        f"  steps [{stats.schedule}]"
    )
    wall_ratio = plain_s / cached_s if cached_s > 0 else math.inf
    forward_ratio = plain_forwards / max(1, cached_forwards)
    print(f"  speed-up {wall_ratio:.2f}x wall, {forward_ratio:.2f}x forwards; PSNR with vs without {psnr:.1f} dB")

    rows, cols = args.per_class, len(args.classes)
    difference = (cached - plain).abs()
    _write_png(
        args.out,
        [
            (f"without StepCache\n{plain_forwards} forwards, {plain_s:.2f} s", plain.numpy(), PIXEL_MAX),
            (
                f"with StepCache [{stats.schedule}]\n{cached_forwards} forwards, {cached_s:.2f} s",
                cached.numpy(),
                PIXEL_MAX,
            ),
            (f"|difference|\nPSNR {psnr:.1f} dB", difference.numpy(), PIXEL_MAX),
        ],
        rows,
        cols,
        header,
    )
    print(f"wrote {args.out}")
    return 0
