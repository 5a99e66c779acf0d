"""``stepcache generate --model wan-digits``: the same digits with and without StepCache, side by side.

Both runs start from the same noise (same seed). The tool prints, for each, the DiT forwards that
actually ran (counted at the transformer's first layer, independently of StepCache's own stats), the
sampling time (after an untimed warm-up run), and how often a classifier trained on the real digits
agrees with the requested class; then the PSNR of the cached digits against the uncached ones. The PNG
(``--out``/MODEL-stepcache.png) shows three panels: without, with, and their absolute difference;
``--json`` writes the figures with the run's versions.
"""

from __future__ import annotations

import argparse
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

from stepcache.config import RECOMMENDED_PRESET, shown
from stepcache.tools.common import (
    UsageError,
    add_cache_config_argument,
    add_json_argument,
    add_progress_argument,
    add_threads_argument,
    checked_cache_config,
    format_cache_config,
    format_number,
    nonnegative_float,
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

MODELS = ("wan-digits",)


def _class_list(text: str) -> list[int]:
    try:
        classes = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a comma-separated list of digits, e.g. 0,1,2") from None
    if not classes or any(not 0 <= c <= 9 for c in classes):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not allowed; allowed: digits 0..9, e.g. 0,1,2")
    return classes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default="wan-digits", help="bundled model")
    parser.add_argument("--weights", type=Path, default=None, metavar="DIR",
                        help="a folder with the model's config.json + model.safetensors (default: the bundled one)")
    parser.add_argument("--classes", type=_class_list, default="0,1,2,3,4,5,6,7,8,9", metavar="LIST",
                        help="digits, e.g. 3,1,4")
    parser.add_argument("--per-class", type=positive_int, default=4, metavar="N", help="samples per class")
    parser.add_argument("--seed", type=seed_int, default=0, help="noise seed, shared by both runs")
    parser.add_argument("--steps", type=positive_int, default=None, metavar="N",
                        help="denoising (scheduler) steps (default: the model's, 16)")
    parser.add_argument("--guidance-scale", type=nonnegative_float, default=None, metavar="S",
                        help="CFG scale (default: the model's)")
    add_cache_config_argument(parser, default=RECOMMENDED_PRESET)
    parser.add_argument("--repeats", type=positive_int, default=1, metavar="N", help="timed runs per setting; median")
    parser.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                        help="folder for the PNG (named MODEL-stepcache.png)")
    add_json_argument(parser, "also write the forwards, times, scores and the run's versions to this JSON file")
    add_threads_argument(parser)
    add_progress_argument(parser)


def png_name(model: str) -> str:
    return f"{model}-stepcache.png"


def validate(args: argparse.Namespace) -> None:
    args.cache_config = checked_cache_config(args.cache_config)
    if args.weights is not None and not Path(args.weights).is_dir():
        raise UsageError(f"argument --weights: {args.weights} is not a folder; allowed: a folder holding the model's "
                         "config.json and model.safetensors (what `stepcache train wan-digits` writes)")
    if args.out.suffix.lower() == ".png":  # the old meaning of --out: the PNG itself
        print(f"stepcache generate: warning: --out {args.out} names a file, which is deprecated: --out is a folder "
              f"and the PNG is named {png_name(args.model)}", file=sys.stderr)
        args.png = prepare_out_dir(args.out.parent) / args.out.name
    else:
        args.png = prepare_out_dir(args.out) / png_name(args.model)
    if args.json is not None:
        args.json = prepare_out_file(args.json)


def _count_forwards(transformer: torch.nn.Module) -> tuple[Callable[[], int], Any]:
    """A counter of forwards that really run: a pre-hook on the first layer, which a reused output never reaches."""
    calls = [0]

    def count(_module: torch.nn.Module, _inputs: Any) -> None:
        calls[0] += 1

    handle = transformer.patch_embedding.register_forward_pre_hook(count)
    return (lambda: calls[0]), handle


def _sample(digits, labels: list[int], args: argparse.Namespace) -> torch.Tensor:
    return digits.sample(labels, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed)


def _timed_sample(digits, labels, args, count: Callable[[], int], bar: Any) -> tuple[torch.Tensor, int, float]:
    """Sample ``args.repeats`` times; return the pixels, forwards per run and the median seconds."""
    seconds = []
    for _ in range(args.repeats):
        before = count()
        start = time.perf_counter()
        pixels = _sample(digits, labels, args)
        seconds.append(time.perf_counter() - start)
        forwards = count() - before
        bar.update()
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


