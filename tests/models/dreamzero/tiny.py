"""Tiny randomly initialised DreamZero-mini models for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch

from stepcache.models.dreamzero.model import CausalWorldActionDiT, DreamZeroMiniConfig
from stepcache.models.dreamzero.weights import save_model

TINY = DreamZeroMiniConfig(hidden_size=32, num_layers=2, num_heads=2, timestep_frequencies=16)


def make_tiny_model(seed: int = 0) -> CausalWorldActionDiT:
    """Every weight random (the zero-initialised heads of a fresh model would predict zeros)."""
    torch.manual_seed(seed)
    model = CausalWorldActionDiT(TINY)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model.eval()


def save_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    return save_model(make_tiny_model(seed), out_dir)
