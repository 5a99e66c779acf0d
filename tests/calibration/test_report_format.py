"""How calibration reports write a fidelity: outputs equal to float rounding read "identical"."""

from __future__ import annotations

import math

from stepcache.calibration.result import IDENTICAL_DB, format_db


def test_fidelity_above_float_rounding_reads_identical() -> None:
    assert format_db(205.3) == "identical"
    assert format_db(math.inf) == "identical"
    assert format_db(IDENTICAL_DB + 0.1) == "identical"
    assert format_db(44.07) == "44.07 dB"
    assert format_db(None) == "-"
