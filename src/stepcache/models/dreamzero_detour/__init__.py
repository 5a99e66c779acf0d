"""dreamzero-detour: dreamzero-mini's world-action DiT, trained on the detour world.

- :mod:`.world`: the detour task (the reaching world plus an obstacle that ends the episode on contact),
  its scripted expert and data generator;
- :mod:`.training`: ``train_bundled`` (``stepcache train dreamzero-detour``), which fine-tunes the bundled
  dreamzero-mini weights on it.

The model, the pipeline and the weights format are dreamzero-mini's (:mod:`stepcache.models.dreamzero`):
``DreamZeroPipeline.from_pretrained("dreamzero-detour")`` or ``Omni("dreamzero-detour")`` load it, and
``omni.world_config.make_world()`` starts an episode of its world.
"""

from __future__ import annotations

from stepcache.models.dreamzero_detour.world import DetourConfig, DetourWorld

__all__ = ["DetourConfig", "DetourWorld"]
