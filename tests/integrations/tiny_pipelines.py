"""Tiny random diffusers pipelines, one per family, built offline for the StepCache family tests.

Every pipeline gets random transformer weights and prompt embeddings passed in (no tokenizer or text
encoder, nothing downloaded), and returns latents (no VAE), except where the pipeline encodes a
conditioning image itself (Wan image-to-video): that one gets a tiny random VAE, and Wan 2.1 a tiny
random CLIP vision encoder. Widths, layers and token counts are as small as each model allows, so a
16-step generation takes a few tens of milliseconds on one CPU thread. ``FAMILIES`` lists them by test id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    AuraFlowPipeline,
    AuraFlowTransformer2DModel,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    CogView4Pipeline,
    CogView4Transformer2DModel,
    Cosmos2TextToImagePipeline,
    CosmosTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HiDreamImagePipeline,
    HiDreamImageTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from PIL import Image

DENOISERS = ("transformer", "transformer_2")


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Forward:
    """One transformer forward that really ran."""

    step: int  # the scheduler step (counted by the pipeline's step-end callback)
    denoiser: str  # "transformer" or "transformer_2"
    timestep: float  # the largest value of its timestep argument
    batch: int  # samples in its latent input


@dataclass
class TinyPipeline:
    """A tiny pipeline, the arguments of one generation, and what StepCache should see of it.

    ``branches`` are the branch names the hook should report: the pipeline's ``cache_context`` names,
    or ``callN`` for calls made without a context. ``cfg`` is how guidance reaches the transformer:
    ``"two calls"`` (one per branch), ``"one batched call"`` (uncond and cond halves in one batch) or
    ``"none"`` (guidance-distilled: the scale is an input). ``timesteps`` is what the transformer is
    given, first step to last: ``"1000 -> 0"``, ``"1 -> 0"`` or ``"0 -> 1"``.
    """

    family: str
    pipe: Any
    kwargs: dict[str, Any]
    branches: tuple[str, ...]
    cfg: str
    timesteps: str
    denoisers: tuple[str, ...] = DENOISERS[:1]
    timestep_arg: str = "timestep"
    forwards: list[Forward] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A spy in place of each denoiser's forward, installed before any StepCache hook, so the hook wraps
        # it and the spy records only the forwards that really ran.
        self.step = 0
        self.spies: dict[str, Callable[..., Any]] = {}
        for name in self.denoisers:
            module = getattr(self.pipe, name)
            self.spies[name] = module.forward = self._spy(name, module.forward)
        self.pipe.set_progress_bar_config(disable=True)

    def _spy(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            timestep = kwargs[self.timestep_arg] if self.timestep_arg in kwargs else args[1]
            latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.forwards.append(Forward(self.step, name, float(torch.as_tensor(timestep).max()), len(latents)))
            return original(*args, **kwargs)

        return forward

    def generate(self, steps: int) -> torch.Tensor:
        """One generation from a fixed seed: the latents it ends with (``self.forwards`` holds its forwards)."""

        def count_steps(pipe: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            self.step = i + 1
            return {}

        self.step = 0
        self.forwards = []
        return self.pipe(
            **self.kwargs,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=count_steps,
            output_type="latent",
            return_dict=False,
        )[0]


# --- Flux -----------------------------------------------------------------------------------------


def flux(true_cfg: bool) -> TinyPipeline:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
        guidance_embeds=not true_cfg,
    ).eval()  # fmt: skip
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )  # fmt: skip
    kwargs: dict[str, Any] = dict(
        prompt_embeds=randn(1, 8, 32, seed=10), pooled_prompt_embeds=randn(1, 8, seed=12), height=32, width=32
    )
    if true_cfg:
        kwargs.update(
            negative_prompt_embeds=randn(1, 8, 32, seed=11), negative_pooled_prompt_embeds=randn(1, 8, seed=13),
            true_cfg_scale=4.0,
        )  # fmt: skip
        return TinyPipeline("flux-true-cfg", pipe, kwargs, ("cond", "uncond"), "two calls", "1 -> 0")
    return TinyPipeline("flux", pipe, {**kwargs, "guidance_scale": 3.5}, ("cond",), "none", "1 -> 0")


# --- SD3 ------------------------------------------------------------------------------------------


def sd3() -> TinyPipeline:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16,
    ).eval()  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    kwargs = dict(
        prompt_embeds=randn(1, 8, 16, seed=10), negative_prompt_embeds=randn(1, 8, 16, seed=11),
        pooled_prompt_embeds=randn(1, 8, seed=12), negative_pooled_prompt_embeds=randn(1, 8, seed=13),
        height=32, width=32, guidance_scale=5.0,
    )  # fmt: skip
    return TinyPipeline("sd3", pipe, kwargs, ("call0",), "one batched call", "1000 -> 0")


# --- CogVideoX ------------------------------------------------------------------------------------


def cogvideox() -> TinyPipeline:
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=1, sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
        max_text_seq_length=8, temporal_compression_ratio=4,
    ).eval()  # fmt: skip
    # Not flow matching: DDIM over a discrete beta schedule, the transformer predicts v (CogVideoX-2b's settings).
    scheduler = CogVideoXDDIMScheduler(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False
    )
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    kwargs = dict(
        prompt_embeds=randn(1, 8, 16, seed=10), negative_prompt_embeds=randn(1, 8, 16, seed=11),
        height=32, width=32, num_frames=5, guidance_scale=6.0,
    )  # fmt: skip
    return TinyPipeline("cogvideox", pipe, kwargs, ("cond_uncond",), "one batched call", "1000 -> 0")


# --- LTX-Video ------------------------------------------------------------------------------------


def ltx() -> TinyPipeline:
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=1, caption_channels=16,
    ).eval()  # fmt: skip
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        transformer=transformer,
    )  # fmt: skip
    kwargs = dict(
        prompt_embeds=randn(1, 8, 16, seed=10), prompt_attention_mask=torch.ones(1, 8),
        negative_prompt_embeds=randn(1, 8, 16, seed=11), negative_prompt_attention_mask=torch.ones(1, 8),
        height=64, width=64, num_frames=9, guidance_scale=3.0,
    )  # fmt: skip
    return TinyPipeline("ltx", pipe, kwargs, ("cond_uncond",), "one batched call", "1000 -> 0")


# --- QwenImage ------------------------------------------------------------------------------------


def qwenimage() -> TinyPipeline:
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        transformer=transformer,
    )  # fmt: skip
    kwargs = dict(
        prompt_embeds=randn(1, 8, 16, seed=10), prompt_embeds_mask=torch.ones(1, 8, dtype=torch.long),
        negative_prompt_embeds=randn(1, 8, 16, seed=11), negative_prompt_embeds_mask=torch.ones(1, 8, dtype=torch.long),
        height=32, width=32, true_cfg_scale=4.0,
    )  # fmt: skip
    return TinyPipeline("qwenimage", pipe, kwargs, ("cond", "uncond"), "two calls", "1 -> 0")


# --- HunyuanVideo ---------------------------------------------------------------------------------


def hunyuan_video() -> TinyPipeline:
    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
    ).eval()  # fmt: skip
    pipe = HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip
    kwargs = dict(
        prompt_embeds=randn(1, 8, 16, seed=10), pooled_prompt_embeds=randn(1, 8, seed=12),
        prompt_attention_mask=torch.ones(1, 8), height=16, width=16, num_frames=5, guidance_scale=6.0,
    )  # fmt: skip
    return TinyPipeline("hunyuanvideo", pipe, kwargs, ("cond",), "none", "1000 -> 0")


# --- Wan ------------------------------------------------------------------------------------------

WAN_LATENT_CHANNELS = 4


def _wan_transformer(seed: int, in_channels: int = WAN_LATENT_CHANNELS, image_dim: int | None = None):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=WAN_LATENT_CHANNELS, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
        image_dim=image_dim,
    ).eval()  # fmt: skip


def _wan_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=4, z_dim=WAN_LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.0] * WAN_LATENT_CHANNELS,
        latents_std=[1.0] * WAN_LATENT_CHANNELS,
    ).eval()  # fmt: skip


def _wan_scheduler() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)


def _wan_embeds() -> dict[str, Any]:
    return dict(prompt_embeds=randn(1, 8, 16, seed=10), negative_prompt_embeds=randn(1, 8, 16, seed=11))


def wan_t2v(two_experts: bool) -> TinyPipeline:
    """Wan 2.1 T2V, or Wan 2.2 T2V A14B: two experts, `transformer` above the boundary timestep
    (0.9 * 1000: steps 0-5 of 16 with flow shift 5), `transformer_2` below it."""
    experts = {"transformer_2": _wan_transformer(1), "boundary_ratio": 0.9} if two_experts else {}
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=_wan_scheduler(), transformer=_wan_transformer(0),
        **experts,
    )  # fmt: skip
    kwargs = dict(**_wan_embeds(), height=32, width=32, num_frames=1, guidance_scale=5.0)
    family, denoisers = ("wan2.2-t2v-two-experts", tuple(DENOISERS)) if two_experts else ("wan2.1-t2v", DENOISERS[:1])
    return TinyPipeline(family, pipe, kwargs, ("cond", "uncond"), "two calls", "1000 -> 0", denoisers)


def _condition_image() -> Image.Image:
    pixels = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(20)) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


def _tiny_clip_vision() -> tuple[Any, Any]:
    """A random CLIP vision tower and its preprocessor, built from a config (the pipeline insists on
    encoding the image itself: it refuses `image_embeds` together with the `image` its VAE needs)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModel(config).eval(), processor


