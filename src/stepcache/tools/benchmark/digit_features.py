"""A small feature network for FID on 8x8 digits, trained by the project at use time.

Inception (the usual FID network) needs downloaded weights, and sees nothing useful in 8x8 images
anyway. This MLP is trained to classify the real digits (fixed seed, full-batch Adam, about a second
on a CPU); its penultimate layer is the feature space for the Fréchet distance.
"""

from __future__ import annotations

import torch
from torch import nn

from stepcache.models.wan_digits.data import PIXEL_MAX, load_digit_pixels


class DigitFeatureNet(nn.Module):
    """64 pixels (scaled to 0..1) -> ``num_features`` features -> 10 class logits."""

    num_features = 32

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, self.num_features), nn.SiLU()
        )
        self.head = nn.Linear(self.num_features, 10)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, 8, 8) or (N, 8, 8) images in 0..1 -> (N, num_features)."""
        return self.body(images.reshape(len(images), -1).float())

    @classmethod
    def train_on_real_digits(cls, seed: int = 0, steps: int = 400) -> DigitFeatureNet:
        pixels, labels = load_digit_pixels()
        x = torch.as_tensor(pixels, dtype=torch.float32).reshape(len(pixels), -1) / PIXEL_MAX
        y = torch.as_tensor(labels, dtype=torch.long)
        torch.manual_seed(seed)
        net = cls()
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net.head(net.body(x)), y)
            loss.backward()
            optimizer.step()
        return net.eval().requires_grad_(False)
