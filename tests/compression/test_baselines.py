"""The paper's baselines (magnitude, Taylor, group lasso, handcrafted), driven without Lightning: a hand-written
SGD loop calls the hooks in the order the LightningModule does (loss, backward, after_backward, step,
after_step)."""

import copy

import pytest
import torch

from umec_lightning.compression.extract import extract, masked_copy
from umec_lightning.compression.group_lasso import GroupLasso
from umec_lightning.compression.handcrafted import Handcrafted
from umec_lightning.compression.magnitude import Magnitude
from umec_lightning.compression.taylor import Taylor
from umec_lightning.models import measure

from .conftest import tiny

GROUPS = {"dot": ["feature", "dim", "neuron", "pair"], "cat": ["feature", "dim", "neuron"]}


def batch(model, step, size=32):
    g = torch.Generator().manual_seed(1000 + step)
    dense = torch.rand(size, 3, generator=g)
    sparse = torch.stack([torch.randint(0, n, (size,), generator=g) for n in model.structure.table_sizes], 1)
    labels = (torch.rand(size, generator=g) < 0.3).float()
    return dense, sparse, labels


def train(model, method=None, steps=10, lr=0.1, start=0):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(start, start + steps):
        dense, sparse, labels = batch(model, step)
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), labels)
        extra = method.loss(model) if method is not None else None
        (loss if extra is None else loss + extra).backward()
        if method is not None:
            method.after_backward(model)
        optimizer.step()
        if method is not None:
            method.after_step(model, lr)


def meta(model):
    return copy.deepcopy(model).to("meta")


def compress(method, interaction, budgets, steps=0, seed=0):
    """Pretrain a tiny dense model, run one compress stage of `method`; (dense cost, model, outcome)."""
    model = tiny(interaction, seed=seed)
    train(model, steps=20)
    dense = measure(model)
    method.check(meta(model), budgets)
    method.setup(model, budgets)
    method.to("cpu")
    train(model, method, steps=steps)
    return dense, model, method.finish(model)


def assert_meets(dense, model, kept, budgets):
    small = measure(extract(model, kept))
    for name, value in budgets.items():
        assert getattr(small, name) <= value * getattr(dense, name), (name, small, dense)


def outputs_match(model, kept):
    dense, sparse, _ = batch(model, 999)
    with torch.no_grad():
        torch.testing.assert_close(extract(model, kept)(dense, sparse), masked_copy(model, kept)(dense, sparse),
                                   rtol=1e-5, atol=1e-6)


# ---- magnitude -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_magnitude_meets_budgets_and_extracts_exactly(interaction):
    budgets = {"flops": 0.5, "params": 0.7}
    dense, model, outcome = compress(Magnitude(GROUPS[interaction]), interaction, budgets)
    assert_meets(dense, model, outcome.kept, budgets)
    assert outcome.info["groups_pruned"] > 0 and outcome.info["flops"] <= 0.5
    assert outcome.info["flops"] == pytest.approx(measure(extract(model, outcome.kept)).flops / dense.flops)
    outputs_match(model, outcome.kept)


def test_magnitude_prunes_the_smallest_neurons():
    model = tiny("cat", sizes=(10,), bottom=(8, 4), top=(16, 1))
    with torch.no_grad():  # make top neuron 0..3 tiny: they go first
        model.over.layers[0].weight[:4] *= 1e-3
        model.over.layers[0].bias[:4] = 0.0
    method = Magnitude(["neuron"])
    method.setup(model, {"flops": 0.8})
    kept = method.finish(model).kept
    assert not set(kept.neurons["over.layers.0"]) & {0, 1, 2, 3}


def test_magnitude_scores_dot_dims_by_the_weights_they_remove():
    model = tiny("dot")  # the dim gate is all ones: its norms alone would say nothing
    with torch.no_grad():
        for table in model.sparse.tables.values():
            table.weight[:, 2] *= 1e-3
        model.dense.layers[-1].weight[2] *= 1e-3
        model.dense.layers[-1].bias[2] = 0.0
    method = Magnitude(["dim"])
    method.setup(model, {"params": 0.9})
    kept = method.finish(model).kept
    assert all(2 not in dims for dims in kept.dims.values()) and len(kept.dims["C1"]) == 3


