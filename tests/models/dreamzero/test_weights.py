from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepcache.models.dreamzero.model import CausalWorldActionDiT, KVCache
from stepcache.models.dreamzero.weights import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    bundled_weights_dir,
    load_config,
    load_model,
    save_model,
)
from tests.models.dreamzero.tiny import TINY, make_tiny_model


def _outputs(model: CausalWorldActionDiT):
    cache = KVCache()
    model.prefill(torch.zeros(1, 32, 32), torch.tensor([2]), cache)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(1, 2, 32, 32, generator=g), torch.randn(1, 8, 2, generator=g), torch.zeros(1, 2),
                     torch.full((1,), 700.0), torch.full((1,), 300.0), torch.tensor([2]), cache)


def test_round_trip_is_exact(tmp_path):
    model = make_tiny_model(seed=3)
    out_dir = save_model(model, tmp_path / "m", extra={"note": "test"})
    assert sorted(p.name for p in out_dir.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = load_model(out_dir)
    assert loaded.config == TINY
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    a, b = _outputs(model), _outputs(loaded)
    assert torch.equal(a.video, b.video) and torch.equal(a.action, b.action)
    assert load_config(out_dir)["note"] == "test"


def test_weights_get_the_umask_mode_like_the_config(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out_dir = save_model(make_tiny_model(), tmp_path / "m")
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE((out_dir / name).stat().st_mode) for name in (WEIGHTS_NAME, CONFIG_NAME)}
    assert modes == {WEIGHTS_NAME: 0o644, CONFIG_NAME: 0o644}


def test_half_precision_storage_loads_as_float32(tmp_path):
    model = make_tiny_model()
    loaded = load_model(save_model(model, tmp_path / "m", dtype=torch.float16))
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=1e-3, atol=1e-4)


def test_missing_files_name_the_file(tmp_path):
    out_dir = save_model(make_tiny_model(), tmp_path / "m")
    (out_dir / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*expected the dreamzero-mini weights"):
        load_model(out_dir)
    (out_dir / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(out_dir)
    with pytest.raises(FileNotFoundError, match="neither a bundled model"):
        load_model(tmp_path / "does-not-exist")


def test_truncated_weights_are_a_clear_error(tmp_path):
    out_dir = save_model(make_tiny_model(), tmp_path / "m")
    path = out_dir / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors.*truncated"):
        load_model(out_dir)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_model(out_dir)


def test_mismatched_weights_name_the_tensor_and_the_expectation(tmp_path):
    model = make_tiny_model()
    rows, cols = model.video_head.weight.shape
    out_dir = save_model(model, tmp_path / "m")
    path = out_dir / WEIGHTS_NAME
    tensors = load_file(str(path))
    tensors["video_head.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=rf"'video_head.weight' has shape \(3, 3\), expected \({rows}, {cols}\)"):
        load_model(out_dir)
    del tensors["video_head.weight"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"missing tensors \['video_head.weight'\]"):
        load_model(out_dir)


def test_bad_config_is_a_clear_error(tmp_path: Path):
    out_dir = save_model(make_tiny_model(), tmp_path / "m")
    config_path = out_dir / CONFIG_NAME
    data = json.loads(config_path.read_text())
    config_path.write_text("{ not json")
    with pytest.raises(ValueError, match=r"cannot read .*config\.json"):
        load_model(out_dir)
    config_path.write_text(json.dumps({**data, "model_type": "wan-digits"}))
    with pytest.raises(ValueError, match="expected model_type 'dreamzero-mini', found 'wan-digits'"):
        load_model(out_dir)
    config_path.write_text(json.dumps({**data, "model": {**data["model"], "hidden_size": 48}}))
    with pytest.raises(ValueError, match="expected"):  # weights no longer match the config's shapes
        load_model(out_dir)
    config_path.write_text(json.dumps({**data, "model": {**data["model"], "depth": 2}}))
    with pytest.raises(ValueError, match="unknown DreamZeroMiniConfig keys"):
        load_model(out_dir)


def test_bundled_weights_ship_and_load():
    folder = bundled_weights_dir("dreamzero-mini")
    size = (folder / WEIGHTS_NAME).stat().st_size
    assert size < 8 * 1024 * 1024  # a few MB at most
    model = load_model("dreamzero-mini")
    assert load_config(folder)["model"] == model.config.to_dict()
    with pytest.raises(ValueError, match="unknown bundled model"):
        bundled_weights_dir("dreamzero-max")
