"""Every group method on every model family that offers what it needs: one compress stage on a small model of the
family (its shipped config, the first `conf/model/*.yaml` naming it, over 3 tiny tables) meets the budget on the
reloaded `compressed.pt`, which `load_compressed` rebuilds without a config, and whose TorchScript and ONNX exports
equal it. Families and methods are discovered from conf/ (`test_method_contract` discovers the methods), so a new
family or mode is covered without editing a list. DLRM's methods are covered at length elsewhere; here it runs the
same grid as the others, in the slow set."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from umec_lightning import load_compressed, save_compressed
from umec_lightning.compression.export import export_onnx, export_torchscript
from umec_lightning.compression.method import finish_and_extract
from umec_lightning.data import Batch
from umec_lightning.latency import random_inputs
from umec_lightning.models import measure
from umec_lightning.models.family import family_of

from .test_baselines import batch, meta, train
from .test_method_contract import METHODS, STEPS

CONF = Path(__file__).resolve().parents[2] / "conf"
SIZES = (10, 20, 30)
DATA = SimpleNamespace(sparse_names=[f"C{i + 1}" for i in range(len(SIZES))], table_sizes=list(SIZES),
                       dense_names=["I1", "I2", "I3"])


def _family_configs() -> dict[str, OmegaConf]:
    out = {}
    for path in sorted((CONF / "model").glob("*.yaml")):
        node = OmegaConf.load(path)
        out.setdefault(str(node.get("family", "dlrm")), node)
    return out


FAMILIES = _family_configs()
QUICK_MODES = {"joint", "magnitude"}


def _model(family: str, seed: int = 0):
    cfg = FAMILIES[family]
    fam = family_of(cfg)
    return fam.build(fam.dense_structure(cfg, DATA), seed=seed)


def _cases():
    for family in sorted(FAMILIES):
        fam = family_of(FAMILIES[family])
        for name, node in sorted(METHODS.items()):
            method = instantiate(node)
            if method.needs <= fam.offers and set(method.kinds) <= fam.kinds:
                # DLRM's methods are checked at length by test_method_contract and test_export: its grid is slow;
                # another family's default run keeps UMEC joint and magnitude (make test-slow runs the whole grid).
                quick = family != "dlrm" and name.split(".")[0] in QUICK_MODES
                marks = [] if quick else [pytest.mark.slow]
                yield pytest.param(family, name, id=f"{family}-{name}", marks=marks)


@pytest.mark.parametrize("family, name", list(_cases()))
def test_every_method_compresses_every_family_to_its_budget_and_exports(tmp_path, family, name):
    node = METHODS[name]
    torch.manual_seed(0)
    model = _model(family)
    train(model, steps=20)
    dense_cost = measure(model)
    method = instantiate(node)
    budgets = {}
    if method.targets_budget:
        for candidate in ({"flops": 0.5}, {"params": 0.6}):
            try:
                instantiate(node).check(meta(model), candidate)
                budgets = candidate
                break
            except ValueError:
                continue
        else:
            pytest.skip("serves none of the test budgets on this model")
    method.check(meta(model), budgets)
    method.setup(model, budgets)
    method.to("cpu")
    method.begin(STEPS)
    method.set_holdout(lambda: [batch(model, 500 + k) for k in range(3)])
    train(model, method, steps=STEPS)
    result = finish_and_extract(method, model, calibration=[Batch(*batch(model, 700 + k)) for k in range(8)])
    path = save_compressed(tmp_path / "m.pt", result.model, result.kept)
    reloaded = load_compressed(path).eval()
    assert type(reloaded) is type(model)
    cost = measure(reloaded)
    ratios = {"flops": cost.flops / dense_cost.flops, "params": cost.params / dense_cost.params}
    for key, budget in budgets.items():
        assert ratios[key] <= budget + 1e-9, (key, ratios[key], budget)
    dense, sparse = random_inputs(reloaded, 64, seed=3)
    result.model.eval()
    torch.testing.assert_close(reloaded(dense, sparse), result.model(dense, sparse), rtol=0, atol=0)
    export_torchscript(reloaded, tmp_path / "m.ts")  # each checks its file against the eager model first
    export_onnx(reloaded, tmp_path / "m.onnx")