@pytest.mark.parametrize("interaction", ["dot", "cat"])
@pytest.mark.parametrize("make", [lambda g: Magnitude(g, dim_block=2),
                                  lambda g: Taylor(g, rounds=2, steps_per_round=3, dim_block=2),
                                  lambda g: GroupLasso(g, lam=0.05, threshold=0.05, dim_block=2)],
                         ids=["magnitude", "taylor", "group_lasso"])
def test_baselines_prune_dims_in_blocks(interaction, make):
    """dim_block=2 (widths 4): every kept table width is a whole number of blocks (what frees torchrec shard
    memory at dim_block=4), budgets are met and the extraction is exact."""
    budgets = {"params": 0.8}
    method = make(["dim"])
    dense, model, outcome = compress(method, interaction, budgets, steps=6)
    widths = [len(d) for d in outcome.kept.dims.values()]
    assert widths and all(w % 2 == 0 for w in widths)
    if method.targets_budget:
        assert_meets(dense, model, outcome.kept, budgets)
        assert min(widths) < 4  # dims were pruned, two at a time
    for dims in outcome.kept.dims.values():  # whole blocks: {0, 1} and/or {2, 3}, never half of one
        assert all(d ^ 1 in dims for d in dims), dims
    outputs_match(model, outcome.kept)
    with pytest.raises(ValueError, match="dim_block`: 3 does not divide"):
        make(["dim"]).__class__(["dim"], dim_block=3).check(meta(model), budgets)


def test_magnitude_neurons_only_under_cat_reports_the_measured_flops():
    dense, model, outcome = compress(Magnitude(["neuron"]), "cat", {"flops": 0.7})
    assert outcome.info["flops"] == pytest.approx(measure(extract(model, outcome.kept)).flops / dense.flops)


def test_magnitude_is_deterministic():
    runs = [compress(Magnitude(GROUPS["dot"]), "dot", {"flops": 0.4})[2].kept for _ in range(2)]
    assert runs[0] == runs[1]


# ---- Taylor ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_taylor_prunes_iteratively_to_the_budget(interaction):
    budgets = {"flops": 0.4, "params": 0.8}
    method = Taylor(GROUPS[interaction], rounds=3, steps_per_round=4)
    model = tiny(interaction)
    train(model, steps=20)
    dense = measure(model)
    method.check(meta(model), budgets)
    method.setup(model, budgets)
    train(model, method, steps=4)  # round 1: a third of the way
    first = method.report(method.pruned)
    assert first["groups_pruned"] > 0
    assert first["flops"] <= 1 - (1 - 0.4) / 3 + 1e-12 and first["params"] <= 1 - (1 - 0.8) / 3 + 1e-12
    assert float(method.importance.abs().sum()) == 0.0  # reset after the round
    train(model, method, steps=6, start=4)  # round 2 at step 8, then two more steps
    assert method.rounds_done() == 2 and method.report(method.pruned)["groups_pruned"] > first["groups_pruned"]
    norms = method.packed.norms()
    assert bool((norms[method.pruned] == 0).all())  # pruned groups stay zeroed after every step
    assert method.log_values()["pruned/groups"] == float(method.pruned.sum())
    outcome = method.finish(model)
    assert_meets(dense, model, outcome.kept, budgets)
    assert outcome.info["pruned_in_training"] > 0 and outcome.info["rounds_in_training"] == 2


def test_taylor_importance_is_the_squared_sum_of_grad_times_weight():
    model = tiny("cat", sizes=(10, 20))
    method = Taylor(["neuron"], rounds=2, steps_per_round=100)
    method.setup(model, {"flops": 0.5})
    dense, sparse, labels = batch(model, 0)
    torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), labels).backward()
    method.after_backward(model)
    layer = model.over.layers[0]
    expected = ((layer.weight.grad * layer.weight).sum(1) + layer.bias.grad * layer.bias).square()
    row = method.packed.names.index("neurons:over.layers.0")
    torch.testing.assert_close(method.importance[row, :8].float(), expected.detach())


