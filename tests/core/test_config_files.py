"""Config and calibration files that are not what they should be: each error says what the file is,
names it, and echoes no more than a readable piece of any value."""

from __future__ import annotations

import json
import pickle

import pytest

from stepcache import DiffusionCacheConfig, StepCacheConfig, as_diffusion_cache_config
from stepcache.calibration import CalibrationResult
from stepcache.config import shown
from stepcache.tools import cli


class _Marker:
    """Unpickling this would run ``_explode``: proof that a pickle is never executed."""

    def __reduce__(self):
        return (_explode, ())


def _explode():
    raise AssertionError("the pickle was executed")


@pytest.mark.parametrize("content", [pickle.dumps({"velocity_reuse": "cache", "x": _Marker()}), b"\x00\xff\xfe binary"],
                         ids=["pickle", "binary"])
@pytest.mark.parametrize("read", [DiffusionCacheConfig.from_file, as_diffusion_cache_config, CalibrationResult.load],
                         ids=["from_file", "as_config", "calibration"])
def test_a_binary_file_is_not_utf8_json_text(tmp_path, content, read):
    path = tmp_path / "config.pkl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not UTF-8 JSON text") as err:
        read(str(path))
    assert str(path) in str(err.value)


def test_a_binary_file_on_the_command_line_is_one_line(tmp_path, capsys):
    path = tmp_path / "config.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    assert cli.main(["demo", "--cache-config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not UTF-8 JSON text" in err and str(path) in err


def test_shown_cuts_long_values():
    assert len(shown("x" * 5_000_000)) < 100
    assert len(shown(list(range(1_000_000)))) < 100
    assert shown("fast") == "'fast'"


HUGE = "x" * 5_000_000


@pytest.mark.parametrize("data", [{"velocity_reuse": HUGE}, {HUGE: 1}, {"velocity_sim_thresholds": [HUGE]},
                                  {"step_cache_dit_static_steps": [*range(1_000_000), "a"]}, [HUGE]],
                         ids=["value", "key", "nested", "long-list", "not-an-object"])
def test_a_huge_config_gives_a_short_message(tmp_path, data, capsys):
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        DiffusionCacheConfig.from_file(path)
    assert str(path) in str(err.value) and len(str(err.value)) < 2000
    with pytest.raises(ValueError) as err:  # values are checked where upstream checks them: at translation
        StepCacheConfig.from_diffusion_cache_config(DiffusionCacheConfig.from_dict(json.dumps(data)))
    assert len(str(err.value)) < 2000
    assert cli.main(["demo", "--cache-config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 2000


def test_a_huge_value_on_the_command_line_gives_a_short_line(tmp_path, capsys):
    assert cli.main(["demo", "--cache-config", json.dumps({"velocity_reuse": HUGE}), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 2100
    with pytest.raises(SystemExit) as exited:  # argparse's own usage error
        cli.main(["demo", "--seed", "x" * 1_000_000])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 2100


@pytest.mark.parametrize("name,closest", [("balnced", "balanced"), ("Balanced", "balanced"),
                                          ("balanced ", "balanced"), ("qualty", "quality"), ("zzz", None)])
def test_a_misspelt_preset_is_not_reported_as_a_missing_file(name, closest):
    with pytest.raises(ValueError) as err:
        as_diffusion_cache_config(name)
    message = str(err.value)
    assert "neither a preset" in message and "nor an existing file" in message and "does not exist" not in message
    assert "'fast'" in message and "'seed'" in message
    assert (f"did you mean {closest!r}" in message) if closest else "did you mean" not in message
    with pytest.raises(ValueError, match=f"did you mean {closest!r}" if closest else "presets"):
        DiffusionCacheConfig.preset(name)


def test_a_missing_json_path_is_still_a_missing_file(tmp_path):
    for path in (str(tmp_path / "nothere"), "nothere.json"):
        with pytest.raises(ValueError, match="does not exist"):
            as_diffusion_cache_config(path)


@pytest.mark.parametrize("config", ["absent", None, "cut"])
def test_a_calibration_file_without_its_config_says_so(tmp_path, config, capsys):
    data = {"format": "stepcache-calibration", "version": 1, "choices": [], "candidates": [], "generations": {},
            "inputs": {}, "held_out": [], "num_steps": 16, "timesteps": [], "fidelity": "psnr", "fits": [],
            "timings_s": {}, "metadata": {}}
    if config is None:
        data["config"] = None
    elif config == "cut":
        data["config"] = "{"
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        as_diffusion_cache_config(str(path))
    message = str(err.value)
    assert "calibration file without its chosen config" in message and "unknown" not in message
    assert str(path) in message
    assert cli.main(["demo", "--cache-config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "without its chosen config" in capsys.readouterr().err
