from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from umec_lightning.data import CriteoTSV, SyntheticCriteo, TabularCSV, build_cache, load_meta

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"


def _load(name):
    return OmegaConf.load(CONF / f"{name}.yaml")


def test_synthetic_config():
    src = instantiate(_load("synthetic"))
    assert isinstance(src, SyntheticCriteo) and src.num_noise == 6 and src.rows["train"] >= 500_000


def test_criteo_sample_config(sample_path, tmp_path, monkeypatch):
    monkeypatch.delenv("UMEC_SHARED", raising=False)
    monkeypatch.chdir(tmp_path)  # the relative default resolves against the project root
    src = instantiate(_load("criteo_sample"), progress=False)
    assert isinstance(src, CriteoTSV) and src.path.resolve() == sample_path
    assert load_meta(build_cache(src, tmp_path)).rows["train"] == 8572


@pytest.mark.parametrize(
    "name, cls",
    [("criteo_kaggle", CriteoTSV), ("criteo_terabyte", CriteoTSV), ("tabular_example", TabularCSV)],
)
def test_other_configs_instantiate(name, cls):
    assert isinstance(instantiate(_load(name)), cls)  # files need not exist until the cache is built