def test_taylor_state_dict_round_trip_resumes_identically():
    budgets = {"flops": 0.45}
    kinds = GROUPS["dot"]

    def start():
        model = tiny("dot")
        train(model, steps=10)
        method = Taylor(kinds, rounds=3, steps_per_round=4)
        method.setup(model, budgets)
        return model, method

    model, method = start()
    train(model, method, steps=6)  # mid round 2: importances accumulated, round 1 pruned
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(method.state_dict())
    train(model, method, steps=6, start=6)
    uninterrupted = method.finish(model)

    fresh = tiny("dot", seed=5)
    resumed = Taylor(kinds, rounds=3, steps_per_round=4)
    resumed.setup(fresh, budgets)  # adds the dim gate before the weights are loaded
    fresh.load_state_dict(saved_model)
    resumed.load_state_dict(saved)
    train(fresh, resumed, steps=6, start=6)
    assert torch.equal(resumed.importance, method.importance) and torch.equal(resumed.pruned, method.pruned)
    assert resumed.finish(fresh).kept == uninterrupted.kept
    with pytest.raises(ValueError, match="Taylor state is for sets"):
        other = Taylor(["neuron"])
        other.setup(tiny("dot"), budgets)
        other.load_state_dict(saved)


def test_taylor_is_deterministic_and_follows_the_model_dtype():
    runs = [compress(Taylor(GROUPS["cat"], rounds=2, steps_per_round=3), "cat", {"flops": 0.5}, steps=5)[2].kept
            for _ in range(2)]
    assert runs[0] == runs[1]
    model = tiny("cat")
    method = Taylor(GROUPS["cat"], rounds=2, steps_per_round=3)
    method.setup(model, {"flops": 0.5})
    model.double()
    method.to("cpu")  # the grid follows the parameters' new dtype
    assert method.packed.norms().dtype == torch.float64
    model.float()
    method.to("cpu")
    train(model, method, steps=4)
    assert method.pruned.any()


# ---- group lasso -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_group_lasso_with_a_large_lambda_removes_groups(interaction):
    method = GroupLasso(GROUPS[interaction], lam=0.05, threshold=0.01)
    method.check(meta(tiny(interaction)), {})  # no budget needed
    dense, model, outcome = compress(method, interaction, {}, steps=150)
    assert outcome.info["groups_removed"] > 0 and outcome.info["flops"] < 1.0
    assert sum(outcome.info["removed_per_kind"].values()) == outcome.info["groups_removed"]
    small = extract(model, outcome.kept)
    assert measure(small).flops < dense.flops
    d, s, _ = batch(model, 0)
    assert torch.isfinite(small(d, s)).all()


def test_group_lasso_penalty_is_lambda_times_the_group_l2_norms():
    model = tiny("dot")
    method = GroupLasso(GROUPS["dot"], lam=0.3)
    method.setup(model, {})
    expected = 0.3 * sum(torch.sqrt(gs.norms() + 1e-12).sum() for gs in method.sets)
    penalty = method.loss(model)
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    assert model.over.layers[0].weight.grad is not None and model.dim_gate.grad is not None


def test_group_lasso_keeps_the_largest_group_of_every_set():
    model = tiny("cat")
    method = GroupLasso(GROUPS["cat"], threshold=1e9)
    method.setup(model, {})
    removed = method.removed()
    assert (method.packed.num_groups - removed.sum(1)).tolist() == [1] * method.packed.num_sets
    outcome = method.finish(model)
    extract(model, outcome.kept)  # a valid structure


