"""Load the bundled ``wan-digits`` model as a ready diffusers ``WanPipeline``.

wan-digits is a small ``WanTransformer3DModel`` trained by this project (``stepcache train wan-digits``)
as a class-conditional flow-matching model on scikit-learn's 8x8 digits. A learned table of class
embeddings (10 digits + a null entry for classifier-free guidance) stands in for the T5 prompt
embeddings; the pipeline has no tokenizer, text encoder or VAE, and its latents are the images
(``output_type="latent"``). The scheduler is the one Wan itself ships with: UniPC multistep in flow
mode (``x_sigma = (1 - sigma) x0 + sigma noise``, the transformer predicts ``noise - x0``).

Files in a weights folder: ``config.json`` (transformer, class-embedding and scheduler configs, sampling
defaults, how it was trained) and ``model.safetensors`` (``transformer.*`` and ``class_embeddings.weight``).

Example:
    >>> digits = load_wan_digits()
    >>> pixels = digits.sample([0, 1, 2], seed=0)   # (3, 8, 8) in 0..16
    >>> # or call the diffusers pipeline yourself:
    >>> latents = digits.pipe(**digits.call_kwargs([0, 1, 2]), num_inference_steps=16).frames
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stepcache.models.checkpoint import load_checked_state, read_safetensors
from stepcache.models.wan_digits.data import IMAGE_SIZE, NUM_CLASSES, latents_to_pixels

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "wan-digits"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "stepcache-wan-digits"
FORMAT_VERSION = 1

# ~0.95M parameters: 16 tokens of 2x2 pixels (patch (1, 2, 2) on a 1x8x8 latent), width 128, 4 blocks.
DEFAULT_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "text_dim": 32,
    "freq_dim": 64,
    "ffn_dim": 256,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 32,
}
# Each class is a short "prompt" of a few learned tokens, so cross-attention has something to attend over.
DEFAULT_EMBEDDING_CONFIG: dict[str, int] = {"num_classes": NUM_CLASSES, "tokens_per_class": 4}
# Wan 2.1's own scheduler (UniPC, 2nd order, predict-x0, bh2, flow sigmas). The flow shift moves steps
# towards high noise (sigma' = shift * s / (1 + (shift - 1) s)).
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
}
DEFAULT_SAMPLING: dict[str, Any] = {"num_inference_steps": 16, "guidance_scale": 3.0}


class ClassPromptEmbeddings(nn.Module):
    """Learned stand-in for prompt embeddings: class ``c`` -> ``weight[c]``, shape (tokens_per_class, dim).

    Row ``num_classes`` is the null ("unconditional") prompt used for classifier-free guidance.
    """

    def __init__(self, num_classes: int, tokens_per_class: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.randn(num_classes + 1, tokens_per_class, dim))

    @property
    def null_index(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) class indices in 0..num_classes (the last is null) -> (B, tokens_per_class, dim)."""
        return self.weight[labels]


def build_transformer(transformer_config: dict[str, Any] | None = None):
    """A freshly initialised ``WanTransformer3DModel`` (default: the wan-digits architecture)."""
    from diffusers import WanTransformer3DModel

    config = dict(DEFAULT_TRANSFORMER_CONFIG if transformer_config is None else transformer_config)
    config["patch_size"] = tuple(config["patch_size"])
    return WanTransformer3DModel(**config)


def build_class_embeddings(embedding_config: dict[str, int], text_dim: int) -> ClassPromptEmbeddings:
    return ClassPromptEmbeddings(embedding_config["num_classes"], embedding_config["tokens_per_class"], text_dim)


def build_scheduler(scheduler_config: dict[str, Any] | None = None):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**(DEFAULT_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config))


