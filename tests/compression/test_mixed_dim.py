import copy

import pytest
import torch

from umec_lightning.compressed import read_compressed, save_compressed
from umec_lightning.compression.export import random_inputs
from umec_lightning.compression.extract import extract, extracted_structure
from umec_lightning.compression.kept import Kept
from umec_lightning.compression.method import finish_and_extract
from umec_lightning.compression.mixed_dim import MixedDim
from umec_lightning.models import measure

from .conftest import tiny

SIZES = (3, 40, 200, 1000, 5000)  # most popular first


def model_for(interaction, seed=0):
    return tiny(interaction, sizes=SIZES, bottom=(8, 8), top=(16, 1), seed=seed)


def meta(model):
    return copy.deepcopy(model).to("meta")


def outputs(model, seed=1):
    dense, sparse = random_inputs(model.structure, batch_size=32, seed=seed)
    with torch.no_grad():
        return model(dense * 3 - 1, sparse)


def run(model, budgets, alpha=0.3):
    method = MixedDim(alpha=alpha)
    method.check(meta(model), budgets)
    method.setup(model, budgets)
    return method, finish_and_extract(method, model)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8])
def test_meets_the_params_budget_measured_on_the_extracted_model(interaction, budget):
    model = model_for(interaction)
    _, done = run(model, {"params": budget})
    cost, dense = measure(done.model), measure(model)
    assert cost.params <= budget * dense.params
    assert done.info["params"] == pytest.approx(cost.params / dense.params, rel=1e-12)
    assert done.info["flops"] == pytest.approx(cost.flops / dense.flops, rel=1e-12)
    assert done.kept.ranks and set(done.kept.ranks) <= set(model.structure.feature_names)
    dims = done.info["dims"]
    assert [t.embedding_dim for t in done.model.sparse.tables.values()] == list(dims.values())
    assert done.info["alpha"] == 0.3
    # λ is as large as possible: one more column on any narrowed table (taking the next breakpoint's
    # allocation) breaks the budget, so nothing is left on the table. Check the next allocation directly.
    method = MixedDim()
    lam = done.info["lambda"]
    s = model.structure
    scale = torch.tensor([1.0 / n for n in s.table_sizes], dtype=torch.float64).pow(0.3)
    steps = sorted({(k - 0.5) / float(scale[i]) for i in range(len(SIZES)) for k in range(2, 9)})
    later = [x for x in steps if x > lam * (1 + 1e-9)]
    if later:
        from umec_lightning.compression.mixed_dim import mixed_dims

        widths = method._effective(model, mixed_dims(torch.tensor(later, dtype=torch.float64),
                                                     1.0 / torch.tensor(s.table_sizes, dtype=torch.float64), 0.3,
                                                     torch.tensor(s.table_dims)))
        assert (method._fractions(model, widths)["params"] > budget).all()


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_popular_tables_get_at_least_the_dims_of_bigger_ones(interaction):
    model = model_for(interaction)
    for budget in (0.2, 0.4, 0.6):
        _, done = run(model, {"params": budget})
        dims = list(done.info["dims"].values())
        assert dims == sorted(dims, reverse=True), dims  # SIZES grow: popularity 1/rows falls
        assert dims[-1] < dims[0]


def test_dims_follow_the_power_rule():
    model = model_for("cat")
    method, done = run(model, {"params": 0.3})
    lam = done.info["lambda"]
    expected = [max(1, min(8, int(lam * (1 / n) ** 0.3 + 0.5 + 1e-9))) for n in SIZES]
    assert list(done.info["dims"].values()) == expected
    # α = 0: no skew, every table gets the same width.
    _, flat = run(model, {"params": 0.3}, alpha=0.0)
    assert len(set(flat.info["dims"].values())) == 1


def test_tables_at_full_width_get_no_rank_and_structure_agrees():
    model = model_for("dot")
    _, done = run(model, {"params": 0.5})
    full = [n for n, d in done.info["dims"].items() if d == 8]
    assert full and not set(full) & set(done.kept.ranks)
    assert done.model.structure == extracted_structure(model, done.kept)
    assert sorted(done.model.sparse.projections) == sorted(done.kept.ranks)


