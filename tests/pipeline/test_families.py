"""Every model family (`models.family`; one per `family:` among conf/model/*.yaml, picked up without a list) trains
through the real pipeline; a family without compression refuses a compression mode before any work."""

from __future__ import annotations

import pytest
import yaml

from umec_lightning import load_compressed
from umec_lightning.config import ConfigError
from umec_lightning.models import measure
from umec_lightning.models.family import family_of
from umec_lightning.run import build_datamodule, check_config, dense_structure_for, run

from .conftest import CONF, compose_cfg, read_summary


def _one_config_per_family() -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted((CONF / "model").glob("*.yaml")):
        family = (yaml.safe_load(path.read_text()) or {}).get("family", "dlrm")
        out.setdefault(family, path.stem)
    return out


FAMILIES = _one_config_per_family()
# The default learning rate (conftest's SMALL takes MLPerf's 1.0, too large a step for a cross network).
SMALL_DATA = ["data.rows.val=2000", "data.rows.test=2000", "phases.pretrain_epochs=1",
              "optim.lr=0.1"]


def test_the_families_are_found_from_the_model_configs():
    assert {"dlrm", "dcnv2"} <= set(FAMILIES)


@pytest.mark.parametrize("family", [pytest.param(f, marks=[pytest.mark.slow] if f == "dlrm" else [])
                                    for f in sorted(FAMILIES)])  # DLRM's dense run: most of tests/pipeline/
def test_every_family_trains_dense_and_reports_the_cost_of_its_own_modules(tmp_path, cache_dir, family):
    cfg = compose_cfg([f"model={FAMILIES[family]}", "mode=dense", *SMALL_DATA], cache_dir)
    summary = run(cfg, tmp_path)
    assert summary["test_auc"] > 0.55  # the planted model is learnable: a family that learns nothing fails here
    datamodule = build_datamodule(cfg)
    datamodule.ensure_ready()
    structure = dense_structure_for(cfg.model, datamodule.meta)
    model = family_of(cfg.model).build(structure)
    assert type(model).__name__.lower() == family
    assert read_summary(tmp_path)["dense_flops"] == measure(model).flops


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if "factorise" not in family_of({"family": f}).offers))
def test_a_method_needing_what_a_family_lacks_is_refused_before_work(tmp_path, cache_dir, family):
    cfg = compose_cfg([f"model={FAMILIES[family]}", "mode=lowrank_feature", "budget.flops=0.5"], cache_dir)
    with pytest.raises(ConfigError, match=f"family {family}\\) does not offer yet: factorise"):
        check_config(cfg)


@pytest.mark.parametrize("override, key", [("model.stacking=zigzag", "model.stacking"),
                                           ("model.cross_layers=-1", "model.cross_layers"),
                                           ("model.family=nope", "model.family")])
def test_a_bad_dcnv2_config_is_one_line_naming_the_key(cache_dir, override, key):
    with pytest.raises(ConfigError, match=f"config key `{key}`") as err:
        check_config(compose_cfg(["model=dcnv2", "mode=dense", override], cache_dir))
    assert "\n" not in str(err.value)


# DLRM's compression through the run is what most of tests/pipeline/ checks.
@pytest.mark.parametrize("family", [pytest.param(f, marks=[] if f == "dcnv2" else [pytest.mark.slow])
                                    for f in sorted(FAMILIES) if "groups" in family_of({"family": f}).offers
                                    and f != "dlrm"])  # one family by default; the grid checks joint on every one
def test_every_family_compresses_jointly_to_its_budget_through_the_run(tmp_path, cache_dir, family):
    """UMEC joint on every family that offers groups: the budget met on the extracted model, which compressed.pt
    holds as that family's model, smaller in FLOPs, params and bytes."""
    cfg = compose_cfg([f"model={FAMILIES[family]}", "mode=joint", "budget.flops=0.5", *SMALL_DATA,
                       "phases.compress_epochs=1", "phases.finetune_epochs=1"], cache_dir)
    summary = run(cfg, tmp_path)
    assert summary["budget_met"] and summary["flops_ratio"] <= 0.5
    assert summary["params"] < summary["dense_params"] and summary["bytes"] < summary["dense_bytes"]
    model = load_compressed(tmp_path / "compressed.pt")
    assert type(model).__name__.lower() == family and measure(model).flops == summary["flops"]
