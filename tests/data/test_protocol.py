"""The ready experiments (conf/experiment/): every one composes, every compressing sweep has its equal-epochs
control, and the BARS/FuxiCTR standard protocol on Criteo_x1, Avazu_x1, Frappe_x1 and MovielensLatest_x1 holds
the published settings."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from umec_lightning.data import build_cache, load_meta
from umec_lightning.stages import parse_stages

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _swept_modes(cfg) -> list[str]:
    """The modes an experiment's sweep runs: its `mode` values, else the modes its arms compose into."""
    params = cfg.hydra.sweeper.params
    if "mode" in params:
        return str(params.mode).split(",")
    experiment = cfg.hydra.runtime.choices.experiment
    return [_compose([f"experiment={experiment}", f"+arm={arm}"]).mode.name for arm in str(params["+arm"]).split(",")]


@cache
def _compresses(mode: str) -> bool:
    """Whether a mode compresses: one of its stages (as the run parses them) has a method."""
    return any(stage.method is not None for stage in parse_stages(_compose([f"mode={mode}"])))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_a_compressing_sweep_has_its_equal_epochs_control(experiment):
    cfg = _compose([f"experiment={experiment}"])
    modes = _swept_modes(cfg)
    assert modes and all((CONF / "mode" / f"{m}.yaml").exists() for m in modes), modes
    if any(_compresses(mode) for mode in modes):
        assert cfg.reference.dir, f"experiment={experiment} compresses but sets no reference.dir"


# (experiment, data config, its directory variable, published dense DLRM test AUC in the file's comment,
#  the model numbers of the BARS DLRM log, embedding L2)
PROTOCOL = [
    ("criteo_x1", "criteo_x1", "CRITEO_X1_DIR", "0.8138",
     dict(bottom=[400, 400, 400, 10], top=[400, 400, 400, 1], interaction="dot", dropout={"top": 0.2}), 1e-5),
    ("avazu_x1", "avazu_x1", "AVAZU_X1_DIR", "0.7639",
     dict(bottom=None, top=[400, 400, 400, 1], interaction="dot", dropout=0.3), 0.01),
    ("frappe_x1", "frappe_x1", "FRAPPE_DIR", "0.9840",
     dict(bottom=None, top=[400, 400, 400, 1], interaction="cat", dropout=0.4), 0.1),
    ("movielenslatest_x1", "movielens", "MOVIELENS_DIR", "0.9691",
     dict(bottom=None, top=[400, 400, 400, 1], interaction="cat", dropout=0.2), 0.01),
]


@pytest.mark.parametrize("experiment, data, env, reference_auc, model, embedding_l2", PROTOCOL,
                         ids=[p[0] for p in PROTOCOL])
def test_the_standard_protocol(monkeypatch, experiment, data, env, reference_auc, model, embedding_l2):
    monkeypatch.setenv(env, "/d/bars")
    cfg = _compose([f"experiment={experiment}"])
    assert cfg.hydra.runtime.choices.data == data
    assert dict(cfg.data.path) == {"train": "/d/bars/train.csv", "val": "/d/bars/valid.csv", "test": "/d/bars/test.csv"}
    # FuxiCTR's conventions (conf/recipe/bars.yaml)
    assert cfg.model.embedding_dim == 10 and cfg.data.min_frequency == 1
    assert cfg.optim._target_ == "torch.optim.Adam" and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.loader.batch_size == 4096
    assert cfg.phases.early_stopping.patience == 2 and cfg.eval.monitor == "auc" and cfg.eval.val_check_interval == 1
    assert cfg.phases.pretrain_epochs == 100  # a maximum: early stopping ends it
    assert cfg.mode.name == "dense"  # one run is the dense DLRM of the leaderboard
    # the data set's BARS DLRM log
    for key, value in model.items():
        got = cfg.model[key]
        assert (dict(got) if isinstance(value, dict) else list(got) if isinstance(value, list) else got) == value, key
    assert cfg.regularization.embedding_l2 == pytest.approx(embedding_l2)
    # 5 seeds, each compressed member against its equal-epochs dense control
    params = cfg.hydra.sweeper.params
    assert params.seed == "0,1,2,3,4" and "dense_control" in params.mode and cfg.reference.dir
    assert f"test AUC {reference_auc}" in (CONF / "experiment" / f"{experiment}.yaml").read_text()


def test_criteo_x1_reads_numbers_as_released(tmp_path, monkeypatch):
    header = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    rows = [[str(i % 2), *(["0.05", "", "3"] * 5)[:13], *(f"{i % 3:08x}" for _ in range(26))] for i in range(12)]
    for name in ("train", "valid", "test"):
        (tmp_path / f"{name}.csv").write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    monkeypatch.setenv("CRITEO_X1_DIR", str(tmp_path))
    cfg = _compose(["data=criteo_x1", f"loader.cache_root={tmp_path / 'cache'}"])
    cache = build_cache(instantiate(cfg.data, progress=False), cfg.loader.cache_root)
    meta = load_meta(cache)
    assert meta.name == "criteo_x1" and len(meta.dense_names) == 13 and len(meta.sparse_names) == 26
    assert meta.rows == {"train": 12, "val": 12, "test": 12} and meta.table_sizes == [4] * 26
    dense = np.load(cache / "train_dense.npy")
    assert dense[0, :3].tolist() == pytest.approx([0.05, 0.0, 3.0])  # as released (no log1p), empty -> 0


def test_docs_and_experiments_show_the_form_that_works():
    """`+experiment=x` fails (`experiment: null` is in the defaults list); `experiment=x` is the form to show."""
    files = [*(CONF / "experiment").glob("*.yaml"), *(ROOT / "docs").glob("*.md")]
    assert files
    assert not [str(f) for f in files if "+experiment" in f.read_text()]
