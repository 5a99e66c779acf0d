"""Calibrate StepCache for one pipeline from one recorded generation: record once, search offline,
verify a few (see :func:`calibrate`).

- :mod:`~stepcache.calibration.calibrator`: :func:`calibrate`, the method;
- :mod:`~stepcache.calibration.trajectory`: a recorded generation reduced to step times and per-sample
  inner products of its velocities;
- :mod:`~stepcache.calibration.schedules`: the error model of skip windows and the shortest-path search
  of the best fixed schedule per budget;
- :mod:`~stepcache.calibration.policies`: the ``error_budget`` policy fitted to a recording;
- :mod:`~stepcache.calibration.generation`: how a generation runs (a function or a diffusers pipeline);
- :mod:`~stepcache.calibration.result`: :class:`CalibrationResult`, saved as a file every entry point
  accepts as a config.

Needs torch only (diffusers when a diffusers pipeline is calibrated).
"""

from __future__ import annotations

from stepcache.calibration.calibrator import calibrate, mean_db
from stepcache.calibration.generation import NEVER_SKIP, psnr_db
from stepcache.calibration.result import CalibrationResult, Candidate, Choice, HeldOutResult
from stepcache.calibration.schedules import SkipModel, best_schedules, schedule_error
from stepcache.calibration.trajectory import Trajectory

__all__ = [
    "NEVER_SKIP",
    "CalibrationResult",
    "Candidate",
    "Choice",
    "HeldOutResult",
    "SkipModel",
    "Trajectory",
    "best_schedules",
    "calibrate",
    "mean_db",
    "psnr_db",
    "schedule_error",
]
