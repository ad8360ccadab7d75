"""Low-rank SVD: ranks allocated to the budget, measured on the extracted model."""

import copy

import pytest
import torch

from umec_lightning.compression.extract import extract
from umec_lightning.compression.lowrank import LowRankSVD, _Unit
from umec_lightning.models import measure

from .conftest import tiny


def big_tables(interaction):
    return tiny(interaction, sizes=(400, 300, 200, 100), bottom=(8, 4), top=(8, 1))


def run(method, model, budgets):
    method.check(copy.deepcopy(model).to("meta"), budgets)
    method.setup(model, budgets)
    outcome = method.finish(model)
    return outcome, extract(model, outcome.kept)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_tables_meet_a_params_budget_measured_on_the_extracted_model(interaction):
    model = big_tables(interaction)
    outcome, small = run(LowRankSVD(layers=False), model, {"params": 0.6})
    assert measure(small).params <= 0.6 * measure(model).params
    assert outcome.info["params"] == pytest.approx(measure(small).params / measure(model).params)
    assert outcome.kept.ranks and all(1 <= r < 4 for r in outcome.kept.ranks.values())
    assert all(0 < v <= 1 for v in outcome.info["explained_variance"].values())


def test_allocation_keeps_rank_where_the_energy_is():
    """A table whose energy is all in one direction goes to rank 1 first."""
    model = big_tables("cat")
    with torch.no_grad():
        w = model.sparse.tables["C1"].weight
        w.copy_(torch.randn(w.shape[0], 1) @ torch.randn(1, w.shape[1]))  # rank 1
    outcome, _ = run(LowRankSVD(layers=False), model, {"params": 0.8})
    assert outcome.kept.ranks.get("C1") == 1
    assert outcome.info["explained_variance"]["C1"] == pytest.approx(1.0)


def test_manual_ranks_are_kept_and_bad_ones_refused():
    model = big_tables("dot")
    outcome, _ = run(LowRankSVD(layers=False, ranks={"C2": 2}), model, {"params": 0.9})
    assert outcome.kept.ranks["C2"] == 2
    with pytest.raises(ValueError, match="rank 9 outside"):
        LowRankSVD(layers=False, ranks={"C2": 9}).check(copy.deepcopy(model).to("meta"), {"params": 0.9})
    with pytest.raises(ValueError, match="not factorisable"):
        LowRankSVD(layers=False, ranks={"nope": 1}).check(copy.deepcopy(model).to("meta"), {"params": 0.9})


def test_unreachable_budget_is_refused_before_work():
    model = big_tables("dot")
    with pytest.raises(ValueError, match="params budget 0.01 is below"):
        LowRankSVD(layers=False).check(copy.deepcopy(model).to("meta"), {"params": 0.01})


def test_unit_choice_is_the_lagrangian_minimiser():
    # explained: 0.8, 0.9, 1.0 at ranks 1, 2, 3 (3 = the unit left as it is)
    unit = _Unit("u", torch.tensor([8.0, 1.0, 1.0]), {"params": [0.1, 0.15, 0.5]})
    assert unit.choose(0.0, ["params"]) == 3  # no price on resource: keep everything
    assert unit.choose(100.0, ["params"]) == 1  # resource is everything: the cheapest
    assert unit.choose(1.0, ["params"]) == 2  # 0.2 + 0.1 > 0.1 + 0.15 < 0.0 + 0.5


@pytest.mark.parametrize("interaction, budgets", [("dot", {"flops": 0.6}), ("cat", {"params": 0.5, "flops": 0.7})])
def test_layers_and_tables_meet_the_budgets(interaction, budgets):
    model = tiny(interaction, sizes=(400, 300, 200, 100), bottom=(32, 8), top=(32, 16, 1))
    outcome, small = run(LowRankSVD(), model, budgets)
    dense, cost = measure(model), measure(small)
    reached = {"params": cost.params / dense.params, "flops": cost.flops / dense.flops}
    for resource, budget in budgets.items():
        assert reached[resource] <= budget
    # The MLPs hold the FLOPs: a FLOPs budget is met by factoring layers.
    assert any(name.startswith(("dense.", "over.")) for name in outcome.kept.ranks)


