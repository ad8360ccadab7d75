import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryAUROC

from tests.data.common import SMALL_ROWS
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
