"""The contract every method keeps, checked for all of them alike: one compress stage on a tiny model ends
in a `Kept` that extracts to a model `load_compressed` rebuilds with identical outputs, and a second run
under the same seed decides the same structure and the same weights.

The methods are the ones the modes name (every stage with a method of every `conf/mode/*.yaml`, as the run
composes it), so a new mode or method file is covered without editing this test."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from umec_lightning import load_compressed, save_compressed
from umec_lightning.compression.method import finish_and_extract
from umec_lightning.data import Batch
from umec_lightning.latency import random_inputs
from umec_lightning.stages import parse_stages

from .conftest import tiny
from .test_baselines import batch, meta, train

CONF = Path(__file__).resolve().parents[2] / "conf"
STEPS = 12
# The budgets a method is tried under, in order: the first its own `check` accepts on the tiny model is used.
BUDGETS = ({"flops": 0.5}, {"params": 0.6})
# A tiny model and 12 steps: fewer calibration batches and shorter Taylor rounds keep it fast, a stronger group
# lasso makes it remove groups within 12 steps. Applied to whichever method has the key.
SHRINK = {"calibration_batches": 4, "steps_per_round": 5, "lam": 0.05, "threshold": 0.05}


def _mode_methods() -> dict[str, dict]:
    """{"<mode>.<stage>": the method config of that stage}, over every mode's stages that name a method; stages
    with the same method config are one entry ("joint.compress+joint_lowrank.prune")."""
    found: dict[str, tuple[list[str], dict]] = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for path in sorted((CONF / "mode").glob("*.yaml")):
            for stage in parse_stages(compose("config", overrides=[f"mode={path.stem}"])):
                if stage.method is not None:
                    node = OmegaConf.to_container(stage.method, resolve=True)
                    node |= {k: v for k, v in SHRINK.items() if k in node}
                    names, _ = found.setdefault(json.dumps(node, sort_keys=True), ([], node))
                    names.append(f"{path.stem}.{stage.name}")
    return {"+".join(names): node for names, node in found.values()}


METHODS = _mode_methods()


def test_the_contract_covers_every_mode_that_names_a_method():
    """Read apart from the discovery above (each mode file as written): no mode that names a method is missed."""
    covered = {name.split(".")[0] for names in METHODS for name in names.split("+")}
    naming = {p.stem for p in (CONF / "mode").glob("*.yaml") if OmegaConf.load(p).get("method") is not None}
    assert naming and naming <= covered, naming - covered


def _budget(node: dict, interaction: str) -> dict:
    """The first of BUDGETS this method's own check accepts ({} for a method that targets none); skips the
    test when it serves none of them on the tiny model."""
    method = instantiate(node)
    if not method.targets_budget:
        return {}
    reasons = []
    for budgets in BUDGETS:
        try:
            instantiate(node).check(meta(tiny(interaction)), budgets)
            return budgets
        except ValueError as err:
            reasons.append(f"{budgets}: {err}")
    pytest.skip(f"serves none of the test budgets on the tiny model: {'; '.join(reasons)}")


def _compress(node: dict, interaction: str, budgets: dict):
    """A compress stage's life cycle as the LightningModule and the extraction callback drive it: check,
    setup, begin, the training hooks, then calibration + finish + surgery (`finish_and_extract`)."""
    torch.manual_seed(0)
    method = instantiate(node)
    model = tiny(interaction, seed=0)
    train(model, steps=20)
    method.check(meta(model), budgets)
    method.setup(model, budgets)
    method.to("cpu")
    method.begin(STEPS)
    if hasattr(method, "set_holdout"):
        method.set_holdout(lambda: [batch(model, 500 + k) for k in range(3)])
    train(model, method, steps=STEPS)
    calibration = [Batch(*batch(model, 700 + k)) for k in range(8)]
    return finish_and_extract(method, model, calibration=calibration)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_extracts_reloads_identically_and_is_deterministic(tmp_path, name, interaction):
    node = METHODS[name]
    budgets = _budget(node, interaction)
    first, again = (_compress(node, interaction, budgets) for _ in range(2))
    assert first.kept == again.kept
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    slim = first.model
    path = save_compressed(tmp_path / "m.pt", slim, first.kept)
    reloaded = load_compressed(path)
    dense, sparse = random_inputs(slim, 64, seed=3)
    slim.eval()
    torch.testing.assert_close(reloaded(dense, sparse), slim(dense, sparse), rtol=0, atol=0)