def wan_i2v(family: str) -> TinyPipeline:
    """``wan2.1-i2v`` (CLIP image embeddings + the VAE-encoded image as extra channels),
    ``wan2.2-i2v-two-experts`` (A14B: no CLIP, two experts as in :func:`wan_t2v`) or ``wan2.2-ti2v``
    (5B: the encoded image replaces the first latent frame, per-token timesteps that are 0 there)."""
    components: dict[str, Any] = dict(image_encoder=None, image_processor=None)
    with_condition_channels = 2 * WAN_LATENT_CHANNELS + 4  # latents + frame mask + encoded image
    denoisers = DENOISERS[:1]
    if family == "wan2.1-i2v":
        image_encoder, image_processor = _tiny_clip_vision()
        transformer = _wan_transformer(0, with_condition_channels, image_dim=image_encoder.config.hidden_size)
        components.update(transformer=transformer, image_encoder=image_encoder, image_processor=image_processor)
    elif family == "wan2.2-i2v-two-experts":
        components.update(
            transformer=_wan_transformer(0, with_condition_channels),
            transformer_2=_wan_transformer(1, with_condition_channels), boundary_ratio=0.9,
        )  # fmt: skip
        denoisers = tuple(DENOISERS)
    elif family == "wan2.2-ti2v":
        components.update(transformer=_wan_transformer(0), expand_timesteps=True)
    else:
        raise ValueError(f"unknown Wan image-to-video family {family!r}")
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=_wan_vae(), scheduler=_wan_scheduler(), **components
    )
    kwargs = dict(**_wan_embeds(), image=_condition_image(), height=32, width=32, num_frames=5, guidance_scale=5.0)
    return TinyPipeline(family, pipe, kwargs, ("cond", "uncond"), "two calls", "1000 -> 0", denoisers)