def batches(model, count=6, size=64, seed=0):
    from umec_lightning.data import Batch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        dense = torch.rand(size, model.structure.num_dense, generator=g)
        sparse = torch.stack([torch.randint(0, n, (size,), generator=g) for n in model.structure.table_sizes], 1)
        out.append(Batch(dense=dense, sparse=sparse, label=(torch.rand(size, generator=g) < 0.3).float()))
    return out


def feature_run(model, budgets, **kw):
    from umec_lightning.compression.lowrank import LowRankFeature
    from umec_lightning.compression.method import finish_and_extract

    method = LowRankFeature(calibration_batches=4, **kw)
    method.check(copy.deepcopy(model).to("meta"), budgets)
    method.setup(model, budgets)
    return finish_and_extract(method, model, calibration=batches(model))


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_feature_low_rank_at_full_rank_equals_the_original(interaction):
    model = tiny(interaction, sizes=(40, 30, 20, 10), bottom=(8, 4), top=(8, 6, 1))
    full = {n: min(layer.in_features, layer.out_features) for n, layer in model.linear_layers().items()
            if n != "over.layers.2"}
    full |= {n: 4 for n in model.structure.feature_names}
    # Factored at full rank a layer costs more than as one Linear: a budget above 1 lets it be measured.
    result = feature_run(model, {"params": 2.0}, ranks=full)
    b = batches(model, count=1, seed=5)[0]
    model.eval()
    result.model.eval()
    torch.testing.assert_close(result.model(b.dense, b.sparse), model(b.dense, b.sparse), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_feature_low_rank_meets_the_budget_and_reports_ranks(interaction):
    model = tiny(interaction, sizes=(400, 300, 200, 100), bottom=(32, 8), top=(32, 16, 1))
    result = feature_run(model, {"params": 0.5})
    assert measure(result.model).params <= 0.5 * measure(model).params
    assert result.info["ranks"] == result.kept.ranks and result.info["explained_variance"]
    assert all(v > 0 for v in result.info["calibration_vectors"].values())


def test_rank_deficient_covariance_gives_no_nan():
    """Dead ReLUs (a layer whose outputs are constant) and a constant table: zero eigenvalues, no NaN."""
    model = tiny("cat", sizes=(400, 300, 200, 100), bottom=(32, 8), top=(32, 16, 1))
    with torch.no_grad():
        model.dense.layers[0].weight.zero_()
        model.dense.layers[0].bias.fill_(-1.0)  # every unit dead after the ReLU
        model.sparse.tables["C1"].weight.fill_(0.5)  # one vector for every id
    result = feature_run(model, {"params": 0.5})
    b = batches(model, count=1, seed=7)[0]
    assert torch.isfinite(result.model(b.dense, b.sparse)).all()


def test_calibration_needs_batches():
    from umec_lightning.compression.lowrank import LowRankFeature
    from umec_lightning.compression.method import finish_and_extract

    with pytest.raises(ValueError, match="calibration_batches"):
        LowRankFeature(calibration_batches=0)
    model = tiny("dot")
    method = LowRankFeature(calibration_batches=2)
    method.setup(model, {"params": 0.9})
    with pytest.raises(ValueError, match="the data gave none"):
        finish_and_extract(method, model, calibration=[])


def test_factor_activation_puts_a_relu_between_the_factors():
    """The paper's optional variant: same ranks and cost, a ReLU in the factored Linears, saved in the
    structure (so load_compressed rebuilds it), and the method asks for a finetune stage."""
    from umec_lightning.models.dlrm import Factored

    model = tiny("dot", sizes=(400, 300, 200, 100), bottom=(32, 8), top=(32, 16, 1))
    plain = feature_run(model, {"params": 0.5})
    relu = feature_run(model, {"params": 0.5}, factor_activation=True)
    assert relu.kept.ranks == plain.kept.ranks
    assert measure(relu.model).params == measure(plain.model).params
    factored = [m for m in relu.model.modules() if isinstance(m, Factored)]
    assert factored and relu.model.structure.factor_activation and not plain.model.structure.factor_activation
    b = batches(model, count=1, seed=5)[0]
    relu.model.eval()
    plain.model.eval()
    assert not torch.allclose(relu.model(b.dense, b.sparse), plain.model(b.dense, b.sparse))
    assert LowRankSVD(factor_activation=True).requires_finetune and not LowRankSVD().requires_finetune
    with pytest.raises(ValueError, match="factor_activation"):
        LowRankSVD(factor_activation="yes")


def _fitted(own_of):
    """A LowRankSVD whose layout's own bytes are `own_of(kept)`: each byte held back takes 2e-5 off a 0.6 params
    budget (the upper bound held back 5,000, as a compress stage under budget.bytes would, `_layout_budgets`)."""
    method = LowRankSVD(layers=False)
    log = []

    def layout_budgets(model, kept):
        own = own_of(kept)
        log.append((dict(kept.ranks), own))
        return {"params": 0.6 + (5_000 - own) * 2e-5}, own

    method.layout_budgets = layout_budgets
    return method, log


def test_ranks_fit_to_the_bytes_their_own_layout_leaves():
    """Held back for the largest layout (5,000 bytes), the ranks are allocated again on what the chosen layout's
    files take (here 1,000 + 100 a distinct rank): more parameters, within the looser budget, and the layout kept is
    one whose own bytes fit the reserve it was allocated under."""
    model = big_tables("cat")
    first, _ = run(LowRankSVD(layers=False), model, {"params": 0.6})
    method, log = _fitted(lambda kept: 1_000 + 100 * len(set(kept.ranks.values())))
    outcome, small = run(method, model, {"params": 0.6})
    assert outcome.info["layout_allocations"] >= 2 and len(log) == outcome.info["layout_allocations"]
    assert outcome.info["params"] > first.info["params"]  # the bytes the bound over-reserved went to rank
    own = outcome.info["layout_reserve_bytes"]
    assert own == 1_000 + 100 * len(set(outcome.kept.ranks.values()))
    assert measure(small).params <= (0.6 + (5_000 - own) * 2e-5) * measure(model).params


def test_a_layout_whose_files_outgrow_the_reserve_is_not_kept():
    """Where every allocation's layout takes more than the reserve it was allocated under (own bytes that grow
    with the ranks), the first allocation, under the upper bound, is the one kept."""
    model = big_tables("cat")
    first, _ = run(LowRankSVD(layers=False), model, {"params": 0.6})
    method, log = _fitted(lambda kept: 4_000 + 10 * sum(kept.ranks.values()) + 10 * len(log))
    outcome, _ = run(method, model, {"params": 0.6})
    assert outcome.kept.ranks == first.kept.ranks and outcome.info["layout_reserve_bytes"] == log[0][1]
    assert outcome.info["layout_allocations"] == 4  # LAYOUT_ROUNDS more after the first, none kept


@pytest.mark.parametrize("budget", [0.3, 0.6])
def test_no_next_rank_fits_what_the_allocation_leaves(budget):
    """The allocation spends what the multiplier leaves (`_fill`: here the smallest feasible λ alone stops 0.06 short
    of 0.6): no factored table's next rank, nor its unfactored form, still meets the budget, measured on the
    extracted model."""
    model = tiny("dot", sizes=(400, 300, 200, 100, 50, 900), bottom=(16, 8), top=(8, 1))
    outcome, small = run(LowRankSVD(layers=False), model, {"params": budget})
    limit = budget * measure(model).params
    assert measure(small).params <= limit
    for name, r in outcome.kept.ranks.items():
        for nxt in (r + 1, 8):
            kept = copy.deepcopy(outcome.kept)
            kept.ranks = {n: v for n, v in {**outcome.kept.ranks, name: nxt}.items() if v < 8}
            assert measure(extract(model, kept)).params > limit, (name, nxt)
