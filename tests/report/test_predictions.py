"""Per-row test predictions files (umec_lightning/predictions.py): what the report's paired tests read."""

from __future__ import annotations

import numpy as np
import pytest

from umec_lightning.predictions import batches_evaluated, read_predictions, write_predictions


def test_a_file_round_trips_and_its_rows_key_says_which_rows(tmp_path):
    labels = np.array([0, 1, 1, 0, 1], dtype=np.uint8)
    probs = np.array([0.1, 0.8, 0.6, 0.3, 0.9], dtype=np.float32)
    path = write_predictions(tmp_path / "a.npz", labels, probs, "fp")
    got = read_predictions(path)
    np.testing.assert_array_equal(got.label, labels)
    np.testing.assert_array_equal(got.prob, probs)
    assert (got.fingerprint, got.split, got.path) == ("fp", "test", path)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
    same = read_predictions(write_predictions(tmp_path / "b.npz", labels, probs[::-1].copy(), "fp"))
    assert same.rows_key == got.rows_key  # other scores, the same rows
    for other in (write_predictions(tmp_path / "c.npz", labels[::-1].copy(), probs, "fp"),  # other labels
                  write_predictions(tmp_path / "d.npz", labels, probs, "fp2"),  # another data cache
                  write_predictions(tmp_path / "e.npz", labels[:4], probs[:4], "fp")):  # fewer rows
        assert read_predictions(other).rows_key != got.rows_key
    with pytest.raises(ValueError, match="one label and one probability per row"):
        write_predictions(tmp_path / "f.npz", labels, probs[:3], "fp")
    (tmp_path / "g.npz").write_bytes(b"not a file of ours")
    with pytest.raises(ValueError, match=r"g\.npz: not a test-predictions file"):
        read_predictions(tmp_path / "g.npz")


def test_the_batches_a_trainer_limit_evaluates():
    assert batches_evaluated(10, None) == 10 and batches_evaluated(10, 1.0) == 10
    assert batches_evaluated(10, 3) == 3 and batches_evaluated(2, 5) == 2
    assert batches_evaluated(10, 0.25) == 2  # Lightning: int(fraction · batches)