@dataclass
class WanDigits:
    """A ready ``WanPipeline`` plus the class embeddings that replace its text encoder.

    Attributes:
        pipe: the diffusers ``WanPipeline`` (no tokenizer / text encoder / VAE; progress bar off).
        class_embeddings: the learned prompt table, row ``null_index`` = unconditional.
        config: the parsed ``config.json``.
        path: the folder the weights came from.
    """

    pipe: Any
    class_embeddings: ClassPromptEmbeddings
    config: dict[str, Any] = field(repr=False)
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        return self.class_embeddings.num_classes

    @property
    def default_num_inference_steps(self) -> int:
        return int(self.config["sampling"]["num_inference_steps"])

    @property
    def default_guidance_scale(self) -> float:
        return float(self.config["sampling"]["guidance_scale"])

    def _labels(self, labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("labels: need at least one class label")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"labels: {bad.tolist()} out of range; allowed 0..{self.num_classes - 1}")
        return labels

    @torch.no_grad()
    def prompt_embeds(self, labels: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds, negative_prompt_embeds)`` for the classes, each (B, tokens_per_class, text_dim)."""
        labels = self._labels(labels).to(self.class_embeddings.weight.device)
        conditional = self.class_embeddings(labels)
        unconditional = self.class_embeddings(torch.full_like(labels, self.class_embeddings.null_index))
        return conditional, unconditional

    def call_kwargs(self, labels: Sequence[int] | torch.Tensor) -> dict[str, Any]:
        """Keyword arguments for ``pipe(...)`` that generate one 8x8 digit per label as latents."""
        prompt_embeds, negative_prompt_embeds = self.prompt_embeds(labels)
        # Without a VAE the pipeline still divides height/width by its default spatial factor (8).
        pixel_scale = int(self.pipe.vae_scale_factor_spatial)
        return {
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "height": IMAGE_SIZE * pixel_scale,
            "width": IMAGE_SIZE * pixel_scale,
            "num_frames": 1,
            "output_type": "latent",
        }

    def sample(
        self,
        labels: Sequence[int] | torch.Tensor,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """One digit per label through ``pipe``: (B, 8, 8) float pixels in 0..16 (the scale of the real digits).

        The initial noise depends only on ``seed`` and the batch size, so runs with and without a cache
        start from the same noise.
        """
        steps = self.default_num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps: got {steps}; allowed >= 1")
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        if not math.isfinite(scale):
            raise ValueError(f"guidance_scale: got {scale}; must be finite")
        device = self.class_embeddings.weight.device
        generator = torch.Generator(device=device).manual_seed(int(seed))
        latents = self.pipe(
            **self.call_kwargs(labels),
            num_inference_steps=steps,
            guidance_scale=scale,
            generator=generator,
        ).frames
        return latents_to_pixels(latents)


def _checkpoint_config(transformer, class_embeddings: ClassPromptEmbeddings, extra: dict[str, Any]) -> dict:
    transformer_config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    transformer_config["patch_size"] = list(transformer_config["patch_size"])
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "transformer": transformer_config,
        "class_embeddings": {
            "num_classes": class_embeddings.num_classes,
            "tokens_per_class": int(class_embeddings.weight.shape[1]),
        },
        "scheduler": copy.deepcopy(DEFAULT_SCHEDULER_CONFIG),
        "sampling": copy.deepcopy(DEFAULT_SAMPLING),
        **extra,
    }


def save_wan_digits(
    out_dir: str | Path, transformer, class_embeddings: ClassPromptEmbeddings, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir`` (created if needed); returns it.

    ``extra`` adds top-level JSON entries (e.g. how the model was trained).
    """
    from safetensors.torch import save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v.detach().cpu().contiguous() for k, v in transformer.state_dict().items()}
    tensors["class_embeddings.weight"] = class_embeddings.weight.detach().cpu().contiguous()
    config = _checkpoint_config(transformer, class_embeddings, extra or {})
    # Write to temporary names first so an interrupted run never leaves a half-written pair behind.
    weights_tmp, config_tmp = out_dir / (WEIGHTS_NAME + ".tmp"), out_dir / (CONFIG_NAME + ".tmp")
    # save() + write_bytes rather than save_file so the file gets the umask's mode (save_file makes it 0600).
    weights_tmp.write_bytes(save(tensors, metadata={"format": FORMAT_NAME}))
    config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights_tmp.replace(out_dir / WEIGHTS_NAME)
    config_tmp.replace(out_dir / CONFIG_NAME)
    logger.info("saved wan-digits weights to %s", out_dir)
    return out_dir


def _recreate_hint(path: Path) -> str:
    return f"recreate the weights with `stepcache train wan-digits --out {path.parent}`"


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"missing {path}: {_recreate_hint(path)}")


def _read_config(config_path: Path) -> dict[str, Any]:
    if not config_path.is_file():
        raise _missing(config_path)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path}: 'format' is {found!r}; expected {FORMAT_NAME!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: format_version {config.get('format_version')!r} is not supported "
            f"(this stepcache reads {FORMAT_VERSION})"
        )
    for section in ("transformer", "class_embeddings", "scheduler", "sampling"):
        if not isinstance(config.get(section), dict):
            raise ValueError(f"{config_path}: section {section!r} is missing or not an object")
    return config


def load_wan_digits(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> WanDigits:
    """Load wan-digits from a weights folder (default: the bundled one) as a ready ``WanPipeline``.

    Raises FileNotFoundError when ``config.json`` or ``model.safetensors`` is missing and ValueError,
    naming the file, when either is unreadable or they do not match each other.
    """
    from diffusers import WanPipeline

    folder = WEIGHTS_DIR if path is None else Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    config = _read_config(config_path)
    try:
        transformer = build_transformer(config["transformer"])
        class_embeddings = build_class_embeddings(config["class_embeddings"], transformer.config.text_dim)
        scheduler = build_scheduler(config["scheduler"])
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"{config_path}: invalid model configuration ({err})") from err
    tensors = read_safetensors(weights_path, _recreate_hint(weights_path))
    strangers = sorted(k for k in tensors if not k.startswith(("transformer.", "class_embeddings.")))
    if strangers:
        raise ValueError(f"{weights_path}: unexpected tensors {strangers[:5]} (not a wan-digits checkpoint)")
    for prefix, module in (("transformer.", transformer), ("class_embeddings.", class_embeddings)):
        load_checked_state(module, tensors, weights_path, prefix=prefix, config_name=CONFIG_NAME)
    transformer.eval().requires_grad_(False)
    class_embeddings.eval().requires_grad_(False)
    transformer.to(device)
    class_embeddings.to(device)

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer)
    # A library does not draw progress bars; callers can re-enable with pipe.set_progress_bar_config().
    pipe.set_progress_bar_config(disable=True)
    logger.debug("loaded wan-digits from %s", folder)
    return WanDigits(pipe=pipe, class_embeddings=class_embeddings, config=config, path=folder)
