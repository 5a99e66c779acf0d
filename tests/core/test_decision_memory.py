"""A decision's memory on the CPU: transient buffers under 3/4 of a velocity, nothing kept after it.

Measured in fresh processes by benchmarks/decision_memory.py (resident memory with glibc's mmap
threshold fixed, so that freed buffers leave the process and only what StepCache holds is counted).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decision_memory.py"

pytestmark = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                                reason="needs Linux's /proc/self/clear_refs to reset the peak resident size")


def _benchmark():
    spec = importlib.util.spec_from_file_location("decision_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_decision_keeps_nothing_and_stays_under_three_quarters_of_a_velocity(dtype):
    row = _benchmark().measure(dtype, 4 * 2**20)  # 16 MiB / 8 MiB velocities: well above page noise
    assert row["transient"] <= 0.8, row
    assert row["retained"] <= 0.05, row
