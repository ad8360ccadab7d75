import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryAUROC

from tests.data.common import SMALL_CARDS, SMALL_ROWS
from umec_lightning.data import DataError, SyntheticCriteo, exact_auc, load_meta


def test_exact_auc_small_cases():
    assert exact_auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert exact_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert exact_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75


def test_meta_and_oracle(synthetic_cache, small_synthetic):
    meta = load_meta(synthetic_cache)
    assert meta.rows == {"train": 20_000, "val": 5_000, "test": 5_000}
    assert len(meta.noise_features) == 6 and len(meta.informative_features) == 20
    assert set(meta.noise_features) | set(meta.informative_features) == set(meta.sparse_names)
    assert meta.table_sizes == small_synthetic.cardinalities
    for split in ("val", "test"):
        assert 0.74 < meta.oracle_auc[split] < 0.86
        prob = np.load(synthetic_cache / f"{split}_prob.npy")
        label = np.load(synthetic_cache / f"{split}_label.npy")
        assert meta.oracle_auc[split] == pytest.approx(exact_auc(prob, label), abs=1e-12)
        tm = BinaryAUROC(thresholds=None)(torch.from_numpy(prob), torch.from_numpy(label).long())
        assert meta.oracle_auc[split] == pytest.approx(float(tm), abs=1e-5)
        assert 0.22 < meta.label_rate[split] < 0.28


def test_arrays(synthetic_cache, small_synthetic):
    dense = np.load(synthetic_cache / "train_dense.npy", mmap_mode="r")
    sparse = np.load(synthetic_cache / "train_sparse.npy", mmap_mode="r")
    assert dense.dtype == np.float32 and dense.shape == (20_000, 13) and dense.min() >= 0
    assert (dense == 0).mean() > 0.05  # missing / zero counts
    assert sparse.dtype == np.int32 and (sparse.max(0) < np.array(small_synthetic.cardinalities)).all()
    # Zipf: the most frequent id of a large table covers a sizeable share, most ids are rare
    col = sparse[:, 2]
    counts = np.bincount(col)
    assert counts.max() > 0.05 * len(col)


def test_deterministic(small_synthetic):
    a = small_synthetic.sample(3000, "val")
    b = SyntheticCriteo(name="x", rows=SMALL_ROWS, seed=0).sample(3000, "val")
    c = SyntheticCriteo(rows=SMALL_ROWS, seed=1).sample(3000, "val")
    assert len(small_synthetic.sample(100, "val")["label"]) == 100
    np.testing.assert_array_equal(small_synthetic.sample(100, "val")["sparse"], a["sparse"][:100])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["sparse"], c["sparse"])


def test_noise_features_carry_no_signal(small_synthetic):
    s = small_synthetic
    for f in s.noise_idx:
        assert not s._effects[f].any()
        assert all(f not in pair for pair in s.pairs)


def test_config_errors():
    with pytest.raises(DataError, match="cardinalities"):
        SyntheticCriteo(num_sparse=4, cardinalities=[3, 4])
    with pytest.raises(DataError, match="num_noise"):
        SyntheticCriteo(num_sparse=4, cardinalities=[3, 4, 5, 6], num_noise=9)
    with pytest.raises(DataError, match="rows"):
        SyntheticCriteo(rows={"dev": 5})


# --- graded importance, rank-R and relu interactions (the synthetic_capacity preset) ------------------------------

