"""The importance parts (compression/importance.py) against direct computations on a tiny DLRM, and UMEC
configured by a part's short name or by its `_target_` deciding the same."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from umec_lightning.compression.admm import UMEC, ADMMConfig
from umec_lightning.compression.groups import PackedGroups, build_group_sets
from umec_lightning.compression.importance import (
    GRADIENTS,
    HOLDOUT,
    Holdout,
    Importance,
    Norm,
    Taylor,
    global_batch_scores,
    resolve,
)
from umec_lightning.compression.umec import UMECMethod

from .conftest import tiny
from .test_baselines import batch, train

KINDS = {"feature", "neuron", "dim"}
PART = "umec_lightning.compression.importance."


def _cat_model():
    """A tiny `cat` DLRM, briefly trained (so no group is at its initial values only)."""
    model = tiny("cat")
    train(model, steps=5)
    return model


def _direct(model, per_weight) -> dict[str, torch.Tensor]:
    """{set name: (G,)} of Σ_{w in g} per_weight(param name) over each group of the `cat` model, written out:
    a neuron is its row and bias, a feature (dense block first, then C1..C3) and a table's dim are columns of
    the top MLP's first layer (`embedding_dim` 4)."""
    out = {}
    for name in ("dense.layers.0", "dense.layers.1", "over.layers.0"):
        out[f"neurons:{name}"] = per_weight(f"{name}.weight").sum(1) + per_weight(f"{name}.bias")
    columns = per_weight("over.layers.0.weight").sum(0)  # (16,): dense block, C1, C2, C3, 4 columns each
    out["features"] = columns.view(4, 4).sum(1)
    for k, table in enumerate(("C1", "C2", "C3")):
        out[f"dims:{table}"] = columns[4 * (k + 1) : 4 * (k + 2)]
    return out


def _assert_grid(packed: PackedGroups, grid: torch.Tensor, expected: dict[str, torch.Tensor]) -> None:
    assert set(packed.names) == set(expected)
    for row, name in enumerate(packed.names):
        g = packed.sets[row].num_groups
        torch.testing.assert_close(grid[row, :g].double(), expected[name].double(), rtol=1e-5, atol=1e-9, msg=name)


def test_norm_is_the_squared_l2_norm_of_every_group():
    model = _cat_model()
    packed = PackedGroups(build_group_sets(model, KINDS))
    params = dict(model.named_parameters())
    part = Norm()
    assert part.feeds == () and not part.measured
    _assert_grid(packed, part.scores(packed), _direct(model, lambda n: params[n].detach().square()))
    assert torch.isinf(part.scores(packed)[~packed.valid]).all()  # padding


def test_taylor_sums_the_squared_grad_times_weight_per_group_over_steps():
    model = _cat_model()
    packed = PackedGroups(build_group_sets(model, KINDS))
    params = dict(model.named_parameters())
    part = Taylor()
    assert part.feeds == (GRADIENTS,) and part.scores(packed) is None
    expected = None
    for step in range(3):
        dense, sparse, labels = batch(model, 100 + step)
        model.zero_grad()
        F.binary_cross_entropy_with_logits(model(dense, sparse), labels).backward()
        part.observe(packed)
        sums = _direct(model, lambda n: (params[n].grad * params[n]).detach().double())
        step_scores = {k: v.square() for k, v in sums.items()}
        expected = step_scores if expected is None else {k: expected[k] + v for k, v in step_scores.items()}
    _assert_grid(packed, part.scores(packed), expected)
    part.reset()
    assert part.scores(packed) is None


def test_taylor_fed_rank_local_batches_squares_each_batch_sum():
    """Calibration (rank_local): the sums are kept per batch and squared at the end; one process: the same as
    squaring per step."""
    model = _cat_model()
    packed = PackedGroups(build_group_sets(model, KINDS))
    local, running, sums = Taylor(), Taylor(), []
    for step in range(3):
        dense, sparse, labels = batch(model, 200 + step)
        model.zero_grad()
        F.binary_cross_entropy_with_logits(model(dense, sparse), labels).backward()
        local.observe(packed, rank_local=True)
        running.observe(packed)
        sums.append(packed.taylor_sums())
    assert torch.equal(local.scores(packed), global_batch_scores(sums))
    torch.testing.assert_close(local.scores(packed), running.scores(packed), rtol=1e-12, atol=0)


def _held_out(model, n=3):
    return [batch(model, 500 + k, size=64) for k in range(n)]


def _mean_ablation_direct(model, batches) -> dict[str, float]:
    """The held-out BCE increase when an input's vector is held at its mean, computed on copies of the model:
    a table whose every row is the mean looked-up vector, a bottom MLP whose last layer outputs its mean."""
    model = copy.deepcopy(model).eval()

    def loss(m):
        with torch.no_grad():
            total = sum(float(F.binary_cross_entropy_with_logits(m(d, s), y, reduction="sum")) for d, s, y in batches)
        return total / sum(y.numel() for _, _, y in batches)

    base = loss(model)
    out = {}
    with torch.no_grad():
        dense_out = torch.cat([model.dense(d) for d, _, _ in batches]).mean(0)
        held = copy.deepcopy(model)
        last = held.dense.layers[-1]
        last.weight.zero_()
        last.bias.copy_(dense_out)  # ReLU(mean of ReLU outputs) = that mean
        out["dense"] = loss(held) - base
        for k, name in enumerate(model.structure.feature_names):
            table = model.sparse.tables[name].weight
            mean = torch.cat([table[s[:, k]] for _, s, _ in batches]).mean(0)
            held = copy.deepcopy(model)
            held.sparse.tables[name].weight.copy_(mean.expand_as(table))
            out[name] = loss(held) - base
    return out


