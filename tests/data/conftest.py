from pathlib import Path

import pytest

from tests.data.common import SAMPLE, SMALL_ROWS
from umec_lightning.data import SyntheticCriteo


@pytest.fixture(scope="session")
def sample_path() -> Path:
    if not SAMPLE.exists():
        pytest.skip(f"shared Criteo sample not found at {SAMPLE}")
    return SAMPLE


@pytest.fixture(scope="session")
def small_synthetic() -> SyntheticCriteo:
    return SyntheticCriteo(name="synth_small", rows=SMALL_ROWS, seed=0)


@pytest.fixture(scope="session")
def synthetic_cache(small_synthetic, tmp_path_factory):
    from umec_lightning.data import build_cache

    return build_cache(small_synthetic, tmp_path_factory.mktemp("cache"))
