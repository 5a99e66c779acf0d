"""Scores and counters used by the benchmark, on top of torchmetrics and torch's FLOP counter."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count


def psnr_db(output: torch.Tensor, reference: torch.Tensor, data_range: float) -> float | None:
    """PSNR over the whole batch (one MSE over all samples); None where the output is exact."""
    # torchmetrics takes seconds to import: only when a score is computed (calibrate's start-up).
    from torchmetrics.functional.image import peak_signal_noise_ratio

    value = float(peak_signal_noise_ratio(output.float(), reference.float(), data_range=data_range))
    return None if math.isinf(value) else value


def ssim(output: torch.Tensor, reference: torch.Tensor, data_range: float, kernel_size: int = 11) -> float:
    """Mean SSIM of (B, C, H, W) images. Small images need a kernel that fits (odd, <= H and W)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(
        structural_similarity_index_measure(
            output.float(), reference.float(), data_range=data_range, kernel_size=kernel_size
        )
    )


# torch counts the CUDA attention kernels but not the CPU flash kernel that scaled_dot_product_attention
# uses here; without this, attention-skipping caches (PAB, FasterCache) would look free.
_CPU_FLASH_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_FLASH_ATTENTION not in torch.utils.flop_counter.flop_registry:

    @register_flop_formula(_CPU_FLASH_ATTENTION)
    def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` under torch's FLOP counter; returns its result and the FLOPs it executed."""
    counter = FlopCounterMode(display=False)
    with counter:
        result = fn()
    return result, counter.get_total_flops()


class _FeatureNet(torch.nn.Module):
    """Adapts a feature function to what torchmetrics' FID expects of a custom extractor."""

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], num_features: int) -> None:
        super().__init__()
        self._features = features
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._features(images)


def frechet_distance(
    real: torch.Tensor,
    generated: torch.Tensor,
    features: Callable[[torch.Tensor], torch.Tensor],
    num_features: int,
) -> float:
    """FID over a project-trained feature network (Inception needs downloaded weights)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_FeatureNet(features, num_features), normalize=True)
    metric.set_dtype(torch.float64)
    metric.update(real.float(), real=True)
    metric.update(generated.float(), real=False)
    return float(metric.compute())
