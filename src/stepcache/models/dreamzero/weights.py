"""Save and load DreamZero-mini weights: ``config.json`` + ``model.safetensors`` (never pickle).

A model folder holds:

- ``config.json``: ``{"model_type": "dreamzero-mini", "format_version": 1, "model": {...}, ...}``,
  where ``"model"`` is a :class:`DreamZeroMiniConfig`;
- ``model.safetensors``: every parameter of :class:`CausalWorldActionDiT` under its state-dict name.

Loading checks everything and fails with a ``FileNotFoundError`` (missing file) or ``ValueError``
(unreadable, truncated or mismatched file) that names the file and what was expected.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from stepcache.models.checkpoint import load_checked_state, read_safetensors
from stepcache.models.dreamzero.model import CausalWorldActionDiT, DreamZeroMiniConfig

logger = logging.getLogger(__name__)

MODEL_TYPE = "dreamzero-mini"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Bundled models of this architecture -> the package folder that holds their weights/ (each world's
# model sits beside the world it was trained on).
_BUNDLED_PACKAGES = {"dreamzero-detour": "dreamzero_detour", "dreamzero-mini": "dreamzero"}
BUNDLED_MODELS = tuple(_BUNDLED_PACKAGES)
DEFAULT_MODEL = "dreamzero-detour"  # the main job's model: the task on which caching can cost success


def bundled_weights_dir(name: str = "dreamzero-mini") -> Path:
    """Folder of a bundled model inside the package."""
    if name not in _BUNDLED_PACKAGES:
        raise ValueError(f"unknown bundled model {name!r}; bundled: {list(BUNDLED_MODELS)}")
    return Path(__file__).resolve().parent.parent / _BUNDLED_PACKAGES[name] / "weights" / name


def resolve_model_dir(model: str | Path) -> Path:
    """A bundled model name, or a directory holding ``config.json`` and ``model.safetensors``."""
    if isinstance(model, str) and model in BUNDLED_MODELS:
        return bundled_weights_dir(model)
    path = Path(model)
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"model {str(model)!r} is neither a bundled model {list(BUNDLED_MODELS)} nor a directory holding "
        f"{CONFIG_NAME} and {WEIGHTS_NAME}"
    )


def save_model(
    model: CausalWorldActionDiT,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (tensors stored as ``dtype``) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()}
    # save() + write_bytes rather than save_file so the file gets the umask's mode (save_file makes it 0600).
    (out / WEIGHTS_NAME).write_bytes(save(tensors, metadata={"format": "pt", "model_type": MODEL_TYPE}))
    config = {
        "model_type": MODEL_TYPE,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        **(extra or {}),
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.debug("saved %d tensors to %s", len(tensors), out)
    return out


def load_config(model_dir: str | Path) -> dict[str, Any]:
    """Read and check ``config.json``; returns the whole dict."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: expected the {MODEL_TYPE} config ({CONFIG_NAME}) there")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: expected a JSON object ({error})") from error
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        found = data.get("model_type") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected model_type {MODEL_TYPE!r}, found {found!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: expected format_version {FORMAT_VERSION}, found {data.get('format_version')!r}")
    try:
        DreamZeroMiniConfig.from_dict(data.get("model"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: invalid 'model' section: {error}") from error
    return data


def load_world_config(model: str | Path = "dreamzero-mini") -> Any:
    """The world a model was trained on, from its ``config.json``'s ``"world"`` section: a
    :class:`~stepcache.models.dreamzero.world.WorldConfig` (the reaching world, also for folders
    without that section) or a :class:`~stepcache.models.dreamzero_detour.world.DetourConfig`."""
    from stepcache.models.dreamzero.world import TASK as REACHING
    from stepcache.models.dreamzero.world import WorldConfig
    from stepcache.models.dreamzero_detour.world import TASK as DETOUR
    from stepcache.models.dreamzero_detour.world import DetourConfig

    model_dir = resolve_model_dir(model)
    section = load_config(model_dir).get("world", {"task": REACHING})
    worlds = {REACHING: WorldConfig, DETOUR: DetourConfig}
    path = model_dir / CONFIG_NAME
    if not isinstance(section, dict) or section.get("task") not in worlds:
        found = section.get("task") if isinstance(section, dict) else section
        raise ValueError(f"{path}: 'world' must name a task, one of {list(worlds)}; found {found!r}")
    cls = worlds[section["task"]]
    fields = {key: tuple(value) if isinstance(value, list) else value  # JSON has no tuples
              for key, value in section.items() if key != "task"}
    try:
        return cls(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: invalid 'world' section: {error}") from error


def load_model(model: str | Path = "dreamzero-mini") -> CausalWorldActionDiT:
    """Build the model from a bundled name or folder and load its weights (float32, eval mode)."""
    model_dir = resolve_model_dir(model)
    config = DreamZeroMiniConfig.from_dict(load_config(model_dir)["model"])
    net = CausalWorldActionDiT(config)
    weights = model_dir / WEIGHTS_NAME
    tensors = read_safetensors(weights, f"expected the {MODEL_TYPE} weights ({WEIGHTS_NAME}) there")
    load_checked_state(net, tensors, weights, config_name=CONFIG_NAME)
    return net.eval()