# ---- handcrafted -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("interaction, budgets", [("dot", {"flops": 0.5}), ("cat", {"flops": 0.5, "params": 0.8})])
def test_handcrafted_narrows_every_hidden_layer_uniformly(interaction, budgets):
    model = tiny(interaction, bottom=(16, 8, 4), top=(32, 16, 1))
    dense = measure(model)
    method = Handcrafted()
    method.check(meta(model), budgets)
    method.setup(model, budgets)
    outcome = method.finish(model)
    assert_meets(dense, model, outcome.kept, budgets)
    ratio, widths = outcome.info["width_ratio"], outcome.info["widths"]
    assert 0 < ratio < 1
    full = {"dense.layers.0": 16, "dense.layers.1": 8, "dense.layers.2": 4, "over.layers.0": 32, "over.layers.1": 16}
    if interaction == "dot":
        assert "dense.layers.2" not in widths and outcome.kept.neurons["dense.layers.2"] == [0, 1, 2, 3]
    for name, w in widths.items():
        assert w == max(1, int(full[name] * ratio + 0.5 + 1e-9))
    # The largest ratio: the next width step breaks a budget.
    steps = {(k - 0.5) / full[n] for n in widths for k in range(2, full[n] + 1)}
    larger = sorted(r for r in steps if r > ratio)
    kept = outcome.kept
    kept.neurons.update({n: list(range(max(1, int(full[n] * larger[0] + 0.5 + 1e-9)))) for n in widths})
    small = measure(extract(model, kept))
    assert any(getattr(small, k) > v * getattr(dense, k) for k, v in budgets.items())
    assert method.finish(model).kept == method.finish(model).kept  # deterministic


def test_handcrafted_rejects_an_unreachable_params_budget():
    model = tiny("cat", sizes=(1000, 2000))  # the tables dominate the parameters
    with pytest.raises(ValueError, match=r"params 0\.9"):
        Handcrafted().check(meta(model), {"flops": 0.5, "params": 0.5})


# ---- budgets that cannot be met --------------------------------------------------------------------------


@pytest.mark.parametrize("method", [Magnitude(["neuron"]), Taylor(["neuron"]), Handcrafted()])
def test_unreachable_or_missing_budgets_raise_in_check(method):
    model = meta(tiny("dot"))
    with pytest.raises(ValueError, match="below|unreachable"):
        method.check(model, {"flops": 0.01})
    with pytest.raises(ValueError, match="at least one"):
        method.check(model, {"flops": None})


# ---- finishing on rank 0 alone (trainer=torchrec) ---------------------------------------------------------


def test_rank_zero_finishes_alone_and_the_others_get_its_model_without_tables():
    """`finish_on_rank_zero` without processes: rank 0's call, then another rank's on a model with meta
    tables, handed what rank 0 broadcast. The other rank builds rank 0's extracted model, tables meta."""
    from umec_lightning.compression.method import finish_on_rank_zero
    from umec_lightning.models import DLRM

    _, model, _ = compress(Magnitude(GROUPS["dot"]), "dot", {"flops": 0.5})
    method = Magnitude(GROUPS["dot"])
    method.setup(model, {"flops": 0.5})
    sent = []
    ours = finish_on_rank_zero(method, model, 0, lambda obj: sent.append(obj) or obj)
    bare = DLRM(model.structure, hold_tables=False)
    theirs = finish_on_rank_zero(Magnitude(GROUPS["dot"]), bare, 1, lambda obj: sent[0])
    assert theirs.kept == ours.kept and theirs.info == ours.info and ours.model.holds_tables
    assert not theirs.model.holds_tables and theirs.model.structure == ours.model.structure
    for key, value in ours.model.state_dict().items():
        got = theirs.model.state_dict()[key]
        assert got.is_meta if key in ours.model.table_keys() else torch.equal(got, value), key

    class Failing(Magnitude):
        def finish(self, model):
            raise ValueError("no budget reachable")

    failing, sent = Failing(GROUPS["dot"]), []
    failing.setup(model, {"flops": 0.5})
    with pytest.raises(ValueError, match="no budget reachable"):
        finish_on_rank_zero(failing, model, 0, lambda obj: sent.append(obj) or obj)
    with pytest.raises(RuntimeError, match="rank 0 failed .*no budget reachable"):
        finish_on_rank_zero(failing, bare, 1, lambda obj: sent[0])
