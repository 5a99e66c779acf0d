"""wan-digits: the bundled diffusers model loads, samples recognisable digits, rejects bad files, trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from stepcache.models.wan_digits import DigitClassifier, load_wan_digits
from stepcache.models.wan_digits.data import load_digit_pixels
from stepcache.models.wan_digits.pipeline import CONFIG_NAME, WEIGHTS_DIR, WEIGHTS_NAME
from stepcache.models.wan_digits.training import TrainingSettings, train_bundled, train_wan_digits

TINY_TRANSFORMER = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 1,
    "out_channels": 1,
    "text_dim": 8,
    "freq_dim": 16,
    "ffn_dim": 32,
    "num_layers": 1,
    "rope_max_seq_len": 32,
}


@pytest.fixture(scope="module")
def digits():
    return load_wan_digits()


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier()


def test_bundled_model_is_a_plain_wan_pipeline(digits):
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    assert isinstance(digits.pipe, WanPipeline)
    assert isinstance(digits.pipe.transformer, WanTransformer3DModel)
    assert isinstance(digits.pipe.scheduler, UniPCMultistepScheduler)
    assert digits.pipe.text_encoder is None and digits.pipe.vae is None
    parameters = sum(p.numel() for p in digits.pipe.transformer.parameters())
    assert 0.2e6 < parameters < 2e6
    assert sum(f.stat().st_size for f in WEIGHTS_DIR.iterdir()) < 8e6  # ships inside the wheel


def test_sampling_through_the_pipeline(digits):
    pixels = digits.sample([3, 1, 4], num_inference_steps=4, seed=7)
    assert pixels.shape == (3, 8, 8)
    assert torch.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 16
    # The raw diffusers call gives the same latents, and a seed fixes them.
    generator = torch.Generator().manual_seed(7)
    latents = digits.pipe(**digits.call_kwargs([3, 1, 4]), num_inference_steps=4, generator=generator).frames
    assert latents.shape == (3, 1, 1, 8, 8)
    assert torch.equal(digits.sample([3, 1, 4], num_inference_steps=4, seed=7), pixels)


def test_prompt_embeds_use_the_null_entry_for_cfg(digits):
    conditional, unconditional = digits.prompt_embeds([0, 9])
    table = digits.class_embeddings.weight
    assert torch.equal(conditional, table[[0, 9]])
    assert torch.equal(unconditional, table[[10, 10]])
    with pytest.raises(ValueError, match="labels"):
        digits.prompt_embeds([10])


def test_classifier_recognises_held_out_real_digits():
    pixels, labels = load_digit_pixels()
    classifier = DigitClassifier(pixels[::2], labels[::2])
    assert classifier.accuracy(pixels[1::2], labels[1::2]) >= 0.97


def test_samples_are_recognisable_digits(digits, classifier):
    labels = [c for c in range(10) for _ in range(10)]
    pixels = digits.sample(labels, seed=0)  # the model's default steps and guidance
    accuracy = classifier.accuracy(pixels, labels)
    assert accuracy >= 0.95, f"classifier agrees with the requested class for only {accuracy:.0%} of 100 samples"
    # Not 100 copies of one template per class.
    assert (pixels[:10] - pixels[:10].mean(0)).abs().mean() > 0.5


# --- bad weight files -----------------------------------------------------------------------------


@pytest.fixture
def weights_copy(tmp_path) -> Path:
    folder = tmp_path / "wan-digits"
    shutil.copytree(WEIGHTS_DIR, folder)
    return folder


def test_missing_files_name_the_file(weights_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_wan_digits(tmp_path / "nowhere")
    (weights_copy / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_wan_digits(weights_copy)
    (weights_copy / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_wan_digits(weights_copy)


def test_truncated_weights_are_a_clear_error(weights_copy):
    weights = weights_copy / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: not a readable safetensors file"):
        load_wan_digits(weights_copy)
    weights.write_bytes(b"\x80\x04 a pickle, not safetensors")
    with pytest.raises(ValueError, match=WEIGHTS_NAME):
        load_wan_digits(weights_copy)


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    edit(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["transformer"].update(num_layers=c["transformer"]["num_layers"] + 1), "missing"),
        (lambda c: c["transformer"].update(ffn_dim=c["transformer"]["ffn_dim"] * 2), "has shape"),
        (lambda c: c["class_embeddings"].update(tokens_per_class=1), "class_embeddings.weight"),
        (lambda c: c["transformer"].update(not_a_wan_argument=1), "invalid model configuration"),
        (lambda c: c.update(format="something-else"), "'format'"),
        (lambda c: c.pop("scheduler"), "'scheduler'"),
    ],
)
def test_mismatched_config_is_a_clear_error(weights_copy, edit, message):
    _edit_config(weights_copy, edit)
    with pytest.raises(ValueError, match=message) as error:
        load_wan_digits(weights_copy)
    assert str(weights_copy) in str(error.value)


def test_invalid_json_is_a_clear_error(weights_copy):
    (weights_copy / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: not valid JSON"):
        load_wan_digits(weights_copy)


def test_foreign_or_non_finite_tensors_are_rejected(weights_copy):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights_copy / WEIGHTS_NAME))
    tensors["class_embeddings.weight"][0, 0, 0] = float("nan")
    save_file(tensors, str(weights_copy / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_wan_digits(weights_copy)
    tensors["class_embeddings.weight"][0, 0, 0] = 0.0
    tensors["unet.conv_in.weight"] = torch.zeros(1)
    save_file(tensors, str(weights_copy / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="unexpected tensors"):
        load_wan_digits(weights_copy)


# --- training -------------------------------------------------------------------------------------


def test_short_training_lowers_the_loss():
    settings = TrainingSettings(steps=60, batch_size=32, learning_rate=3e-3, warmup_steps=5)
    result = train_wan_digits(settings, seed=0, transformer_config=TINY_TRANSFORMER)
    assert len(result.losses) == 60 and all(np.isfinite(result.losses))
    assert np.mean(result.losses[-20:]) < 0.8 * np.mean(result.losses[:10])


def test_training_is_reproducible():
    settings = TrainingSettings(steps=2, batch_size=8)
    first = train_wan_digits(settings, seed=3, transformer_config=TINY_TRANSFORMER)
    second = train_wan_digits(settings, seed=3, transformer_config=TINY_TRANSFORMER)
    other = train_wan_digits(settings, seed=4, transformer_config=TINY_TRANSFORMER)
    for a, b in zip(first.transformer.state_dict().values(), second.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert first.losses == second.losses != other.losses


def test_train_bundled_writes_loadable_weights(tmp_path):
    out = train_bundled(tmp_path / "w", steps=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    reloaded = load_wan_digits(out)
    assert reloaded.config["training"]["settings"]["steps"] == 1
    assert reloaded.sample([5], num_inference_steps=2).shape == (1, 8, 8)


def test_training_reports_progress_through_the_callers_bar(capsys):
    import functools

    from stepcache.tools.common import progress_bar

    train_wan_digits(TrainingSettings(steps=2), progress=functools.partial(progress_bar, enabled=True))
    err = capsys.readouterr().err  # not a terminal: the shared helper's lines
    assert "train wan-digits: 1/2 steps, " in err and "train wan-digits: 2/2 steps, " in err and "done" in err


def test_training_settings_are_validated():
    with pytest.raises(ValueError, match="label_dropout"):
        TrainingSettings(label_dropout=1.0)
    with pytest.raises(ValueError, match="steps"):
        TrainingSettings(steps=0)