def _digest(d: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in ("label", "prob", "dense", "sparse", "dense_raw", "dense_missing"):
        h.update(np.ascontiguousarray(d[k]).tobytes())
    return h.hexdigest()


def test_defaults_leave_the_original_generator_unchanged(small_synthetic):
    # sha256 of the generator's output computed with the code before the capacity options existed
    assert _digest(small_synthetic.sample(2000, "val")) == (
        "03ddb827f2dfcb4189fd9ef823491c6d2a53636e64276043cd35ba05f1350764")
    small = SyntheticCriteo(rows=SMALL_ROWS, cardinalities=SMALL_CARDS, num_interactions=6, seed=0)
    assert _digest(small.sample(2000, "val")) == "02a0c10f5ba242fa9a1715144fa9bf85d6bcc8af86d20344cbcf4ed932cbf654"


CAPACITY = dict(rows=SMALL_ROWS, cardinalities=SMALL_CARDS, num_noise=4, num_interactions=5, importance_decay=0.3,
                interaction_decay=0.3, interaction_rank=5, interaction_hidden=6, rare_shrink=50.0)


@pytest.fixture(scope="module")
def capacity_synthetic() -> SyntheticCriteo:
    return SyntheticCriteo(**CAPACITY, seed=0)


def test_importance_is_graded_and_zero_for_noise(capacity_synthetic, small_synthetic):
    s = capacity_synthetic
    imp = s.importance
    assert set(imp) == set(s.sparse_names)
    assert all(imp[s.sparse_names[f]] == 0.0 for f in s.noise_idx)
    informative = [imp[s.sparse_names[f]] for f in s.informative_idx]
    assert min(informative) > 0 and max(informative) > 5 * min(informative)
    # main-effect scales decay geometrically over a random order: largest / smallest = exp(0.3 * (20 - 1))
    scales = sorted(s._effects[f].std() for f in s.informative_idx)
    assert scales[-1] > 20 * scales[0]
    # pair strengths are graded too (the default: all equal to interaction_scale)
    assert len(set(s._pair_scale.values())) == len(s.pairs) > 1
    assert set(small_synthetic._pair_scale.values()) == {small_synthetic.interaction_scale}


def test_rank_and_relu_terms_change_the_logit(capacity_synthetic):
    s = capacity_synthetic
    for a, b in s.pairs:
        ua, vb = s._factors[(a, b)]
        assert ua.shape == (s.cardinalities[a], 5) and vb.shape == (s.cardinalities[b], 5)
    assert set(s._hidden) == set(s.pairs) and s._hidden[s.pairs[0]][3].shape == (6,)
    linear = SyntheticCriteo(**{**CAPACITY, "interaction_hidden": 0}, seed=0)
    low_rank = SyntheticCriteo(**{**CAPACITY, "interaction_rank": 1}, seed=0)
    g = s._generate(4000, [0, 7])
    # same planted main effects (drawn before the new options' draws), different logits
    for f in s.informative_idx:
        np.testing.assert_array_equal(linear._effects[f], s._effects[f])
    pair = s.pairs[0]
    relu = s._pair_terms(g["sparse"], pair) - linear._pair_terms(g["sparse"], pair)
    assert relu.std() > 0.05
    assert not np.allclose(low_rank._pair_terms(g["sparse"], pair), linear._pair_terms(g["sparse"], pair))
    assert not np.allclose(s._logit(g) - s._bias, linear._logit(g) - linear._bias)


def test_capacity_options_respect_cardinalities_and_are_deterministic(capacity_synthetic):
    a = capacity_synthetic.sample(3000, "val")
    assert (a["sparse"].max(0) < np.array(SMALL_CARDS)).all() and a["sparse"].min() >= 0
    b = SyntheticCriteo(**CAPACITY, seed=0).sample(3000, "val")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = SyntheticCriteo(**CAPACITY, seed=1)
    assert not np.array_equal(a["prob"], c.sample(3000, "val")["prob"])
    assert capacity_synthetic.fingerprint() != SyntheticCriteo(**{**CAPACITY, "interaction_rank": 4}).fingerprint()


def test_feature_importance_in_meta(synthetic_cache, small_synthetic):
    from umec_lightning.data.core import CacheMeta

    meta = load_meta(synthetic_cache)
    assert meta.feature_importance == pytest.approx(small_synthetic.importance)
    assert all(meta.feature_importance[f] == 0.0 for f in meta.noise_features)
    assert all(meta.feature_importance[f] > 0.0 for f in meta.informative_features)
    # a meta.json written before the field existed still loads
    old = {k: v for k, v in vars(meta).items() if k != "feature_importance"}
    assert CacheMeta.from_dict(old).feature_importance is None


@pytest.mark.parametrize(
    "key, value",
    [("interaction_rank", 0), ("interaction_rank", -2), ("interaction_rank", 2.5), ("interaction_hidden", -1),
     ("importance_decay", -0.1), ("interaction_decay", float("nan")), ("interaction_hidden_scale", -1.0)],
)
def test_capacity_option_errors(key, value):
    with pytest.raises(DataError, match=key):
        SyntheticCriteo(num_sparse=4, cardinalities=[3, 4, 5, 6], num_noise=1, **{key: value})


def test_capacity_preset_config():
    from pathlib import Path

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/data/synthetic_capacity.yaml")
    cards = list(cfg.cardinalities)
    assert len(cards) == cfg.num_sparse and max(cards) >= 10_000 and sorted(cards)[len(cards) // 2] <= 200
    assert cfg.interaction_rank > 2 and cfg.interaction_hidden > 0 and cfg.importance_decay > 0