# --- Lumina2 --------------------------------------------------------------------------------------


def lumina2() -> TinyPipeline:
    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=16, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(2, 2, 4), axes_lens=(16, 16, 16),
        cap_feat_dim=16,
    ).eval()  # fmt: skip
    pipe = Lumina2Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
        tokenizer=None,
    )  # fmt: skip
    kwargs = dict(
        prompt_embeds=randn(1, 8, 16, seed=10), prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
        negative_prompt_embeds=randn(1, 8, 16, seed=11),
        negative_prompt_attention_mask=torch.ones(1, 8, dtype=torch.long), height=32, width=32, guidance_scale=4.0,
    )  # fmt: skip
    return TinyPipeline("lumina2", pipe, kwargs, ("call0", "call1"), "two calls", "0 -> 1")


# --- Sana -----------------------------------------------------------------------------------------


def sana() -> TinyPipeline:
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=2, patch_size=1,
    ).eval()  # fmt: skip
    pipe = SanaPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )  # fmt: skip
    kwargs = dict(
        prompt_embeds=randn(1, 8, 16, seed=10), prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
        negative_prompt_embeds=randn(1, 8, 16, seed=11),
        negative_prompt_attention_mask=torch.ones(1, 8, dtype=torch.long), height=64, width=64, guidance_scale=4.5,
        negative_prompt=None, use_resolution_binning=False,
    )  # fmt: skip
    return TinyPipeline("sana", pipe, kwargs, ("call0",), "one batched call", "1000 -> 0")


# --- CogView4 -------------------------------------------------------------------------------------


def cogview4() -> TinyPipeline:
    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=8, condition_dim=4, pos_embed_max_size=8, sample_size=4,
        rope_axes_dim=(4, 4),
    ).eval()  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )
    pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    kwargs = dict(
        prompt_embeds=randn(1, 8, 16, seed=10), negative_prompt_embeds=randn(1, 8, 16, seed=11),
        height=32, width=32, guidance_scale=5.0,
    )  # fmt: skip
    return TinyPipeline("cogview4", pipe, kwargs, ("cond", "uncond"), "two calls", "1000 -> 0")


# --- AuraFlow -------------------------------------------------------------------------------------


def auraflow() -> TinyPipeline:
    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=16,
    ).eval()  # fmt: skip
    pipe = AuraFlowPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )  # fmt: skip
    kwargs = dict(
        prompt_embeds=randn(1, 8, 16, seed=10), prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
        negative_prompt_embeds=randn(1, 8, 16, seed=11),
        negative_prompt_attention_mask=torch.ones(1, 8, dtype=torch.long), height=32, width=32, guidance_scale=3.5,
    )  # fmt: skip
    return TinyPipeline("auraflow", pipe, kwargs, ("call0",), "one batched call", "1 -> 0")


