"""The factorising surgery of the deep families (DCNv2, DeepFM, Wide & Deep; `models.deep_parts`): `kept.ranks` and
`bases` as DLRM's `extract` takes them. The extracted model computes what the model whose factorised units are their
truncated SVDs computes (tables: the looked-up vector, first-order weight included; layers: W -> U_r U_rᵀ W, the
bias kept), exactly at full rank; `measure` equals the resource model on it; its structure round-trips through
to_dict / from_dict and compressed.pt; TorchScript and ONNX run it; and the low-rank and mixed-dimension methods
meet their budgets on every deep family."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from umec_lightning.compressed import read_compressed, save_compressed
from umec_lightning.compression.export import export_onnx, export_torchscript, random_inputs
from umec_lightning.compression.extract import Basis, extract, extracted_structure
from umec_lightning.compression.kept import Kept
from umec_lightning.compression.lowrank import LowRankFeature, LowRankSVD
from umec_lightning.compression.method import finish_and_extract
from umec_lightning.compression.mixed_dim import MixedDim
from umec_lightning.compression.resource import resource_model
from umec_lightning.data import Batch
from umec_lightning.models import Factored, fold_batch_norm, measure
from umec_lightning.models.dcnv2 import DCNv2Structure, dense_dcnv2_structure
from umec_lightning.models.deepfm import dense_deepfm_structure
from umec_lightning.models.family import family_named, family_of_model, structure_from_dict
from umec_lightning.models.wdl import WDLStructure, dense_wdl_structure

FAMILIES = ["dcnv2", "dcnv2-stacked", "deepfm", "wdl"]
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def structure(kind: str, sizes=(7, 9, 5), dim: int = 4, deep=(8, 6), batch_norm: bool = True, **kw):
    """Three tables of `sizes` rows, three dense columns, a deep network with batch norm on its first layer."""
    args = dict(sparse_names=["a", "b", "c"], table_sizes=list(sizes), embedding_dim=dim, num_dense=3,
                deep=list(deep), dense_names=["x", "y", "z"],
                batch_norm={"deep.layers.0": True} if batch_norm and deep else None, **kw)
    if kind.startswith("dcnv2"):
        return dense_dcnv2_structure(**args, cross_layers=2, cross_rank=None, experts=1,
                                     stacking="stacked" if kind.endswith("stacked") else "parallel")
    return (dense_deepfm_structure if kind == "deepfm" else dense_wdl_structure)(**args)


def model_of(kind: str, seed: int = 0, **kw):
    """A model with biases, batch-norm affine and running statistics off their defaults, in eval mode."""
    s = structure(kind, **kw)
    model = family_named(s.family).build(s, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if "norm" in name else 0.0))
        model.train()
        for k in range(3):
            dense, sparse = random_inputs(s, batch_size=16, seed=seed + k)
            model(dense * 3 + 1, sparse)
    return model.eval()


def inputs(model, batch: int = 24, seed: int = 1):
    dense, sparse = random_inputs(model.structure, batch_size=batch, seed=seed)
    return dense * 2 - 0.5, sparse


def same_outputs(a, b, atol: float = ATOL, seed: int = 1) -> None:
    dense, sparse = inputs(a, seed=seed)
    with torch.no_grad():
        torch.testing.assert_close(a(dense, sparse), b(dense, sparse), rtol=0, atol=atol)


def with_ranks(kept: Kept, ranks: dict[str, int]) -> Kept:
    return Kept(**{**kept.to_dict(), "pairs": kept.pairs, "ranks": dict(ranks)})


def svd_reference(model, ranks: dict[str, int]):
    """`model` as served (batch norm folded), each unit of `ranks` replaced in place by its rank-r truncated SVD:
    a Linear W -> U_r U_rᵀ W (bias kept), a table's looked-up vector E -> E V_r V_rᵀ (its whole stored weight:
    the reference's tables are unprojected)."""
    ref = copy.deepcopy(fold_batch_norm(model)).eval()
    layers = ref.linear_layers()
    with torch.no_grad():
        for name, r in ranks.items():
            if name in layers:
                w = layers[name].weight
                u = torch.linalg.svd(w.double(), full_matrices=False)[0][:, :r]
                w.copy_((u @ u.T @ w.double()).to(w.dtype))
            else:
                assert name not in ref.sparse.projections
                e = ref.sparse.tables[name].weight
                v = torch.linalg.svd(e.double(), full_matrices=False)[2][:r].T
                e.copy_((e.double() @ v @ v.T).to(e.dtype))
    return ref


