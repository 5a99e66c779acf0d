"""`stepcache train` never writes into the installed package and never overwrites weights silently."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

import stepcache.models.dreamzero.training as dreamzero_training
from stepcache.tools import cli
from stepcache.tools.common import package_dir


@pytest.fixture
def fake_trainer(monkeypatch):
    """dreamzero-mini's trainer replaced by one that writes placeholder files at once, recording its call."""
    calls = []

    def train_bundled(out_dir, *, seed=0, steps=None, progress=True, num_threads=1):
        calls.append({"out_dir": Path(out_dir), "seed": seed, "steps": steps, "num_threads": num_threads})
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            (Path(out_dir) / name).write_text(f"trained with seed {seed}")
        return Path(out_dir)

    monkeypatch.setattr(dreamzero_training, "train_bundled", train_bundled)
    return calls


def _exit_code(argv):
    try:
        return cli.main(argv)
    except SystemExit as exit_info:
        return int(exit_info.code or 0)


def test_default_output_is_a_new_folder_in_the_working_directory(fake_trainer, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "dreamzero-mini", "--train-steps", "3", "--seed", "2", "--json", "t.json"]) == 0
    assert fake_trainer[0]["out_dir"].resolve() == tmp_path / "dreamzero-mini-weights"
    assert fake_trainer[0]["steps"] == 3 and fake_trainer[0]["seed"] == 2
    assert "dreamzero-mini-weights/model.safetensors" in capsys.readouterr().out
    document = json.loads((tmp_path / "t.json").read_text())
    assert document["train_steps"] == 3 and document["run"]["command"].startswith("stepcache train dreamzero-mini")


def test_existing_weights_need_overwrite(fake_trainer, tmp_path, capsys):
    out = tmp_path / "w"
    assert cli.main(["train", "dreamzero-mini", "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["train", "dreamzero-mini", "--out", str(out), "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out) in err and len(err.strip().splitlines()) == 1
    assert (out / "model.safetensors").read_text() == "trained with seed 0"  # untouched
    assert cli.main(["train", "dreamzero-mini", "--out", str(out), "--seed", "5", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_text() == "trained with seed 5"


@pytest.mark.parametrize("inside", [".", "models/dreamzero/weights/dreamzero-mini", "new-folder"])
def test_never_inside_the_installed_package(fake_trainer, capsys, inside):
    target = package_dir() / inside
    existed = target.exists()
    for extra in ([], ["--overwrite"]):
        assert _exit_code(["train", "dreamzero-mini", "--out", str(target), *extra]) == 2
        assert "inside the installed stepcache package" in capsys.readouterr().err
    assert fake_trainer == [] and target.exists() == existed


def test_old_steps_spelling_still_works_with_a_deprecation_note(fake_trainer, tmp_path, capsys):
    assert cli.main(["train", "dreamzero-mini", "--steps", "4", "--out", str(tmp_path / "w")]) == 0
    assert fake_trainer[0]["steps"] == 4
    assert "--steps is deprecated, use --train-steps" in capsys.readouterr().err


def test_threads_reach_a_trainer_that_sets_its_own(fake_trainer, tmp_path):
    assert cli.main(["train", "dreamzero-mini", "--threads", "2", "--out", str(tmp_path / "w")]) == 0
    assert fake_trainer[0]["num_threads"] == 2


@pytest.mark.parametrize("module", ["stepcache.models.dreamzero.training", "stepcache.models.wan_digits.training"])
def test_the_trainers_have_no_default_output_folder(module):
    import importlib

    train_bundled = importlib.import_module(module).train_bundled
    assert inspect.signature(train_bundled).parameters["out_dir"].default is inspect.Parameter.empty
