"""The trainer choices (`conf/trainer/*.yaml`, found by listing the folder) share one base, `_base.yaml`."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from .conftest import CONF

TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_inherits_the_base_and_sets_how_it_runs(trainer):
    base = OmegaConf.load(CONF / "trainer" / "_base.yaml")
    own = OmegaConf.load(CONF / "trainer" / f"{trainer}.yaml")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        node = compose("config", overrides=[f"trainer={trainer}"]).trainer
    assert not OmegaConf.missing_keys(node), f"trainer={trainer} leaves {OmegaConf.missing_keys(node)} unset"
    for key in base:  # the base's value, unless the trainer's own file sets the key
        expected = own[key] if key in own else base[key]
        assert node[key] == expected, (trainer, key)
    assert set(own) - {"defaults"} - set(base) <= set(node)  # and its own keys besides