def every_unit_ranks(model, cut: int = 1) -> dict[str, int]:
    """Every factorisable unit at `cut` below its full rank (at least 1)."""
    s = model.structure
    ranks = {name: max(1, min(shape) - cut) for name, shape in s.linear_shapes().items()}
    ranks |= {name: max(1, d - cut) for name, d in zip(s.feature_names, s.lookup_dims)}
    return ranks


# ---- the surgery -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("cut", [1, 2])
def test_extracted_factorisation_equals_the_truncated_svd_model(kind, cut):
    model = model_of(kind)
    ranks = every_unit_ranks(model, cut)
    small = extract(model, with_ranks(Kept.everything(model), ranks))
    s = small.structure
    assert s.table_ranks == [ranks[n] for n in s.feature_names]
    assert s.layer_ranks == {n: r for n, r in ranks.items() if n in s.linear_shapes()}
    assert s.batch_norm is None  # folded into the factored layer
    assert set(small.sparse.projections) == set(s.feature_names)
    assert set(small.factored_layers()) == set(s.layer_ranks)
    same_outputs(small, svd_reference(model, ranks))
    assert small.structure == extracted_structure(model, with_ranks(Kept.everything(model), ranks))


@pytest.mark.parametrize("kind", FAMILIES)
def test_pruned_and_factorised_equals_the_truncated_svd_of_the_pruned_model(kind):
    """Ranks and bases live in the pruned units' spaces: extraction with ranks equals the SVD truncation of the
    extraction without them, under any pruning (and DeepFM's and Wide & Deep's compression gate)."""
    rng = random.Random(0)
    checked = 0
    for trial in range(12):
        model = model_of(kind, seed=trial)
        s = model.structure
        if kind in ("deepfm", "wdl") and trial % 2:
            gate = model.enable_dim_gate()
            with torch.no_grad():
                gate.copy_(torch.randn(gate.shape, generator=torch.Generator().manual_seed(trial)))
        kept = Kept.everything(model)
        kept.feature_ids = [f for f in s.feature_ids if rng.random() < 0.8] or [s.feature_ids[0]]
        if kind == "deepfm":
            shared = sorted(rng.sample(range(s.embedding_dim), rng.randint(2, s.embedding_dim)))
            kept.dims = {name: shared for name in s.feature_names}
        else:
            kept.dims = {name: sorted(rng.sample(range(d), rng.randint(2, d)))
                         for name, d in zip(s.feature_names, s.table_dims)}
        kept.neurons = {name: sorted(rng.sample(range(w), rng.randint(3, w)))
                        for name, w in zip(s.hidden_names, s.deep)}
        pruned = extract(model, kept)
        ranks = {name: rng.randint(1, min(shape) - 1) for name, shape in pruned.structure.linear_shapes().items()}
        ranks |= {name: rng.randint(1, d - 1) for name, d in zip(pruned.structure.feature_names,
                                                                  pruned.structure.lookup_dims)}
        small = extract(model, with_ranks(kept, ranks))
        assert small.dim_gate is None
        same_outputs(small, svd_reference(pruned, ranks), seed=trial)
        checked += 1
    assert checked == 12


@pytest.mark.parametrize("kind", FAMILIES)
def test_at_full_rank_the_factorised_model_equals_the_original(kind):
    """Every layer factored at min(in, out) and every table at its true rank (tables made rank 2 here, so that a
    factorisation below their width is exact): the original's outputs."""
    model = model_of(kind)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for table in model.sparse.tables.values():
            rows, width = table.weight.shape
            table.weight.copy_(torch.randn(rows, 2, generator=gen) @ torch.randn(2, width, generator=gen))
    s = model.structure
    ranks = {name: min(shape) for name, shape in s.linear_shapes().items()} | {n: 2 for n in s.feature_names}
    small = extract(model, with_ranks(Kept.everything(model), ranks))
    assert small.structure.table_ranks == [2] * s.num_features
    assert small.structure.layer_ranks == {n: r for n, r in ranks.items() if n in s.linear_shapes()}
    same_outputs(small, model)
    # a model carried through a second surgery unchanged: its projections and factored layers kept as they are
    again = extract(small, Kept.everything(small))
    assert again.structure == small.structure
    same_outputs(again, small)


