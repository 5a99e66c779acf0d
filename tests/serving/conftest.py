from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stepcache.models.dreamzero.training import torch_threads
from tests.models.dreamzero.tiny import save_tiny_model


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):  # tiny tensors: a second intra-op thread only adds synchronisation
        yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("serving") / "tiny")
