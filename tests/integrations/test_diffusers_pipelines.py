"""StepCache on real diffusers pipelines with tiny random transformers (built offline, no text encoder
or VAE: prompt embeddings are passed in, latents come out).

- Wan: cond and uncond calls per step, inside `cache_context`, timesteps 0..1000, a CacheMixin.
- SD3: one batched [uncond, cond] call, no cache context, not a CacheMixin (never reset by its pipeline).
- Flux with true CFG: two calls per step, timesteps 0..1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from diffusers import (
    FirstBlockCacheConfig,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    MagCacheConfig,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.hooks import HookRegistry, apply_first_block_cache
from diffusers.models.cache_utils import CacheMixin

from stepcache import StepCacheConfig
from stepcache.integrations.diffusers import (
    apply_step_cache,
    disable_step_cache,
    enable_step_cache,
    get_step_cache_stats,
    is_step_cache_enabled,
    remove_step_cache,
)

NEVER_SKIP = StepCacheConfig(sim_thresholds=(1.0,), skip_countdowns=(1,))
SKIP_WHENEVER_ALLOWED = StepCacheConfig(sim_thresholds=(-0.99,), skip_countdowns=(4,))
SEED_RUNS = [0, 1, 6, 11]
STEPS = 16


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Case:
    """A tiny pipeline, how to call it, and how to tell which CFG branch a transformer call is."""

    name: str
    pipe: Any
    kwargs: dict[str, Any]
    branch_of: Callable[[dict[str, Any]], str]  # a real forward's kwargs -> branch label
    branches: tuple[str, ...]  # the labels every step should show
    forwards: list[tuple[int, str, str]] = field(default_factory=list)  # (step, branch, transformer) ran

    def __post_init__(self) -> None:
        # A spy in place of each transformer's forward, installed before any StepCache hook, so the hook
        # wraps it and it sees only the forwards that really ran.
        self.step = 0
        self.spies: dict[str, Callable[..., Any]] = {}
        for name in ("transformer", "transformer_2"):
            transformer = getattr(self.pipe, name, None)
            if transformer is not None:
                self.spies[name] = transformer.forward = self._spy(name, transformer.forward)
        self.pipe.set_progress_bar_config(disable=True)
        self.reference = self.generate()  # no hook at all

    def _spy(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            self.forwards.append((self.step, self.branch_of(kwargs), name))
            return original(*args, **kwargs)

        return forward

    def generate(self, **extra: Any) -> torch.Tensor:
        def count_steps(pipe, i, t, callback_kwargs):
            self.step = i + 1
            return {}

        self.step = 0
        self.forwards.clear()
        return self.pipe(
            **self.kwargs,
            **extra,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=count_steps,
            output_type="latent",
            return_dict=False,
        )[0]

    def steps_run_by_branch(self) -> dict[str, list[int]]:
        runs: dict[str, list[int]] = {}
        for step, branch, _ in self.forwards:
            runs.setdefault(branch, []).append(step)
        return runs


def _label(positive: torch.Tensor, negative: torch.Tensor) -> Callable[[dict[str, Any]], str]:
    def branch_of(kwargs: dict[str, Any]) -> str:
        embeds = kwargs["encoder_hidden_states"]
        if embeds.shape[0] == 2 * positive.shape[0]:
            return "batched"
        return "cond" if torch.equal(embeds, positive) else "uncond" if torch.equal(embeds, negative) else "?"

    return branch_of


def _wan_transformer(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()  # fmt: skip


def _wan_case(two_experts: bool = False) -> Case:
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    # boundary 900: steps 0-5 (t 999..916) on `transformer`, steps 6-15 on `transformer_2`
    experts = {"transformer_2": _wan_transformer(1), "boundary_ratio": 0.9} if two_experts else {}
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=_wan_transformer(0), **experts
    )
    positive, negative = _randn(1, 8, 16, seed=10), _randn(1, 8, 16, seed=11)
    kwargs = dict(prompt_embeds=positive, negative_prompt_embeds=negative, height=32, width=32, num_frames=1)
    return Case("wan", pipe, {**kwargs, "guidance_scale": 5.0}, _label(positive, negative), ("cond", "uncond"))


def _sd3_case() -> Case:
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
    positive, negative = _randn(1, 8, 16, seed=10), _randn(1, 8, 16, seed=11)
    kwargs = dict(
        prompt_embeds=positive, negative_prompt_embeds=negative, pooled_prompt_embeds=_randn(1, 8, seed=12),
        negative_pooled_prompt_embeds=_randn(1, 8, seed=13), height=32, width=32, guidance_scale=5.0,
    )  # fmt: skip
    return Case("sd3", pipe, kwargs, _label(positive, negative), ("batched",))


def _flux_case() -> Case:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )  # fmt: skip
    positive, negative = _randn(1, 8, 32, seed=10), _randn(1, 8, 32, seed=11)
    kwargs = dict(
        prompt_embeds=positive, negative_prompt_embeds=negative, pooled_prompt_embeds=_randn(1, 8, seed=12),
        negative_pooled_prompt_embeds=_randn(1, 8, seed=13), true_cfg_scale=4.0, height=32, width=32,
    )  # fmt: skip
    return Case("flux", pipe, kwargs, _label(positive, negative), ("cond", "uncond"))


_BUILDERS = {"wan": _wan_case, "sd3": _sd3_case, "flux": _flux_case}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: one thread is several times faster than two fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(_BUILDERS))
def case(request: pytest.FixtureRequest) -> Iterator[Case]:
    yield _BUILDERS[request.param]()


@pytest.fixture
def hooked(case: Case) -> Iterator[Case]:
    """The case, guaranteed free of StepCache afterwards even when the test fails."""
    yield case
    registry = getattr(case.pipe.transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook("stepcache_step_hook") is not None:
        remove_step_cache(case.pipe)


def test_the_cases_cover_what_they_claim(case: Case) -> None:
    assert set(case.steps_run_by_branch()) == set(case.branches)
    assert all(len(steps) == STEPS for steps in case.steps_run_by_branch().values())
    assert isinstance(case.pipe.transformer, CacheMixin) == (case.name != "sd3")


def test_never_skip_is_bit_identical_to_no_hook(hooked: Case) -> None:
    for config in (NEVER_SKIP, StepCacheConfig(enabled=False)):
        apply_step_cache(hooked.pipe, config)
        assert torch.equal(hooked.generate(), hooked.reference)
        stats = get_step_cache_stats(hooked.pipe)
        assert (stats.num_steps, stats.computed_steps, stats.reused_outputs) == (STEPS, STEPS, 0)
        remove_step_cache(hooked.pipe)


def test_skipping_whenever_allowed_follows_the_seed_schedule_in_every_branch(hooked: Case) -> None:
    apply_step_cache(hooked.pipe, SKIP_WHENEVER_ALLOWED)
    latents = hooked.generate()
    assert hooked.steps_run_by_branch() == {branch: SEED_RUNS for branch in hooked.branches}
    stats = get_step_cache_stats(hooked.pipe)
    assert stats.run_steps == SEED_RUNS and stats.schedule == "RR....R....R...."
    assert stats.forwards == len(SEED_RUNS) * len(hooked.branches)
    assert stats.reused_outputs == (STEPS - len(SEED_RUNS)) * len(hooked.branches)
    assert all(s is not None and s > -0.99 for s in (stats.similarities[i] for i in (2, 7, 12)))
    assert torch.isfinite(latents).all() and not torch.equal(latents, hooked.reference)


def test_two_generations_in_a_row_are_identical(hooked: Case) -> None:
    apply_step_cache(hooked.pipe, SKIP_WHENEVER_ALLOWED)
    first = hooked.generate()
    second = hooked.generate()
    assert torch.equal(first, second)
    assert hooked.steps_run_by_branch() == {branch: SEED_RUNS for branch in hooked.branches}
    assert get_step_cache_stats(hooked.pipe).num_steps == STEPS


def test_removal_restores_the_original_behaviour_exactly(hooked: Case) -> None:
    transformer = hooked.pipe.transformer
    apply_step_cache(hooked.pipe, SKIP_WHENEVER_ALLOWED)
    hooked.generate()
    remove_step_cache(hooked.pipe)
    assert transformer.__dict__["forward"] is hooked.spies["transformer"]  # what was there before
    assert transformer._diffusers_hook.get_hook("stepcache_step_hook") is None
    assert torch.equal(hooked.generate(), hooked.reference)


@pytest.mark.parametrize("case", ["sd3"], indirect=True)
def test_sd3_skip_layer_guidance_adds_a_branch_on_some_steps(hooked: Case) -> None:
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.5)
    reference = hooked.generate(**slg)
    assert {step for step, branch, _ in hooked.forwards if branch == "cond"} == set(range(2, 8))
    apply_step_cache(hooked.pipe, NEVER_SKIP)
    assert torch.equal(hooked.generate(**slg), reference)
    remove_step_cache(hooked.pipe)
    apply_step_cache(hooked.pipe, SKIP_WHENEVER_ALLOWED)
    latents = hooked.generate(**slg)
    stats = get_step_cache_stats(hooked.pipe)
    assert stats.branches == ("call0", "call1") and stats.num_steps == STEPS
    # Steps 2-5 are skipped, but the skip-layer call (steps 2-7 only) has no output to reuse at step 2,
    # so it runs there alone. Step 6 refreshes with both calls; the branches differ from the history's,
    # so the history restarts and step 7 runs too. Likewise at 12-13 when the extra call is gone.
    assert stats.run_steps == [0, 1, 6, 7, 12, 13]
    assert {step for step, branch, _ in hooked.forwards if branch == "cond"} == {2, 6, 7}
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("case", ["wan"], indirect=True)
def test_diffusers_caches_are_refused_and_left_intact(hooked: Case) -> None:
    transformer = hooked.pipe.transformer
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    try:
        with_fbc = hooked.generate()
        with pytest.raises(ValueError, match=r"FirstBlockCacheConfig \(enable_cache\).*disable_cache\(\)"):
            apply_step_cache(hooked.pipe)
        assert torch.equal(hooked.generate(), with_fbc)
    finally:
        transformer.disable_cache()

    apply_step_cache(hooked.pipe, SKIP_WHENEVER_ALLOWED)
    cached = hooked.generate()
    # diffusers' enable_cache sees StepCache and refuses with its own message ...
    with pytest.raises(ValueError, match=r"already been enabled with <class 'stepcache\.config\.StepCacheConfig'>"):
        transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    # ... and a diffusers cache applied behind enable_cache's back is refused when the generation starts.
    apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=0.5))
    try:
        with pytest.raises(RuntimeError, match="cannot share a transformer with another diffusers cache"):
            hooked.generate()
    finally:
        _remove_first_block_cache(transformer)
    assert torch.equal(hooked.generate(), cached)
    remove_step_cache(hooked.pipe)
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    try:
        assert torch.equal(hooked.generate(), with_fbc)
    finally:
        transformer.disable_cache()


@pytest.mark.parametrize("case", ["wan"], indirect=True)
def test_model_cpu_offload_must_wrap_step_cache(hooked: Case) -> None:
    """accelerate re-arms its offload hook after every call, restoring the forward it first saved."""
    pytest.importorskip("accelerate")
    pipe = hooked.pipe
    pipe.enable_model_cpu_offload(device="cpu")
    try:
        with pytest.raises(ValueError, match=r"accelerate hook .* call enable_step_cache\(\) before enabling it"):
            apply_step_cache(pipe)
    finally:
        pipe.remove_all_hooks()
    apply_step_cache(pipe, SKIP_WHENEVER_ALLOWED)
    pipe.enable_model_cpu_offload(device="cpu")
    try:
        for _ in range(2):  # the second generation still goes through StepCache
            latents = hooked.generate()
            assert hooked.steps_run_by_branch() == {branch: SEED_RUNS for branch in hooked.branches}
        with pytest.raises(ValueError, match=r"call pipe.remove_all_hooks\(\) first"):
            remove_step_cache(pipe)
    finally:
        pipe.remove_all_hooks()
    remove_step_cache(pipe)
    assert torch.equal(hooked.generate(), hooked.reference)
    assert torch.isfinite(latents).all()


def test_wan22_two_experts_share_one_decision_per_step() -> None:
    case = _wan_case(two_experts=True)
    reference = case.reference
    assert {name for _, _, name in case.forwards} == {"transformer", "transformer_2"}
    apply_step_cache(case.pipe, NEVER_SKIP)
    assert torch.equal(case.generate(), reference)
    remove_step_cache(case.pipe)
    apply_step_cache(case.pipe, SKIP_WHENEVER_ALLOWED)
    case.generate()
    # The switch to the second expert at step 6 restarts the history: steps 6 and 7 run (never compared
    # with, nor answered by, the first expert's outputs), then the seed's countdown resumes.
    expected = [0, 1, 6, 7, 12]
    assert case.steps_run_by_branch() == {"cond": expected, "uncond": expected}
    assert {(step, name) for step, _, name in case.forwards} == {
        (0, "transformer"), (1, "transformer"), (6, "transformer_2"), (7, "transformer_2"), (12, "transformer_2")
    }  # fmt: skip
    stats = get_step_cache_stats(case.pipe)
    assert stats == get_step_cache_stats(case.pipe.transformer_2)
    assert stats.forwards_by_denoiser == {"transformer": 4, "transformer_2": 6}
    assert [r.reason for r in stats.trace][6:8] == ["warmup", "warmup"]
    # A diffusers cache on the expert that never starts a generation is caught as well.
    apply_first_block_cache(case.pipe.transformer_2, FirstBlockCacheConfig(threshold=0.5))
    try:
        with pytest.raises(RuntimeError, match="WanTransformer3DModel also runs diffusers' FBCHeadBlockHook"):
            case.generate()
        remove_step_cache(case.pipe)
    finally:
        _remove_first_block_cache(case.pipe.transformer_2)
    case.pipe.transformer_2.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    try:
        with pytest.raises(ValueError, match=r"^transformer_2 \(WanTransformer3DModel\) also runs"):
            apply_step_cache(case.pipe)
    finally:
        case.pipe.transformer_2.disable_cache()
    assert case.pipe.transformer_2.__dict__["forward"] is case.spies["transformer_2"]
    assert torch.equal(case.generate(), reference)


def _remove_first_block_cache(transformer: torch.nn.Module) -> None:
    """Undo ``apply_first_block_cache`` (what ``disable_cache`` does for a cache that ``enable_cache`` set)."""
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(_FBC_LEADER_BLOCK_HOOK, recurse=True)
    registry.remove_hook(_FBC_BLOCK_HOOK, recurse=True)


@pytest.mark.parametrize("case", ["wan"], indirect=True)
def test_diffusers_cache_api_sees_step_cache(hooked: Case) -> None:
    """transformer.is_cache_enabled / enable_cache / disable_cache know StepCache on a CacheMixin."""
    transformer = hooked.pipe.transformer
    assert enable_step_cache is apply_step_cache and disable_step_cache is remove_step_cache
    assert not is_step_cache_enabled(hooked.pipe) and not transformer.is_cache_enabled
    enable_step_cache(hooked.pipe, SKIP_WHENEVER_ALLOWED)
    assert is_step_cache_enabled(hooked.pipe) and is_step_cache_enabled(transformer)
    assert transformer.is_cache_enabled
    cached = hooked.generate()
    for config in (FirstBlockCacheConfig(threshold=0.5),
                   MagCacheConfig(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS)):
        with pytest.raises(ValueError, match=r"already been enabled.*disable the existing one first"):
            transformer.enable_cache(config)
    assert torch.equal(hooked.generate(), cached)  # the refusals changed nothing
    transformer.disable_cache()  # diffusers' own call removes StepCache, scheduler watch included
    assert not is_step_cache_enabled(hooked.pipe) and not transformer.is_cache_enabled
    assert "_cache_config" not in transformer.__dict__ and "disable_cache" not in transformer.__dict__
    assert "step" not in hooked.pipe.scheduler.__dict__ and "set_timesteps" not in hooked.pipe.scheduler.__dict__
    assert torch.equal(hooked.generate(), hooked.reference)
    # A diffusers cache then goes on as usual, and off again.
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    transformer.disable_cache()
    assert not transformer.is_cache_enabled
    with pytest.raises(ValueError, match="not applied"):
        disable_step_cache(hooked.pipe)


def test_sd3_without_cache_mixin_gets_no_diffusers_cache_api() -> None:
    """A transformer without CacheMixin has no enable_cache to make aware: nothing is added to it."""
    case = _sd3_case()
    transformer = case.pipe.transformer
    assert not isinstance(transformer, CacheMixin)
    enable_step_cache(case.pipe, SKIP_WHENEVER_ALLOWED)
    assert is_step_cache_enabled(case.pipe)
    assert "_cache_config" not in transformer.__dict__ and "disable_cache" not in transformer.__dict__
    disable_step_cache(case.pipe)
    assert not is_step_cache_enabled(case.pipe)