@pytest.mark.parametrize("kind", FAMILIES)
def test_given_bases_with_a_mean(kind):
    """A table's basis spanning its centred rows and a layer's full orthonormal basis, each with a mean: exact, and
    the projections carry the mean as their bias (`projection_bias`)."""
    model = model_of(kind)
    s = model.structure
    gen = torch.Generator().manual_seed(3)
    name, width = s.feature_names[1], s.lookup_dims[1]
    mean = torch.randn(width, generator=gen)
    factor = torch.randn(2, width, generator=gen)
    with torch.no_grad():
        table = model.sparse.tables[name].weight
        table.copy_(torch.randn(table.shape[0], 2, generator=gen) @ factor + mean)
    layer = s.hidden_names[-1]  # 8 -> 6: a 6 × 6 orthonormal basis is its whole output space
    out = s.deep[-1]
    bases = {name: Basis(torch.linalg.qr(factor.T)[0], mean),
             layer: Basis(torch.linalg.qr(torch.randn(out, out, generator=gen))[0], torch.randn(out, generator=gen))}
    small = extract(model, with_ranks(Kept.everything(model), {name: 2, layer: out}), bases)
    assert small.structure.projection_bias and small.structure.table_ranks[1] == 2
    torch.testing.assert_close(small.sparse.projections[name].bias, mean)
    assert isinstance(small.linear_layers()[layer], Factored)
    same_outputs(small, model, atol=1e-4)


def test_a_dcnv2_cross_matrix_is_factored_and_the_mixture_is_not():
    model = model_of("dcnv2")
    small = extract(model, with_ranks(Kept.everything(model), {"cross.layers.1.linear": 5}))
    cross = small.cross.layers[1].linear
    assert isinstance(cross, Factored) and (cross.in_features, cross.rank, cross.out_features) == (15, 5, 15)
    assert small.linear_layers()["cross.layers.1.linear"] is cross
    same_outputs(small, svd_reference(model, {"cross.layers.1.linear": 5}))
    mix = family_named("dcnv2").build(DCNv2Structure.from_dict({**model.structure.to_dict(), "cross_rank": 3,
                                                                "batch_norm": None}), seed=0).eval()
    assert "cross.layers.0.linear" not in mix.structure.linear_shapes()
    with pytest.raises(ValueError, match="cannot factorise"):
        extract(mix, with_ranks(Kept.everything(mix), {"cross.layers.0.v.0": 2}))
    small = extract(mix, with_ranks(Kept.everything(mix), {"deep.layers.0": 3}))
    same_outputs(small, svd_reference(mix, {"deep.layers.0": 3}))


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_factorised_model_pruned_again(kind):
    """A later surgery prunes a factorised model: a projection's kept output rows (multiplied into its table once
    no wider than its rank), a factored layer's second-factor rows (multiplied back once its rank exceeds
    min(in, out)); the result equals the factorised model with those outputs zeroed."""
    model = model_of(kind, batch_norm=False)
    s = model.structure
    small = extract(model, with_ranks(Kept.everything(model), {s.feature_names[0]: 3, s.feature_names[1]: 2,
                                                              "deep.layers.0": 4, "deep.layers.1": 5}))
    kept = Kept.everything(small)
    keep_dims = [0, 2] if kind != "wdl" else [1]
    kept.dims = {name: keep_dims for name in small.structure.feature_names}
    kept.neurons = {"deep.layers.0": [0, 1, 2, 3, 4, 6], "deep.layers.1": [1, 2, 4]}
    again = extract(small, kept)
    ls = again.structure
    assert ls.layer_ranks == {"deep.layers.0": 4}  # layer 1: rank 5 > min(6, 3), multiplied back
    masked = copy.deepcopy(small)
    with torch.no_grad():
        for name in masked.structure.feature_names:
            removed = [j for j in range(masked.structure.table_dims[0]) if j not in keep_dims]
            if name in masked.sparse.projections:
                masked.sparse.projections[name].weight[removed] = 0.0
            else:
                masked.sparse.tables[name].weight[:, removed] = 0.0
        for name, rows in kept.neurons.items():
            layer = masked.linear_layers()[name]
            out = layer.second if isinstance(layer, Factored) else layer
            removed = [r for r in range(out.out_features) if r not in rows]
            out.weight[removed] = 0.0
            out.bias[removed] = 0.0
    same_outputs(again, masked)
    width = len(keep_dims) + s.lookup_extra
    # table 0 (rank 3) stays projected iff its kept output is wider than 3; table 1 (rank 2) likewise
    assert ls.stored_dims[:2] == [min(3, width), min(2, width)]


