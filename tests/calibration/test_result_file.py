"""A calibration file is checked whole when it is read: a wrong type, range, index or a missing field
is a ValueError naming the file and the field, never a silently different result."""

from __future__ import annotations

import copy
import json

import pytest

from stepcache import DiffusionCacheConfig
from stepcache.calibration import CalibrationResult
from stepcache.calibration.result import Candidate, Choice


def _result() -> CalibrationResult:
    verified = [
        Candidate(f"static {k}", float(k), DiffusionCacheConfig(step_cache_dit_static_steps=list(range(k))), 0.1,
                  forwards=float(k), fidelity_db=30.0 + k, input_fidelity_db=[30.0 + k])
        for k in (2, 3)
    ]
    unverified = Candidate("static 1", 1.0, DiffusionCacheConfig(step_cache_dit_static_steps=[0]), 0.5)
    return CalibrationResult(
        choices=[Choice({"target_forwards": 3.0}, verified[1], True)], candidates=[*verified, unverified],
        recorded_generations=1, verification_generations=2, generation_limit=3, calibration_inputs=[0],
        num_steps=4, timesteps=[1.0, 0.75, 0.5, 0.25], fidelity="psnr",
    )


@pytest.fixture
def good() -> dict:
    return _result().to_dict()


def _load(tmp_path, data):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(data))
    return CalibrationResult.load(path)


def test_a_valid_file_round_trips(tmp_path, good):
    loaded = _load(tmp_path, good)
    assert loaded.to_dict() == good and loaded.chosen.label == "static 3" and loaded.choices[0].met is True


def _edited(good, edit):
    data = copy.deepcopy(good)
    edit(data)
    return data


CASES = {
    "negative choice": (lambda d: d["choices"][0].update(candidate=-1), r"choices\[0\]\.candidate"),
    "choice out of range": (lambda d: d["choices"][0].update(candidate=99), r"choices\[0\]\.candidate.*0\.\.2"),
    "choice is a bool": (lambda d: d["choices"][0].update(candidate=True), r"choices\[0\]\.candidate"),
    "met is a string": (lambda d: d["choices"][0].update(met="false"), r"choices\[0\]\.met.*JSON boolean"),
    "met is missing": (lambda d: d["choices"][0].pop("met"), r"choices\[0\]\.met is missing"),
    "met without a candidate": (lambda d: d["choices"][0].update(candidate=None), r"choices\[0\]\.met"),
    "chosen without fidelity": (lambda d: d["candidates"][1].update(fidelity_db=None), r"choices\[0\]\.candidate"),
    "chosen unverified": (lambda d: d["choices"][0].update(candidate=2), r"choices\[0\]\.candidate"),
    "fidelity a string": (lambda d: d["candidates"][0].update(fidelity_db="30"), r"candidates\[0\]\.fidelity_db"),
    "fidelity NaN": (lambda d: d["candidates"][0].update(fidelity_db=float("nan")), r"candidates\[0\]\.fidelity_db"),
    "forwards a string": (lambda d: d["candidates"][0].update(forwards="2"), r"candidates\[0\]\.forwards"),
    "bad candidate config": (lambda d: d["candidates"][0]["config"].update(velocity_reuse="x"),
                             r"candidates\[0\]\.config.*velocity_reuse"),
    "num_steps a float": (lambda d: d.update(num_steps=4.5), r"num_steps"),
    "num_steps zero": (lambda d: d.update(num_steps=0), r"num_steps"),
    "generations negative": (lambda d: d["generations"].update(recorded=-1), r"generations\.recorded"),
    "generations missing": (lambda d: d.pop("generations"), r"generations is missing"),
    "timestep a string": (lambda d: d["timesteps"].__setitem__(1, "0.5"), r"timesteps\[1\]"),
    "goal unknown": (lambda d: d["choices"][0].update(goal={"speed": 3}), r"choices\[0\]\.goal"),
    "goal a string": (lambda d: d["choices"][0].update(goal={"target_forwards": "3"}), r"choices\[0\]\.goal"),
    "candidates not a list": (lambda d: d.update(candidates={}), r"candidates must be a list"),
    "held-out index": (lambda d: d.update(held_out=[{"candidate": -1, "forwards": 2, "fidelity_db": 1}]),
                       r"held_out\[0\]\.candidate"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_field_is_refused_naming_the_file_and_the_field(tmp_path, good, case):
    edit, field = CASES[case]
    with pytest.raises(ValueError, match=field) as err:
        _load(tmp_path, _edited(good, edit))
    assert "cal.json" in str(err.value)