def _write_png(
    path: Path, panels: list[tuple[str, np.ndarray, float, str | None]], rows: int, cols: int, title: str
) -> None:
    """One montage per panel ``(caption, pixels, vmax, colour bar label or None)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Roughly 0.3 inch per digit, so the tiles stay square whatever the grid.
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (0.3 * cols + 0.4), 0.3 * rows + 1.1))
    for ax, (caption, pixels, vmax, colour_bar) in zip(np.atleast_1d(axes), panels):
        grid = _montage(pixels, rows, cols, fill=vmax * 0.25)
        image = ax.imshow(grid, cmap="gray_r", vmin=0.0, vmax=vmax, interpolation="nearest")
        if colour_bar is not None:
            fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02).set_label(colour_bar, fontsize=7)
        ax.set_title(caption, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Both runs and the PNG; ``validate(args)`` has checked and converted the arguments first."""
    from stepcache.integrations.diffusers import disable_step_cache, enable_step_cache, get_step_cache_stats
    from stepcache.models.wan_digits import DigitClassifier, load_wan_digits
    from stepcache.models.wan_digits.data import PIXEL_MAX

    cache_config = checked_cache_config(args.cache_config)  # already converted when stepcache ran validate()
    png = getattr(args, "png", None) or Path(args.out) / png_name(args.model)
    set_torch_threads(args.threads)
    try:
        digits = load_wan_digits(args.weights)
    except (FileNotFoundError, ValueError) as err:
        if args.weights is None:
            raise  # the bundled weights: a broken installation, not a usage error
        raise UsageError(f"argument --weights: {err}") from None
    args.steps = digits.default_num_inference_steps if args.steps is None else args.steps
    args.guidance_scale = digits.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
    labels = [c for c in args.classes for _ in range(args.per_class)]
    print(f"stepcache generate: cache config {format_cache_config(cache_config)}", flush=True)
    classifier = DigitClassifier()
    count, handle = _count_forwards(digits.pipe.transformer)
    runs = 1 + 2 * args.repeats
    try:
        with progress_bar(total=runs, desc="generate", unit="run", enabled=show_progress(args)) as bar:
            # Untimed warm-up: the first call pays one-off costs (allocations, kernel selection).
            _sample(digits, labels, args)
            bar.update()
            plain, plain_forwards, plain_s = _timed_sample(digits, labels, args, count, bar)
            enable_step_cache(digits.pipe, cache_config)
            try:
                cached, cached_forwards, cached_s = _timed_sample(digits, labels, args, count, bar)
                stats = get_step_cache_stats(digits.pipe)
            finally:
                disable_step_cache(digits.pipe)
    finally:
        handle.remove()

    plain_acc, cached_acc = classifier.accuracy(plain, labels), classifier.accuracy(cached, labels)
    psnr = _psnr(plain / PIXEL_MAX, cached / PIXEL_MAX, peak=1.0)
    header = (
        f"{args.model}: {len(args.classes)} classes x {args.per_class}, {args.steps} steps, "
        f"guidance {args.guidance_scale:g}, seed {args.seed}"
    )
    plain_time, cached_time = format_number(plain_s, 3), format_number(cached_s, 3)
    print(header)
    print(f"  without StepCache: {plain_forwards:3d} DiT forwards, {plain_time} s, classifier agrees {plain_acc:.1%}")
    print(
        f"  with StepCache:    {cached_forwards:3d} DiT forwards, {cached_time} s, classifier agrees {cached_acc:.1%}"
        f"  steps [{stats.schedule}]"
    )
    wall_ratio = plain_s / cached_s if cached_s > 0 else math.inf
    forward_ratio = plain_forwards / max(1, cached_forwards)
    print(f"  speed-up {wall_ratio:.2f}x wall, {forward_ratio:.2f}x forwards; PSNR with vs without {psnr:.1f} dB")

    rows, cols = args.per_class, len(args.classes)
    difference = (cached - plain).abs()
    _write_png(
        png,
        [
            (f"without StepCache\n{plain_forwards} forwards, {plain_time} s", plain.numpy(), PIXEL_MAX, None),
            (
                f"with StepCache [{stats.schedule}]\n{cached_forwards} forwards, {cached_time} s",
                cached.numpy(),
                PIXEL_MAX,
                None,
            ),
            (f"|difference|\nPSNR {psnr:.1f} dB", difference.numpy(), PIXEL_MAX,
             f"|with - without| (pixel value, 0-{PIXEL_MAX:g})"),
        ],
        rows,
        cols,
        header,
    )
    print(f"wrote {png}")
    if args.json is not None:
        document = {
            "model": args.model,
            "weights": None if args.weights is None else str(args.weights),
            "classes": args.classes,
            "per_class": args.per_class,
            "seed": args.seed,
            "num_inference_steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "repeats": args.repeats,
            "cache_config": cache_config.to_dict(),
            "runs": {
                "none": {"dit_forwards": plain_forwards, "median_s": plain_s, "classifier_accuracy": plain_acc},
                "step_cache": {"dit_forwards": cached_forwards, "median_s": cached_s,
                               "classifier_accuracy": cached_acc, "schedule": stats.schedule,
                               "psnr_vs_none_db": psnr, "speedup": wall_ratio},
            },
            "png": str(png),
            "run": run_metadata(args),
        }
        print(f"wrote {write_json(args.json, document)}")
    return 0