@pytest.mark.parametrize("kind", FAMILIES)
def test_factor_activation(kind):
    model = model_of(kind, batch_norm=False)
    small = extract(model, with_ranks(Kept.everything(model), {"deep.layers.0": 3}), factor_activation=True)
    assert small.structure.factor_activation and small.deep.layers[0].activation
    assert structure_from_dict(small.structure.to_dict()) == small.structure
    script = torch.jit.script(small)
    dense, sparse = inputs(small)
    torch.testing.assert_close(script(dense, sparse), small(dense, sparse), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot change it"):
        extract(small, Kept.everything(small), factor_activation=False)
    with pytest.raises(ValueError, match="cannot be re-factorised"):
        extract(small, with_ranks(Kept.everything(small), {"deep.layers.0": 2}))


@pytest.mark.parametrize("kind", FAMILIES)
def test_bad_ranks_and_bases_are_refused(kind):
    model = model_of(kind)
    everything = Kept.everything(model)
    name = model.structure.feature_names[0]
    width = model.structure.lookup_dims[0]
    refused = [
        ({"head": 1}, None, "cannot factorise"),
        ({"zz": 1}, None, "cannot factorise"),
        ({name: width + 1}, None, "must lie in"),
        ({name: 0}, None, "must lie in"),
        ({"deep.layers.1": 7}, None, "must lie in"),
        ({}, {name: Basis(torch.eye(width)[:, :2])}, "does not factorise"),
        ({name: 2}, {name: Basis(torch.ones(width, 2))}, "orthonormal"),
        ({name: 2}, {name: Basis(torch.eye(width + 1)[:, :2])}, "shape"),
    ]
    for ranks, bases, message in refused:
        for fn in (extract, extracted_structure):
            with pytest.raises(ValueError, match=message):
                fn(model, with_ranks(everything, ranks), bases)


# ---- cost, structure, files, exports ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FAMILIES)
def test_measure_equals_the_resource_model_on_the_factorised_model(kind):
    model = model_of(kind)
    for ranks in (every_unit_ranks(model, 1), every_unit_ranks(model, 3), {"deep.layers.1": 2}):
        small = extract(model, with_ranks(Kept.everything(model), ranks))
        cost = measure(small)
        r = resource_model(small, [], device="cpu")
        assert r.dense == {"flops": float(cost.flops), "params": float(cost.params)}
        with torch.device("meta"):
            assert measure(family_of_model(small).build(small.structure)) == cost


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_cost_of_a_factored_layer_and_a_projected_table_by_hand(kind):
    model = model_of(kind, batch_norm=False)
    s = model.structure
    small = extract(model, with_ranks(Kept.everything(model), {"deep.layers.1": 2, "b": 3}))
    base, cost = measure(model), measure(small)
    width = s.lookup_dims[1]  # b's looked-up vector: 4 (+ 1 first-order weight)
    # deep layer 1, 8 -> 6: 2·8·6 + 6 FLOPs, 8·6 + 6 params; factored 8 -> 2 -> 6: (2·8·2 + 2) + (2·2·6 + 6)
    assert cost.flops - base.flops == (2 * 8 * 2 + 2 + 2 * 2 * 6 + 6) - (2 * 8 * 6 + 6) + 2 * 3 * width
    assert cost.params - base.params == (8 * 2 + 2 + 2 * 6 + 6) - (8 * 6 + 6) + 9 * 3 - 9 * width + 3 * width
    assert cost.table_params == base.table_params - 9 * width + 9 * 3


@pytest.mark.parametrize("kind", FAMILIES)
def test_structure_round_trips_and_old_dicts_load(kind, tmp_path):
    model = model_of(kind)
    small = extract(model, with_ranks(Kept.everything(model), every_unit_ranks(model, 2)))
    d = small.structure.to_dict()
    assert d["table_ranks"] and d["layer_ranks"] and d["family"] == model.structure.family
    assert structure_from_dict(d) == small.structure
    old = model.structure.to_dict()
    for key in ("table_ranks", "projection_bias", "layer_ranks", "factor_activation"):
        assert key in old
        del old[key]
    assert structure_from_dict(old) == model.structure  # saved before the keys: unfactorised
    kept = with_ranks(Kept.everything(model), every_unit_ranks(model, 2))
    path = save_compressed(tmp_path / "m.pt", small, kept)
    loaded = read_compressed(path)
    assert loaded.model.structure == small.structure and loaded.kept == kept
    same_outputs(loaded.model.eval(), small, atol=0)
    layers_only = extract(model, with_ranks(Kept.everything(model), {"deep.layers.1": 2}))
    with pytest.raises(ValueError, match="factored \\(low-rank\\)"):
        family_of_model(layers_only).group_sets(layers_only, ["neuron"])
    tables_only = extract(model, with_ranks(Kept.everything(model), {"a": 2}))
    with pytest.raises(ValueError, match="projected \\(factorised\\) tables"):
        family_of_model(tables_only).group_sets(tables_only, ["feature"])


@pytest.mark.parametrize("kind", FAMILIES)
def test_torchscript_and_onnx_of_a_factorised_model(kind, tmp_path):
    model = model_of(kind)
    ranks = every_unit_ranks(model, 2)
    small = extract(model, with_ranks(Kept.everything(model), ranks),
                    {"a": Basis(torch.eye(model.structure.lookup_dims[0])[:, :ranks["a"]],
                                torch.ones(model.structure.lookup_dims[0]))})
    assert small.structure.projection_bias
    script = torch.jit.script(small)
    dense, sparse = inputs(small)
    torch.testing.assert_close(script(dense, sparse), small(dense, sparse), rtol=0, atol=0)
    export_torchscript(small, tmp_path / "m.ts")  # each checks its file against the eager model first
    export_onnx(small, tmp_path / "m.onnx")


def test_invalid_factorised_structures_are_refused():
    s = structure("wdl")
    with pytest.raises(ValueError, match="table_ranks"):
        WDLStructure.from_dict({**s.to_dict(), "table_ranks": [6, 5, 5]})  # more than the looked-up width 5
    with pytest.raises(ValueError, match="not factorisable"):
        WDLStructure.from_dict({**s.to_dict(), "layer_ranks": {"head": 1}})
    with pytest.raises(ValueError, match="min\\(in, out\\)"):
        WDLStructure.from_dict({**s.to_dict(), "layer_ranks": {"deep.layers.1": 7}})
    full = WDLStructure.from_dict({**s.to_dict(), "table_ranks": [5, 5, 5], "projection_bias": True, "layer_ranks": {}})
    assert full == s  # canonical: no projection, no factored layer


# ---- the methods -----------------------------------------------------------------------------------------------
def batches(model, count: int = 4, seed: int = 0) -> list[Batch]:
    out = []
    for k in range(count):
        dense, sparse = random_inputs(model.structure, batch_size=64, seed=seed + k)
        out.append(Batch(dense, sparse, torch.zeros(64)))
    return out


def run_method(method, model, budgets):
    method.check(copy.deepcopy(model).to("meta"), budgets)
    method.setup(model, budgets)
    return finish_and_extract(method, model, calibration=batches(model))


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("method, budgets", [(lambda: LowRankSVD(), {"flops": 0.5}),
                                             (lambda: LowRankFeature(calibration_batches=3), {"flops": 0.5}),
                                             (lambda: LowRankFeature(calibration_batches=3), {"params": 0.5})],
                         ids=["svd-flops", "feature-flops", "feature-params"])
def test_low_rank_meets_the_budget_on_every_deep_family(kind, method, budgets):
    model = model_of(kind, sizes=(300, 200, 100), dim=8, deep=(32, 16))
    result = run_method(method(), model, budgets)
    cost, dense = measure(result.model), measure(model)
    ratio = {"flops": cost.flops / dense.flops, "params": cost.params / dense.params}
    for key, budget in budgets.items():
        assert ratio[key] <= budget + 1e-9
        assert result.info[key] == pytest.approx(ratio[key])
    assert result.kept.ranks and "head" not in result.kept.ranks
    assert result.model.structure.layer_ranks or result.model.structure.table_ranks


@pytest.mark.parametrize("kind", FAMILIES)
def test_feature_low_rank_at_full_rank_equals_the_original(kind):
    model = model_of(kind, sizes=(30, 20, 10))
    s = model.structure
    full = {name: min(shape) for name, shape in s.linear_shapes().items()}
    result = run_method(LowRankFeature(tables=False, ranks=full, calibration_batches=2), model, {"params": 2.0})
    assert result.model.structure.layer_ranks == full
    same_outputs(result.model.eval(), model, atol=1e-4)


@pytest.mark.parametrize("kind", FAMILIES)
def test_mixed_dim_meets_the_params_budget(kind):
    model = model_of(kind, sizes=(3, 40, 5000), dim=8, deep=(8,), batch_norm=False)
    result = run_method(MixedDim(), model, {"params": 0.5})
    cost, dense = measure(result.model), measure(model)
    assert cost.params <= 0.5 * dense.params
    assert result.info["params"] == pytest.approx(cost.params / dense.params)
    assert result.model.structure.table_ranks is not None
