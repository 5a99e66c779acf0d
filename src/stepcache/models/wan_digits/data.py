"""The data wan-digits models: scikit-learn's bundled 8x8 digits as single-frame Wan latents.

Pixels are integers 0..16; a latent is ``x = pixels / 8 - 1`` in [-1, 1], shaped
``(batch, channels=1, frames=1, 8, 8)`` as ``WanTransformer3DModel`` expects. There is no VAE:
the latents *are* the images.
"""

from __future__ import annotations

import numpy as np
import torch

IMAGE_SIZE = 8
PIXEL_MAX = 16.0
NUM_CLASSES = 10


def load_digit_pixels() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits shipped inside scikit-learn (no download): pixels (N, 8, 8) in 0..16, labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def pixels_to_latents(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) pixels in 0..16 -> (N, 1, 1, 8, 8) latents in [-1, 1]."""
    pixels = torch.as_tensor(pixels, dtype=torch.float32)
    return (pixels / (PIXEL_MAX / 2) - 1.0).reshape(-1, 1, 1, IMAGE_SIZE, IMAGE_SIZE)


def latents_to_pixels(latents: torch.Tensor) -> torch.Tensor:
    """(N, 1, 1, 8, 8) latents -> (N, 8, 8) float pixels clipped to 0..16 (the classifier's input scale)."""
    if latents.ndim != 5 or tuple(latents.shape[1:]) != (1, 1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"latents must have shape (N, 1, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(latents.shape)}")
    pixels = (latents.detach().float().cpu() + 1.0) * (PIXEL_MAX / 2)
    return pixels.clamp(0.0, PIXEL_MAX).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
