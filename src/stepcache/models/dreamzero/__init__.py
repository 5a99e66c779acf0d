"""DreamZero-mini: a small causal world-action DiT, its toy reaching world, training and pipeline.

- :mod:`.world`: the 2-D reaching task, the scripted expert and the data generator;
- :mod:`.model`: :class:`CausalWorldActionDiT` (per-token adaLN timesteps, KV-cached clean context);
- :mod:`.pipeline`: :class:`DreamZeroPipeline`, DreamZero's per-chunk denoise loop with StepCache;
- :mod:`.training`: ``train_bundled`` (``stepcache train dreamzero-mini``);
- :mod:`.weights`: safetensors save/load of ``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

from stepcache.models.dreamzero.model import CausalWorldActionDiT, DreamZeroMiniConfig, KVCache
from stepcache.models.dreamzero.pipeline import ChunkOutput, DreamZeroPipeline, DreamZeroPipelineConfig
from stepcache.models.dreamzero.weights import load_model, save_model
from stepcache.models.dreamzero.world import INSTRUCTIONS, TARGET_KINDS, ReachingWorld, WorldConfig

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
