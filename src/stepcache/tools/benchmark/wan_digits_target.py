"""The benchmark on ``wan-digits``: a diffusers ``WanPipeline`` (two transformer calls per step, CFG).

Every method samples the same labels from the same seed. StepCache, the static mask and the oracle go
through :func:`~stepcache.integrations.diffusers.enable_step_cache`; diffusers' own caches through
``transformer.enable_cache``; cache-dit (where installed) through ``cache_dit.enable_cache(pipe)``.
Forwards are counted as FLOPs (torch's counter) in units of one full step, so a cache that computes
part of the model gets a fractional ``nfe``; cache-dit's rows count blocks instead, from its own
statistics, here and as on a 40-block model (:mod:`~stepcache.tools.benchmark.cache_dit_peer`).
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import math
from typing import Any

import torch

from stepcache.integrations.diffusers import disable_step_cache, enable_step_cache, get_step_cache_stats
from stepcache.models.wan_digits.classifier import DigitClassifier
from stepcache.models.wan_digits.data import PIXEL_MAX, load_digit_pixels
from stepcache.tools.benchmark import cache_dit_peer
from stepcache.tools.benchmark.digit_features import DigitFeatureNet
from stepcache.tools.benchmark.harness import FULL, BenchTarget, Method, PeerCache, Sample
from stepcache.tools.benchmark.metrics import count_flops, frechet_distance, psnr_db, ssim

logger = logging.getLogger(__name__)

# 8x8 images: the standard 11x11 SSIM window does not fit.
SSIM_KERNEL = 7
# The per-block modules whose outputs TaylorSeer forecasts: self-attention, cross-attention, feed-forward.
WAN_FEATURE_MODULES = r"blocks\.\d+\.(attn1|attn2|ffn)"


class WanDigitsTarget(BenchTarget):
    """Samples ``samples_per_class`` digits of each class with seed ``seed``.

    Args:
        digits: a loaded :class:`~stepcache.models.wan_digits.pipeline.WanDigits`.
        num_steps: the reference step count (default: the model's).
        scores: compute classifier accuracy and FID (off in tests of the harness on random models).
    """

    name = "wan-digits"

    def __init__(
        self,
        digits: Any,
        *,
        samples_per_class: int = 10,
        seed: int = 0,
        num_steps: int | None = None,
        scores: bool = True,
    ) -> None:
        self.digits = digits
        self.pipe = digits.pipe
        self.labels = torch.arange(digits.num_classes).repeat_interleave(samples_per_class)
        self.seed = seed
        self.num_steps = int(num_steps or digits.default_num_inference_steps)
        self._flops_per_step: float | None = None
        self._mag_ratios: list[float] | None = None
        self._classifier = DigitClassifier() if scores else None
        self._features = DigitFeatureNet.train_on_real_digits() if scores else None
        self._real_pixels = torch.as_tensor(load_digit_pixels()[0], dtype=torch.float32) if scores else None

    # -- sampling -------------------------------------------------------------------------------
    def _generate(self, num_steps: int) -> torch.Tensor:
        return self.digits.sample(self.labels, num_inference_steps=num_steps, seed=self.seed)

    def sample(self, method: Method, *, measure: bool = True) -> Sample:
        transformer = self.pipe.transformer
        cache_dit = method.peer is not None and method.peer.library == cache_dit_peer.CACHE_DIT
        if method.step_cache is not None:
            enable_step_cache(self.pipe, method.step_cache)
        elif cache_dit:
            cache_dit_peer.enable(self.pipe, method.peer.build())
        elif method.peer is not None:
            transformer.enable_cache(method.peer.build())
        try:
            if not measure:
                return Sample({"image": self._generate(method.num_steps)}, nfe=math.nan)
            pixels, flops = count_flops(lambda: self._generate(method.num_steps))
            run_steps = get_step_cache_stats(self.pipe).run_steps if method.step_cache is not None else None
            blocks = cache_dit_peer.block_forwards(self.pipe, method.num_steps) if cache_dit else None
        finally:
            if method.step_cache is not None:
                disable_step_cache(self.pipe)
            elif cache_dit:
                cache_dit_peer.disable(self.pipe)
            elif method.peer is not None:
                transformer.disable_cache()
        if method.method == FULL and self._flops_per_step is None:
            self._flops_per_step = flops / method.num_steps
        if self._flops_per_step is None:
            raise RuntimeError("sample the full-step reference first: forwards are counted against it")
        if blocks is not None:  # cache-dit: blocks computed over all blocks, per call, from its statistics
            measured, on_40_blocks, cached = blocks
            return Sample({"image": pixels}, nfe=measured, nfe_40_blocks=on_40_blocks,
                          extra={"cached_steps": cached, "flops_nfe": flops / self._flops_per_step})
        return Sample({"image": pixels}, nfe=flops / self._flops_per_step, run_steps=run_steps)

    # -- scores ---------------------------------------------------------------------------------
    def fidelity(self, sample: Sample, reference: Sample) -> dict[str, float | None]:
        output, target = sample.outputs["image"][:, None], reference.outputs["image"][:, None]
        return {
            "psnr_db": psnr_db(output, target, data_range=PIXEL_MAX),
            "ssim": ssim(output, target, data_range=PIXEL_MAX, kernel_size=SSIM_KERNEL),
        }

    def quality(self, sample: Sample) -> dict[str, float | None]:
        if self._classifier is None:
            return {}
        pixels = sample.outputs["image"]
        return {
            "accuracy": self._classifier.accuracy(pixels, self.labels.numpy()),
            "fid": frechet_distance(
                self._real_pixels[:, None] / PIXEL_MAX,
                pixels[:, None].clamp(0, PIXEL_MAX) / PIXEL_MAX,
                self._features.features,
                self._features.num_features,
            ),
        }

    # -- peers ----------------------------------------------------------------------------------
    def _calibrated_mag_ratios(self) -> list[float]:
        """MagCache needs per-step residual magnitude ratios of this model: measure them once.

        diffusers' calibration mode prints the ratios at the end of the run (its documented way of
        handing them over), once per CFG branch; the first printed list (the conditional branch's) is used.
        """
        if self._mag_ratios is None:
            from diffusers import MagCacheConfig

            printed = io.StringIO()
            self.pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=self.num_steps))
            try:
                with contextlib.redirect_stdout(printed):
                    self._generate(self.num_steps)
            finally:
                self.pipe.transformer.disable_cache()
            lists = [line for line in printed.getvalue().splitlines() if line[:1] == "[" and line[1:2] != "M"]
            if not lists:
                raise RuntimeError("MagCache calibration printed no ratios")
            self._mag_ratios = [float(r) for r in ast.literal_eval(lists[0])]
        return self._mag_ratios

    def peer_caches(self) -> tuple[list[PeerCache], dict[str, str]]:
        from diffusers import (
            FasterCacheConfig,
            FirstBlockCacheConfig,
            MagCacheConfig,
            PyramidAttentionBroadcastConfig,
            TaylorSeerCacheConfig,
        )

        pipe, n = self.pipe, self.num_steps

        def timestep() -> int:
            return int(pipe.current_timestep)

        peers: list[PeerCache] = []
        for threshold in (0.05, 0.1, 0.2, 0.4):
            peers.append(
                PeerCache(
                    "first_block_cache",
                    {"threshold": threshold},
                    lambda t=threshold: FirstBlockCacheConfig(threshold=t),
                )
            )
        ratios = self._calibrated_mag_ratios()
        for threshold in (0.06, 0.12, 0.24, 0.48):
            peers.append(
                PeerCache(
                    "mag_cache",
                    {"threshold": threshold, "max_skip_steps": 3, "calibrated": True},
                    lambda t=threshold: MagCacheConfig(
                        threshold=t, max_skip_steps=3, num_inference_steps=n, mag_ratios=ratios
                    ),
                )
            )
        for interval in (2, 3, 4):
            peers.append(
                PeerCache(
                    "taylorseer_cache",
                    {"cache_interval": interval, "disable_cache_before_step": 2, "max_order": 1},
                    lambda i=interval: TaylorSeerCacheConfig(
                        cache_interval=i,
                        disable_cache_before_step=2,
                        max_order=1,
                        taylor_factors_dtype=torch.float32,
                        # diffusers' default patterns ("^blocks.*attn", matched in full) miss Wan's
                        # `attn1` / `attn2`, which would leave TaylorSeer hooked to nothing.
                        cache_identifiers=[WAN_FEATURE_MODULES],
                    ),
                )
            )
        for skip in (2, 4):
            peers.append(
                PeerCache(
                    "pyramid_attention_broadcast",
                    {"spatial_attention_block_skip_range": skip, "timestep_skip_range": [100, 800]},
                    lambda s=skip: PyramidAttentionBroadcastConfig(
                        spatial_attention_block_skip_range=s,
                        spatial_attention_timestep_skip_range=(100, 800),
                        current_timestep_callback=timestep,
                    ),
                )
            )
        for skip in (2, 4):
            peers.append(
                PeerCache(
                    "faster_cache",
                    {"spatial_attention_block_skip_range": skip, "is_guidance_distilled": True},
                    lambda s=skip: FasterCacheConfig(
                        spatial_attention_block_skip_range=s,
                        spatial_attention_timestep_skip_range=(-1, 901),
                        current_timestep_callback=timestep,
                        attention_weight_callback=lambda _: 0.5,
                        # Wan calls cond and uncond separately: FasterCache's unconditional-batch reuse
                        # needs both halves in one batch, so only its attention reuse applies here.
                        is_guidance_distilled=True,
                        tensor_format="BFCHW",
                    ),
                )
            )
        if not cache_dit_peer.is_installed():
            return peers, {cache_dit_peer.CACHE_DIT: cache_dit_peer.NOT_INSTALLED}
        return [*peers, *cache_dit_peer.peer_caches(n)], {}
