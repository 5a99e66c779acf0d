"""``stepcache calibrate`` on tiny stand-ins of the bundled models: one recorded generation and two
verifications per budget, a result file every entry point takes, a held-out report on other inputs."""

from __future__ import annotations

import json

import pytest

from stepcache import DiffusionCacheConfig
from stepcache.calibration import CalibrationResult
from stepcache.tools import calibrate, cli
from tests.tools.tiny_models import single_thread, tiny_wan_digits


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture
def tiny_digits(tmp_path, monkeypatch):
    digits = tiny_wan_digits(tmp_path / "tiny-wan")  # fresh: --scheduler and --guidance-scale change it
    monkeypatch.setattr("stepcache.models.wan_digits.load_wan_digits", lambda *a, **k: digits)
    return digits


@pytest.fixture
def tiny_dreamzero(monkeypatch):
    from stepcache.models.dreamzero.pipeline import DreamZeroPipeline
    from tests.models.dreamzero.tiny import make_tiny_model

    monkeypatch.setattr(DreamZeroPipeline, "from_pretrained",
                        classmethod(lambda cls, model, config=None: cls(make_tiny_model(), config)))


def _run(argv, capsys):
    code = cli.main(["calibrate", *argv, "--no-progress", "--threads", "1"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_wan_digits_calibrates_and_reports_on_held_out_inputs(tiny_digits, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = _run(["--model", "wan-digits", "--target-forwards", "4", "6", "--out", str(out),
                                 "--json", str(tmp_path / "copy.json")], capsys)
    assert code == 0, stderr
    path = out / "stepcache-wan-digits-calibrated.json"
    document = json.loads(path.read_text())
    assert document == json.loads((tmp_path / "copy.json").read_text())
    result = CalibrationResult.load(path)
    assert DiffusionCacheConfig.from_file(path) == result.config == result.config_for(4)
    assert [len(result.config_for(k).step_cache_dit_static_steps) for k in (4, 6)] == [4, 6]
    assert result.generations == 5 == result.generation_limit  # 1 recorded + 2 verifications per budget
    assert result.calibration_inputs == [{"digits": 20, "per_class": 2, "seed": 1}]
    assert result.held_out_inputs == [{"digits": 100, "per_class": 10, "seed": 0}]
    assert [h.forwards for h in result.held_out] == [4, 6]
    assert all({"fewer_steps_db", "planned_db"} <= set(h.extra) for h in result.held_out)
    assert document["metadata"]["run"]["command"].startswith("stepcache calibrate")
    assert document["metadata"]["scheduler"] == "UniPCMultistepScheduler"
    assert "held out: 4 forwards" in stdout and "fewer steps" in stdout and f"wrote {path}" in stdout


def test_an_untuned_setup_euler_other_steps_and_guidance(tiny_digits, tmp_path, capsys):
    code, stdout, stderr = _run(["--model", "wan-digits", "--scheduler", "euler", "--steps", "10",
                                 "--guidance-scale", "2", "--target-forwards", "4", "--no-held-out",
                                 "--out", str(tmp_path)], capsys)
    assert code == 0, stderr
    result = CalibrationResult.load(tmp_path / "stepcache-wan-digits-calibrated.json")
    assert result.num_steps == 10 and result.metadata["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert result.metadata["guidance_scale"] == 2 and result.held_out == []
    # a first-order scheduler: solver-aware stepping would change nothing, so no candidate spends on it
    assert not any(c.config.step_cache_dit_solver_aware for c in result.candidates)
    assert "held out" not in stdout


def test_dreamzero_mini_calibrates_on_its_own_episodes(tiny_dreamzero, tmp_path, capsys):
    code, _, stderr = _run(["--model", "dreamzero-mini", "--target-forwards", "5", "--out", str(tmp_path)], capsys)
    assert code == 0, stderr
    result = CalibrationResult.load(tmp_path / "stepcache-dreamzero-mini-calibrated.json")
    assert result.generations == 3 and len(result.config.step_cache_dit_static_steps) == 5
    assert result.calibration_inputs[0]["world_seeds"] == [1000, 1001]  # never the bench's (seed 0: 0..7)
    assert result.held_out_inputs[0]["world_seeds"] == list(range(8))
    assert result.held_out[0].forwards == 5


def test_a_floor_no_verified_config_reaches_writes_nothing(tiny_digits, tmp_path, capsys):
    code, _, stderr = _run(["--min-psnr", "500", "--verifications", "1", "--no-held-out", "--out", str(tmp_path)],
                           capsys)
    assert code == 1 and "no verified config reaches PSNR >= 500 dB" in stderr
    assert not (tmp_path / "stepcache-wan-digits-calibrated.json").exists()


@pytest.mark.parametrize(("argv", "words"), [
    (["--target-forwards", "4", "--held-out-seed", "1"], "--held-out-seed 1 is the calibration --seed"),
    (["--model", "dreamzero-mini", "--scheduler", "euler", "--target-forwards", "4"], "--scheduler"),
    (["--target-forwards", "4", "--verifications", "0"], "--verifications"),
])
def test_usage_errors_before_any_work(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(calibrate, "_wan_digits_setup", lambda args: pytest.fail("started working"))
    monkeypatch.setattr(calibrate, "_dreamzero_setup", lambda args: pytest.fail("started working"))
    try:
        code = cli.main(["calibrate", *argv, "--out", str(tmp_path)])
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
