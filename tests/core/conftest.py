from __future__ import annotations

import pytest

from stepcache import StepCacheConfig


@pytest.fixture
def default_config() -> StepCacheConfig:
    return StepCacheConfig()
