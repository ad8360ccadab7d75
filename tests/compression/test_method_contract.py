"""The contract every method keeps, checked for all of them alike: one compress stage on a tiny model ends
in a `Kept` that extracts to a model `load_compressed` rebuilds with identical outputs, and a second run
under the same seed decides the same structure and the same weights."""

import pytest
import torch

from umec_lightning import load_compressed, save_compressed
from umec_lightning.compression.extract import extract
from umec_lightning.compression.group_lasso import GroupLasso
from umec_lightning.compression.handcrafted import Handcrafted
from umec_lightning.compression.magnitude import Magnitude
from umec_lightning.compression.mixed_dim import MixedDim
from umec_lightning.compression.taylor import Taylor
from umec_lightning.compression.umec import UMECMethod
from umec_lightning.latency import random_inputs

from .test_baselines import compress

METHODS = {
    "umec": (lambda: UMECMethod(["feature", "dim", "neuron"], admm={"normalize_norms": True}), {"flops": 0.5}),
    "magnitude": (lambda: Magnitude(), {"flops": 0.5}),
    "taylor": (lambda: Taylor(rounds=2, steps_per_round=5), {"flops": 0.5}),
    "group_lasso": (lambda: GroupLasso(lam=0.05, threshold=0.05), {}),
    "handcrafted": (lambda: Handcrafted(), {"flops": 0.5}),
    "mixed_dim": (lambda: MixedDim(), {"params": 0.6}),
}


@pytest.mark.parametrize("interaction", ["dot", "cat"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_extracts_reloads_identically_and_is_deterministic(tmp_path, name, interaction):
    make, budgets = METHODS[name]
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        _, model, outcome = compress(make(), interaction, budgets, steps=12)
        runs.append((extract(model, outcome.kept), outcome.kept))
    (slim, kept), (again, kept_again) = runs
    assert kept == kept_again
    for a, b in zip(slim.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    path = save_compressed(tmp_path / "m.pt", slim, kept)
    reloaded = load_compressed(path)
    dense, sparse = random_inputs(slim, 64, seed=3)
    slim.eval()
    torch.testing.assert_close(reloaded(dense, sparse), slim(dense, sparse), rtol=0, atol=0)
