from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stepcache.models.dreamzero.model import CausalWorldActionDiT
from stepcache.models.dreamzero.training import torch_threads
from tests.models.dreamzero.tiny import make_tiny_model, save_tiny_model


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # The tensors here are tiny: a second intra-op thread only adds synchronisation, which on a
    # loaded 2-core machine costs far more than it saves.
    with torch_threads(1):
        yield


@pytest.fixture
def tiny_model() -> CausalWorldActionDiT:
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "dreamzero-tiny")
