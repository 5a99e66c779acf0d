"""How much memory one StepCache decision takes on the CPU, per dtype, against one velocity's bytes.

A decision reads the last two computed velocities through chunked float32 sums (see
``stepcache.state.velocity_statistics``). This script measures, for each dtype, in a fresh process:

- transient: the peak resident memory during one decision minus the resident memory before it
  (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, Linux only);
- retained: the resident memory after the decision minus before it.

Each process runs with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``), so that large
buffers are returned to the system when freed. Without it glibc raises the threshold after the first
large free and keeps freed buffers in its heap, which shows up as "retained" memory that no tensor holds
(the measurement would be of the allocator, not of StepCache). ``--default-allocator`` measures that too.

    .venv/bin/python benchmarks/decision_memory.py                    # 8M elements per sample
    .venv/bin/python benchmarks/decision_memory.py --elements 2097152 --json memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DTYPES = ("float32", "bfloat16", "float16")
MMAP_THRESHOLD = 65536


def _resident(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure_one(dtype_name: str, elements: int) -> dict[str, float]:
    """One decision of the seed rule on two velocities of ``elements`` per sample (batch 1), in this
    process: transient and retained bytes as multiples of one velocity's bytes."""
    import torch

    from stepcache import StepCacheConfig, StepCacheState

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    # filled in place: no float32 temporary of a low-precision velocity inflates the baseline
    history = [(torch.empty(1, elements, dtype=dtype).normal_(),) for _ in range(2)]
    state = StepCacheState(StepCacheConfig())

    def decide() -> None:
        state.reset(16)
        state.should_run_step(history)

    decide()  # warm-up: kernels, the allocator's first mappings
    velocity_bytes = history[0][0].element_size() * elements
    before = _resident("VmRSS:")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size
    decide()
    peak, after = _resident("VmHWM:"), _resident("VmRSS:")
    return {"transient": (peak - before) / velocity_bytes, "retained": (after - before) / velocity_bytes,
            "velocity_mib": velocity_bytes / 2**20}


def measure(dtype_name: str, elements: int, default_allocator: bool = False) -> dict[str, float]:
    """:func:`measure_one` in a fresh process (so that one dtype's buffers do not serve another's)."""
    env = dict(os.environ)
    if not default_allocator:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    out = subprocess.run([sys.executable, __file__, "--child", dtype_name, "--elements", str(elements)],
                         env=env, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=8 * 2**20, help="velocity elements per sample")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's mmap threshold dynamic (measures the allocator's caching too)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--child", metavar="DTYPE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.elements < 1:
        parser.error(f"--elements must be a positive integer, got {args.elements}")
    if args.child:
        print(json.dumps(measure_one(args.child, args.elements)))
        return 0
    rows = {name: measure(name, args.elements, args.default_allocator) for name in args.dtypes}
    print(f"one decision, {args.elements} elements per sample, "
          f"{'default glibc allocator' if args.default_allocator else 'fixed mmap threshold'}")
    print(f"{'dtype':<10} {'velocity MiB':>12} {'transient':>10} {'retained':>9}")
    for name, row in rows.items():
        print(f"{name:<10} {row['velocity_mib']:>12.1f} {row['transient']:>9.2f}x {row['retained']:>8.2f}x")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"elements": args.elements, "default_allocator": args.default_allocator, "rows": rows}, out,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