def test_dot_never_adds_a_projection_that_saves_nothing():
    model = model_for("dot")  # rows·r + r·8 >= rows·8: C1 (3 rows) from r = 3 on, C2 (40 rows) at r = 7
    widths = torch.tensor([[2, 6, 3, 3, 3], [3, 7, 7, 7, 7]])
    assert MixedDim._effective(model, widths).tolist() == [[2, 6, 3, 3, 3], [8, 8, 7, 7, 7]]
    for alpha in (0.3, 1.0):
        for budget in (0.2, 0.4, 0.6, 0.8):
            _, done = run(model, {"params": budget}, alpha=alpha)
            rows = dict(zip(model.structure.feature_names, SIZES))
            for name, projection in done.model.sparse.projections.items():
                dim, rank = projection.weight.shape
                assert rows[name] * rank + rank * dim < rows[name] * dim, (name, rank)


def test_deterministic():
    model = model_for("cat")
    a, b = run(model, {"params": 0.3})[1], run(model, {"params": 0.3})[1]
    assert a.kept == b.kept and a.info == b.info
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_flops_budget_is_met_too(interaction):
    model = model_for(interaction)
    dense = measure(model)
    if interaction == "cat":  # narrower tables feed fewer top-MLP columns: FLOPs fall with the dims
        _, done = run(model, {"params": 0.8, "flops": 0.9})
        cost = measure(done.model)
        assert cost.params <= 0.8 * dense.params and cost.flops <= 0.9 * dense.flops
    else:  # projections only add FLOPs: a FLOPs cap limits how many tables may be projected
        loose = run(model, {"params": 0.3})[1]
        extra = measure(loose.model).flops / dense.flops
        assert extra > 1
        _, done = run(model, {"params": 0.5, "flops": 1 + (extra - 1) / 2})
        cost = measure(done.model)
        assert cost.params <= 0.5 * dense.params and cost.flops <= (1 + (extra - 1) / 2) * dense.flops
        with pytest.raises(ValueError, match="flops"):
            MixedDim().check(meta(model), {"params": 0.5, "flops": 0.99})


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_unreachable_budget_is_refused_before_training(interaction):
    model = model_for(interaction)
    with pytest.raises(ValueError, match=r"cannot meet budgets \{'params': 0.001\}.*params 0\.\d+"):
        MixedDim().check(meta(model), {"params": 0.001})
    for budgets, match in [({}, "budget.params"), ({"flops": 0.5}, "budget.params"),
                           ({"params": None}, "budget.params"), ({"params": 0.5, "bytes": 1}, "unknown"),
                           ({"params": -1.0}, "positive")]:
        with pytest.raises(ValueError, match=match):
            MixedDim().check(meta(model), budgets)
    with pytest.raises(ValueError, match="alpha"):
        MixedDim(alpha=-0.1)


def test_a_projected_model_is_refused():
    model = model_for("dot")
    kept = Kept.everything(model)
    kept.ranks = {"C5": 2}
    with pytest.raises(ValueError, match=r"already projects \['C5'\]"):
        MixedDim().check(meta(extract(model, kept)), {"params": 0.5})


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_save_load_rebuilds_it(tmp_path, interaction):
    model = model_for(interaction)
    _, done = run(model, {"params": 0.4})
    path = save_compressed(tmp_path / "compressed.pt", done.model, done.kept, {"mode": "mixed_dim"})
    stored = read_compressed(path)
    assert stored.kept == done.kept and stored.model.structure == done.model.structure
    assert torch.equal(outputs(stored.model), outputs(done.model))


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_full_rank_factorisation_is_exact(interaction):
    """Tables whose columns already have the chosen rank lose nothing: the extracted model's outputs equal
    the input model's."""
    model = model_for(interaction)
    method, done = run(model, {"params": 0.4})
    with torch.no_grad():
        for name, rank in done.kept.ranks.items():
            table = model.sparse.tables[name].weight
            table.copy_(torch.randn(table.shape[0], rank) @ torch.randn(rank, table.shape[1]) * 0.1)
    again = extract(model, method.finish(model).kept)
    assert (outputs(again) - outputs(model)).abs().max().item() <= 1e-5


def test_mode_config_builds_the_method():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = OmegaConf.load(Path(__file__).parents[2] / "conf" / "mode" / "mixed_dim.yaml")
    method = instantiate(conf.method)
    assert isinstance(method, MixedDim) and method.alpha == 0.3 and conf.name == method.name
    assert OmegaConf.to_container(conf.stages) == ["pretrain", {"kind": "compress", "epochs": 0}, "finetune"]
