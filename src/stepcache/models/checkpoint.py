"""Reading bundled weights: safetensors only (no pickle), every tensor checked against the model.

Both bundled models store a ``config.json`` (the architecture) next to a ``model.safetensors``; these
helpers turn every way the pair can disagree into an error that names the file and what was expected.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def read_safetensors(path: Path, missing_hint: str) -> dict[str, torch.Tensor]:
    """All tensors of ``path``. A missing file raises FileNotFoundError (with ``missing_hint``); an
    unreadable one (truncated, corrupt, not safetensors) raises ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: {missing_hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"cannot read {path}: not a readable safetensors file, truncated or corrupt ({error})"
        ) from error


def load_checked_state(
    module: nn.Module, tensors: dict[str, torch.Tensor], path: Path, *, prefix: str = "", config_name: str
) -> None:
    """Load the tensors named ``prefix + <state-dict name>`` into ``module`` (as its dtype), after
    checking that the names, shapes and values are what ``config_name``'s architecture needs."""
    expected = module.state_dict()
    found = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match {config_name}'s architecture: "
            f"missing tensors {[prefix + k for k in missing[:5]]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected tensors {[prefix + k for k in unexpected[:5]]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in found.items():
        target = expected[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"{path}: tensor {prefix + name!r} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(target.shape)} from {config_name}"
            )
        if target.is_floating_point() and not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {prefix + name!r} has dtype {tensor.dtype}, expected a floating type")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {prefix + name!r} holds NaN or Inf values")
    module.load_state_dict({name: t.to(expected[name].dtype) for name, t in found.items()}, strict=True)
