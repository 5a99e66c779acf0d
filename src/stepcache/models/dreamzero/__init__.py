"""DreamZero-mini: a small causal world-action DiT, its toy reaching world, training and pipeline.

- :mod:`.world`: the 2-D reaching task, the scripted expert and the data generator;
- :mod:`.model`: :class:`CausalWorldActionDiT` (per-token adaLN timesteps, KV-cached clean context);
- :mod:`.pipeline`: :class:`DreamZeroPipeline`, DreamZero's per-chunk denoise loop with StepCache;
- :mod:`.training`: ``train_bundled`` (``stepcache train dreamzero-mini``);
- :mod:`.weights`: safetensors save/load of ``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

from typing import Any

from stepcache.models.dreamzero.model import CausalWorldActionDiT, DreamZeroMiniConfig, KVCache
from stepcache.models.dreamzero.weights import load_model, save_model
from stepcache.models.dreamzero.world import INSTRUCTIONS, TARGET_KINDS, ReachingWorld, WorldConfig

_PIPELINE_NAMES = ("ChunkOutput", "DreamZeroPipeline", "DreamZeroPipelineConfig")


def __getattr__(name: str) -> Any:
    # The pipeline pulls in diffusers' schedulers (seconds of import): load it only when asked for, so
    # the model, the world and the weights stay light (training, distributed workers).
    if name in _PIPELINE_NAMES:
        from stepcache.models.dreamzero import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'stepcache.models.dreamzero' has no attribute {name!r}")


__all__ = [
    "INSTRUCTIONS",
    "TARGET_KINDS",
    "CausalWorldActionDiT",
    "ChunkOutput",
    "DreamZeroMiniConfig",
    "DreamZeroPipeline",
    "DreamZeroPipelineConfig",
    "KVCache",
    "ReachingWorld",
    "WorldConfig",
    "load_model",
    "save_model",
]
