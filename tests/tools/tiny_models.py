"""Tiny randomly initialised bundled-model stand-ins for tests of the tools (built offline, in seconds)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from stepcache.models.wan_digits.pipeline import (
    DEFAULT_TRANSFORMER_CONFIG,
    build_class_embeddings,
    build_transformer,
    load_wan_digits,
    save_wan_digits,
)

TINY_WAN_CONFIG = dict(
    DEFAULT_TRANSFORMER_CONFIG,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=8,
    ffn_dim=32,
    text_dim=16,
    freq_dim=16,
)


def tiny_wan_digits(folder: Path, seed: int = 0):
    """A random wan-digits-shaped model saved to ``folder`` and loaded back as a WanDigits."""
    torch.manual_seed(seed)
    transformer = build_transformer(TINY_WAN_CONFIG)
    embeddings = build_class_embeddings({"num_classes": 10, "tokens_per_class": 2}, TINY_WAN_CONFIG["text_dim"])
    save_wan_digits(folder, transformer, embeddings)
    return load_wan_digits(folder)


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one thread, and extra threads spin badly on a loaded machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