def test_holdout_scores_the_features_by_their_mean_ablation_loss_and_the_rest_by_taylor():
    model = _cat_model()
    packed = PackedGroups(build_group_sets(model, KINDS))
    part = Holdout()
    assert part.feeds == (GRADIENTS, HOLDOUT)
    dense, sparse, labels = batch(model, 300)
    model.zero_grad()
    F.binary_cross_entropy_with_logits(model(dense, sparse), labels).backward()
    part.observe(packed)
    taylor = part.scores(packed).clone()  # before the held-out batches: Taylor everywhere
    batches = _held_out(model)
    part.observe_holdout(model, packed, batches)
    row = packed.names.index("features")
    labels_ = packed.sets[row].labels
    direct = _mean_ablation_direct(model, batches)
    torch.testing.assert_close(part.feature_scores, torch.tensor([direct[f] for f in labels_], dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    grid = part.scores(packed)
    g = len(labels_)
    assert torch.equal(grid[row, :g], part.feature_scores.clamp(min=Holdout.FLOOR))
    others = torch.arange(packed.num_sets) != row
    assert torch.equal(grid[others], taylor[others])


def test_holdout_without_held_out_batches_keeps_taylor():
    model = _cat_model()
    packed = PackedGroups(build_group_sets(model, KINDS))
    part = Holdout()
    part.observe_holdout(model, packed, [])
    assert part.feature_scores is None and part.scores(packed) is None


def test_short_names_and_targets_resolve_to_the_parts_and_anything_else_names_the_key():
    for name, cls in (("norm", Norm), ("taylor", Taylor), ("holdout", Holdout)):
        assert type(resolve(name, "k")) is cls
        assert type(resolve({"_target_": PART + cls.__name__}, "k")) is cls
        part = cls()
        assert resolve(part, "k") is part
    with pytest.raises(ValueError, match=r"^config key `mode.method.admm.group_score` must be one of .*'fisher'$"):
        ADMMConfig(budgets={"flops": 0.5}, group_score="fisher", warmup_steps=3)
    with pytest.raises(ValueError, match="config key `mode.method.admm.group_score` must be one of"):
        ADMMConfig(budgets={"flops": 0.5}, group_score={"_target_": "torch.nn.ReLU"}, warmup_steps=3)
    with pytest.raises(ValueError, match="config key `mode.method.enforce_score` must be one of"):
        UMECMethod(["feature"], enforce_score=Holdout())
    with pytest.raises(ValueError, match="warmup_steps` must be > 0 with group_score=holdout"):
        ADMMConfig(budgets={"flops": 0.5}, group_score=Holdout())
    assert isinstance(ADMMConfig(budgets={"flops": 0.5}).group_score, Norm)  # the paper's default


def test_every_umec_measures_with_its_own_copy_of_the_part():
    config = ADMMConfig(budgets={"flops": 0.5}, group_score="taylor", warmup_steps=3)
    a, b = (UMEC(tiny("dot"), KINDS, config) for _ in range(2))
    assert a.importance is not b.importance and a.importance is not config.group_score
    a.importance.observe(a.packed)
    assert b.taylor is None and config.group_score.scores(a.packed) is None


def _umec_run(group_score, enforce_score, interaction="dot", steps=8):
    """A UMECMethod built as the run builds it (Hydra `instantiate` of its node), through a few steps and the
    completion: (weighted norms, group weights, s, masks, kept)."""
    node = {"_target_": "umec_lightning.compression.umec.UMECMethod", "groups": sorted(KINDS),
            "admm": {"group_score": group_score, "warmup_steps": 3, "normalize_norms": True, "budget_ramp": 0.5},
            "enforce_score": enforce_score, "calibration_batches": 3}
    torch.manual_seed(0)
    method = instantiate(node)
    model = tiny(interaction)
    train(model, steps=10)
    budgets = {"flops": 0.5}
    method.setup(model, budgets)
    method.begin(steps)
    method.set_holdout(lambda: _held_out(model))
    train(model, method, steps=steps)
    for k in range(3):
        dense, sparse, labels = batch(model, 700 + k)
        method.observe(model, type("B", (), {"dense": dense, "sparse": sparse, "label": labels})())
    umec = method.umec
    norms, weight, s = umec.packed.norms(), umec.packed.group_weight, umec.state.s.clone()
    masks = umec.pruned_masks()
    outcome = method.finish(model)
    return norms, weight, s, masks, outcome.kept


@pytest.mark.parametrize("name, cls", [("norm", "Norm"), ("taylor", "Taylor"), ("holdout", "Holdout")])
def test_umec_decides_the_same_with_a_short_name_or_a_target(name, cls):
    by_name = _umec_run(name, "taylor" if name != "norm" else "norm")
    by_target = _umec_run({"_target_": PART + cls},
                          {"_target_": PART + ("Taylor" if name != "norm" else "Norm")})
    norms, weight, s, masks, kept = by_name
    assert torch.equal(norms, by_target[0]) and torch.equal(s, by_target[2])
    assert (weight is None) == (name == "norm") and (weight is None or torch.equal(weight, by_target[1]))
    assert masks.keys() == by_target[3].keys() and all(torch.equal(masks[k], by_target[3][k]) for k in masks)
    assert kept == by_target[4]


def test_the_parts_share_one_interface():
    for part in (Norm(), Taylor(), Holdout()):
        assert isinstance(part, Importance) and part.name in ("norm", "taylor", "holdout")
        assert part.fresh() is not part and type(part.fresh()) is type(part)
