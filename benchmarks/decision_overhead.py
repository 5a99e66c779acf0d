"""What one StepCache decision costs, on a DreamZero-DROID-sized video velocity.

DreamZero's video latent per chunk is 16 channels x 2 frames x 44 x 80 (880 tokens per frame). A
decision reads the last two computed velocities: this script times the signals (the per-sample sums
and what is derived from them), a whole ``should_run_step`` for each policy, and an extrapolated reuse,
and compares them with one forward of the bundled dreamzero-mini DiT (the smallest model StepCache runs;
a real 14B forward is thousands of times longer). On a CUDA device it also measures the decision's
transient memory exactly (peak allocated minus what was allocated before), against the size of one
velocity.

With ``--engine-sessions N`` it also measures the serving engine's own cost per session-step: N
sessions of an in-process ``Omni`` whose DiT costs nothing (its forward hands back its inputs as
velocities, its prefill does nothing), all chunks submitted together, wall time over N x 16 steps.
That is everything the engine does besides the model: inputs, decisions, CFG, scheduler replay,
bookkeeping, the hand-off to the worker thread.

    .venv/bin/python benchmarks/decision_overhead.py              # CPU (and CUDA when present)
    .venv/bin/python benchmarks/decision_overhead.py --json out.json
    .venv/bin/python benchmarks/decision_overhead.py --engine-sessions 64 --repeats 5 --no-decisions
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stepcache import StepCacheConfig, StepCacheState, __version__
from stepcache.state import velocity_signals
from stepcache.tools.common import UsageError, add_update_docs_figures_argument, prepare_out_file

DROID_VELOCITY = (1, 16, 2, 44, 80)
POLICIES = {
    "seed rule": StepCacheConfig(),
    "error budget": StepCacheConfig(policy="error_budget", error_budget=0.05),
    "planned": StepCacheConfig(policy="planned", forward_budget=6),
}


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(device: str, dtype: torch.dtype, repeats: int) -> dict[str, object]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    generator = torch.Generator(device=device).manual_seed(0)
    v1 = torch.randn(DROID_VELOCITY, generator=generator, device=device).to(dtype)
    v2 = (v1.float() + 0.05 * torch.randn(DROID_VELOCITY, generator=generator, device=device)).to(dtype)
    history = [(v2,), (v1,)]
    velocity_bytes = v1.numel() * v1.element_size()
    result: dict[str, object] = {"device": device, "dtype": str(dtype).replace("torch.", ""),
                                 "velocity_bytes": velocity_bytes, "times_ms": {}}
    times = result["times_ms"]
    times["signals (sums + cosine + relative change)"] = 1e3 * median_seconds(
        lambda: velocity_signals(v1, v2), repeats, sync
    )
    for name, config in POLICIES.items():
        times[f"should_run_step, {name}"] = 1e3 * median_seconds(_decision(config, history), repeats, sync)
    extrapolating = StepCacheConfig(static_run_steps=(0, 1), reuse="extrapolate")
    times["extrapolated reuse"] = 1e3 * median_seconds(_reuse(extrapolating, history), repeats, sync)
    if device == "cuda":
        peaks = {}
        def wave1_cosine() -> float:  # how the similarity was computed before the per-sample sums
            a, b = v1.flatten(1).float(), v2.flatten(1).float()
            return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())

        for name, fn in (("signals", lambda: velocity_signals(v1, v2)), ("wave-1 cosine_similarity", wave1_cosine),
                         *((f"should_run_step, {n}", _decision(c, history)) for n, c in POLICIES.items())):
            sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            sync()
            peaks[name] = torch.cuda.max_memory_allocated() - before
        result["transient_bytes"] = peaks
        result["transient_over_velocity"] = {k: round(v / velocity_bytes, 3) for k, v in peaks.items()}
    return result


def _decision(config: StepCacheConfig, history: list) -> Callable[[], bool]:
    """Decide the step after two computed steps (0 and 1), where every policy reads its signal."""
    times = [1.0 - i / 16 for i in range(17)]

    def run() -> bool:
        state = StepCacheState(config)
        state.reset(16, timesteps=times)
        for _ in range(2):
            state.commit_step(state.plan_step(history[: state.step_index]))
        return state.should_run_step(history)

    return run


def _reuse(config: StepCacheConfig, history: list) -> Callable[[], object]:
    state = StepCacheState(config)
    state.reset(16)
    for step in range(3):
        state.should_run_step(history[: min(step, 2)], timestep=1.0 - step / 16)
    return lambda: state.reused_prediction(history)


def model_forward_ms(repeats: int, device: str = "cpu") -> float:
    """One denoising forward of the bundled dreamzero-mini (CFG batch of 2)."""
    from stepcache.models.dreamzero.model import KVCache
    from stepcache.models.dreamzero.weights import load_model

    model = load_model("dreamzero-mini").eval().to(device)
    cfg = model.config
    cache = KVCache()
    instructions = torch.tensor([0, cfg.null_instruction], device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        model.prefill(torch.zeros(2, cfg.frame_size, cfg.frame_size, device=device), instructions, cache)
        video = torch.randn(2, cfg.future_frames, cfg.frame_size, cfg.frame_size, device=device)
        actions = torch.randn(2, cfg.action_horizon, cfg.action_dim, device=device)
        state = torch.zeros(2, cfg.state_dim, device=device)
        t = torch.full((2,), 500.0, device=device)
        return 1e3 * median_seconds(lambda: model(video, actions, state, t, t, instructions, cache), repeats, sync)


ENGINE_MODES = {"none": None, "seed rule": "seed", "fast": "fast", "balanced": "balanced"}


def engine_overhead(sessions: int, chunks: int, device: str = "cpu") -> dict[str, float]:
    """Microseconds of engine work per session-step, per cache mode, with a DiT that costs nothing."""
    from stepcache.models.dreamzero.model import DiTOutput
    from stepcache.models.dreamzero.world import ReachingWorld
    from stepcache.omni import Omni

    result = {}
    for mode, preset in ENGINE_MODES.items():
        backend = None if preset is None else "step_cache"
        omni = Omni("dreamzero-mini", cache_backend=backend, cache_config=preset, device=device)
        model = omni.pipeline.transformer
        model.forward = lambda video, actions, *rest: DiTOutput(video=video, action=actions, goal_position=None)
        model.prefill = lambda *args, **kwargs: None
        opened = [omni.open_session(seed=index) for index in range(sessions)]
        inputs = []
        for index in range(sessions):
            frame, state = ReachingWorld().reset(index)
            inputs.append((frame, "reach the ring", state))
        steps = omni.num_inference_steps
        times = []
        for chunk in range(chunks + 1):  # the first round warms up (replay tables, allocator)
            start = time.perf_counter()
            with omni.engine.paused():
                futures = [session.submit(*inputs[i]) for i, session in enumerate(opened)]
            for future in futures:
                future.result()
            if chunk:
                times.append(time.perf_counter() - start)
        omni.close()
        result[mode] = 1e6 * statistics.median(times) / (sessions * steps)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--engine-sessions", type=int, default=0, metavar="N",
                        help="also time the serving engine's work per session-step with N sessions (0: not)")
    parser.add_argument("--no-decisions", action="store_true", help="skip the decision and forward timings")
    add_update_docs_figures_argument(parser)
    args = parser.parse_args()
    if args.json is not None:
        try:
            prepare_out_file(args.json, update_docs_figures=args.update_docs_figures)
        except UsageError as err:
            parser.error(str(err))
    if args.engine_sessions < 0:
        parser.error(f"--engine-sessions must be >= 0, got {args.engine_sessions}")
    torch.set_num_threads(args.threads)
    report = {
        "stepcache": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "velocity_shape": list(DROID_VELOCITY), "runs": [],
    }
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        report["device"] = torch.cuda.get_device_name()
    if not args.no_decisions:
        report["dreamzero_mini_forward_ms"] = {device: model_forward_ms(args.repeats, device) for device in devices}
        for device in devices:
            for dtype in (torch.float32, torch.bfloat16):
                report["runs"].append(measure(device, dtype, args.repeats))
    if args.engine_sessions:
        report["engine_us_per_session_step"] = {
            device: engine_overhead(args.engine_sessions, args.repeats, device) for device in devices}
        report["engine_sessions"] = args.engine_sessions
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