# --- Cosmos-Predict2 ------------------------------------------------------------------------------


class _PassingSafetyChecker:
    """Stands in for `cosmos_guardrail`'s checker (a separate package with its own weights), which the
    pipeline insists on. With prompt embeddings and latent output it is only ever moved between devices."""

    def to(self, *args: Any, **kwargs: Any) -> _PassingSafetyChecker:
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: Any) -> Any:
        return frames


def cosmos2() -> TinyPipeline:
    torch.manual_seed(0)
    transformer = CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1, mlp_ratio=2.0,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 8, 8), patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type=None,
    ).eval()  # fmt: skip
    pipe = Cosmos2TextToImagePipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), safety_checker=_PassingSafetyChecker(),
    )  # fmt: skip
    kwargs = dict(
        prompt_embeds=randn(1, 8, 16, seed=10), negative_prompt_embeds=randn(1, 8, 16, seed=11),
        height=32, width=32, guidance_scale=7.0,
    )  # fmt: skip
    return TinyPipeline("cosmos2-t2i", pipe, kwargs, ("call0", "call1"), "two calls", "1 -> 0")


# --- Denoisers whose timestep argument has another name -------------------------------------------


def hidream() -> TinyPipeline:
    """HiDream-I1: `timesteps` (0..1000), one batched [uncond, cond] call; Llama hidden states of every
    layer it reads are passed in, stacked on the first axis."""
    torch.manual_seed(0)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[16, 16], text_emb_dim=8, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(2, 2, 4), max_resolution=(8, 8), llama_layers=[0, 1],
    ).eval()  # fmt: skip
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, text_encoder_4=None,
        tokenizer_4=None, transformer=transformer,
    )  # fmt: skip
    pipe.default_sample_size = 4  # it rescales every request to this many latent pixels squared (128 by default)
    kwargs = dict(
        prompt_embeds_t5=randn(1, 8, 16, seed=10), negative_prompt_embeds_t5=randn(1, 8, 16, seed=11),
        prompt_embeds_llama3=randn(2, 1, 8, 16, seed=12), negative_prompt_embeds_llama3=randn(2, 1, 8, 16, seed=13),
        pooled_prompt_embeds=randn(1, 8, seed=14), negative_pooled_prompt_embeds=randn(1, 8, seed=15),
        height=32, width=32, guidance_scale=5.0,
    )  # fmt: skip
    return TinyPipeline("hidream", pipe, kwargs, ("call0",), "one batched call", "1000 -> 0", timestep_arg="timesteps")


def z_image() -> TinyPipeline:
    """Z-Image: `t` (0..1, ascending), passed by position; latents, prompts and outputs are lists of
    per-sample tensors, and CFG is one call holding both halves."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel  # here: not in diffusers 0.35, unlike the rest

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[2, 2, 4], axes_lens=[64, 16, 16],
    ).eval()  # fmt: skip
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None, tokenizer=None,
        transformer=transformer,
    )  # fmt: skip
    kwargs = dict(
        prompt_embeds=[randn(8, 16, seed=10)], negative_prompt_embeds=[randn(8, 16, seed=11)], height=32, width=32,
        guidance_scale=5.0,
    )  # fmt: skip
    return TinyPipeline("z-image", pipe, kwargs, ("call0",), "one batched call", "0 -> 1", timestep_arg="t")


# Every family the tests cover, by test id.
FAMILIES: dict[str, Callable[[], TinyPipeline]] = {
    "flux": lambda: flux(true_cfg=False),
    "flux-true-cfg": lambda: flux(true_cfg=True),
    "sd3": sd3,
    "cogvideox": cogvideox,
    "ltx": ltx,
    "qwenimage": qwenimage,
    "hunyuanvideo": hunyuan_video,
    "wan2.1-t2v": lambda: wan_t2v(two_experts=False),
    "wan2.1-i2v": lambda: wan_i2v("wan2.1-i2v"),
    "wan2.2-t2v-two-experts": lambda: wan_t2v(two_experts=True),
    "wan2.2-i2v-two-experts": lambda: wan_i2v("wan2.2-i2v-two-experts"),
    "wan2.2-ti2v": lambda: wan_i2v("wan2.2-ti2v"),
    "lumina2": lumina2,
    "sana": sana,
    "cogview4": cogview4,
    "auraflow": auraflow,
    "cosmos2-t2i": cosmos2,
    "hidream": hidream,
}
