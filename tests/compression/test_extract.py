import random

import pytest
import torch

from umec_lightning.compression.export import random_inputs
from umec_lightning.compression.extract import apply_kept_masks_, extract, extracted_structure, masked_copy
from umec_lightning.compression.kept import Kept
from umec_lightning.models import DLRM, dense_structure, measure

NAMES = ["C1", "C2", "C3", "C4"]


def make_model(interaction="dot", top=(8, 1), self_interaction=False, sparse_grad=True, seed=0):
    structure = dense_structure(
        sparse_names=NAMES, table_sizes=[10, 20, 30, 40], embedding_dim=4, bottom=[8, 4], top=list(top),
        num_dense=3, interaction=interaction, self_interaction=self_interaction,
    )
    return DLRM(structure, sparse_grad=sparse_grad, seed=seed)


def kept_for(model, case, seed=0):
    """A Kept for one kind of removal (indices in `model`'s numbering)."""
    rng = random.Random(seed)
    kept = Kept.everything(model)
    dot = model.structure.interaction == "dot"

    def some(n, k):
        return sorted(rng.sample(range(n), k))

    if case in ("neurons", "all", "random"):
        kept.neurons["dense.layers.0"] = some(8, 5)
        kept.neurons["over.layers.0"] = some(8, 3)
        if not dot:  # under `dot` the bottom output is the shared dim
            kept.neurons["dense.layers.1"] = some(4, 3)
        if len(model.structure.top) > 2:
            kept.neurons["over.layers.1"] = some(model.structure.top[1], 2)
    if case in ("features", "all"):
        kept.feature_ids = [1, 3]
    if case == "dense_block":
        kept.use_dense = False
    if case == "one_feature":
        kept.feature_ids = [2]
    if case == "one_feature_no_dense":
        kept.feature_ids, kept.use_dense = [2], False
    if case in ("dims", "all"):
        if dot:
            kept.dims = {n: [0, 2, 3] for n in NAMES}
        else:
            kept.dims = {"C1": [0, 1, 2, 3], "C2": [1], "C3": [0, 3], "C4": [0, 1, 3]}
    if case in ("pairs", "all") and dot:
        kept.pairs = [p for k, p in enumerate(model.structure.all_pairs()) if k % 3 != 1]
    if case == "random":
        kept.use_dense = rng.random() < 0.7
        kept.feature_ids = some(4, rng.randint(1, 4))
        if dot:
            dims = some(4, rng.randint(1, 4))
            kept.dims = {n: dims for n in NAMES}
            # A bottom-output neuron may be pruned while its dim stays (kept as a zero row).
            kept.neurons["dense.layers.1"] = some(4, rng.randint(1, 4))
            kept.pairs = [p for p in model.structure.all_pairs() if rng.random() < 0.6]
        else:
            kept.dims = {n: some(4, rng.randint(0, 4)) for n in NAMES}
            if not any(kept.dims[NAMES[f]] for f in kept.feature_ids) and not kept.use_dense:
                kept.dims[NAMES[kept.feature_ids[0]]] = [1]
    return kept


def assert_same_outputs(a, b, atol=1e-5, batch_size=64):
    dense, sparse = random_inputs(a.structure, batch_size=batch_size, seed=1)
    dense = dense * 3 - 1  # negative inputs too, so ReLUs cut somewhere
    with torch.no_grad():
        diff = (a(dense, sparse) - b(dense, sparse)).abs().max().item()
    assert diff <= atol, diff


CASES = ["neurons", "features", "dense_block", "one_feature", "dims", "pairs", "all", "random"]


@pytest.mark.parametrize("interaction", ["dot", "cat"])
@pytest.mark.parametrize("case", CASES)
def test_extract_equals_masked(interaction, case):
    if case == "pairs" and interaction == "cat":
        pytest.skip("pairs only exist under dot")
    model = make_model(interaction, top=(8, 6, 1) if case == "all" else (8, 1))
    for seed in range(3 if case == "random" else 1):
        kept = kept_for(model, case, seed)
        masked, small = masked_copy(model, kept), extract(model, kept)
        assert small.dim_gate is None
        assert_same_outputs(masked, small)
        assert small.structure == extracted_structure(model, kept)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # a top MLP with no input left
@pytest.mark.parametrize("self_interaction", [False, True])
def test_dot_folds_a_signed_gate(self_interaction):
    model = make_model("dot", self_interaction=self_interaction)
    with torch.no_grad():
        model.enable_dim_gate().copy_(torch.tensor([0.5, -1.5, 0.0, 2.0]))
    for case in ("everything", "all", "one_feature_no_dense", "dense_block"):
        kept = kept_for(model, case)
        small = extract(model, kept)
        assert small.dim_gate is None
        assert_same_outputs(masked_copy(model, kept), small)


def test_dense_kept_is_identity():
    for interaction in ("dot", "cat"):
        model = make_model(interaction)
        small = extract(model, Kept.everything(model))
        assert small.structure == model.structure
        for (name, a), (_, b) in zip(model.state_dict().items(), small.state_dict().items()):
            assert torch.equal(a, b), name
        assert_same_outputs(model, small, atol=0.0)
        assert_same_outputs(masked_copy(model, Kept.everything(model)), model, atol=0.0)


def test_masked_copy_ignores_removed_parts_and_leaves_model_alone():
    model = make_model("dot")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = kept_for(model, "all")
    masked = masked_copy(model, kept)
    assert model.dim_gate is None and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert masked.dim_gate is not None and masked.dim_gate.tolist() == [1.0, 0.0, 1.0, 1.0]
    # Scrambling the removed tables and the removed dim must not change the masked model's outputs.
    scrambled = masked_copy(model, kept)
    with torch.no_grad():
        for name in ("C1", "C3"):
            scrambled.sparse.tables[name].weight.normal_()
        for name in ("C2", "C4"):
            scrambled.sparse.tables[name].weight[:, 1].normal_()
    assert_same_outputs(masked, scrambled, atol=0.0)
    # In place: same result.
    assert_same_outputs(apply_kept_masks_(make_model("dot"), kept), masked, atol=0.0)


def test_extracted_cost_by_hand():
    model = make_model("cat")
    kept = Kept.everything(model)
    kept.feature_ids = [0, 2]
    kept.dims["C3"] = [1, 3]
    kept.neurons.update({"dense.layers.0": [1, 2, 5], "dense.layers.1": [0, 2], "over.layers.0": [0, 3, 4, 7]})
    cost = measure(extract(model, kept))
    # bottom 3->3->2, top (2 + 4 + 2)->4->1; tables 10x4 and 30x2; `cat` interaction costs nothing.
    assert cost.flops == (2 * 3 * 3 + 3) + (2 * 3 * 2 + 2) + (2 * 8 * 4 + 4) + (2 * 4 * 1 + 1)
    assert cost.table_params == 10 * 4 + 30 * 2
    assert cost.params == (9 + 3) + (6 + 2) + (32 + 4) + (4 + 1) + 100

    model = make_model("dot")
    kept = Kept.everything(model)
    kept.feature_ids = [0, 2]
    kept.dims = {n: [0, 2, 3] for n in NAMES}
    kept.neurons.update({"dense.layers.0": [1, 2, 5], "over.layers.0": [0, 3, 4, 7]})
    small = extract(model, kept)
    cost = measure(small)
    # bottom 3->3->3 (the shared dim), 3 vectors -> 3 pairs of 2*3 FLOPs, top (3 + 3)->4->1.
    assert small.structure.pairs is None and small.interaction.li.numel() == 3
    assert cost.flops == 2 * (2 * 3 * 3 + 3) + 3 * 2 * 3 + (2 * 6 * 4 + 4) + (2 * 4 * 1 + 1)
    assert cost.table_params == 10 * 3 + 30 * 3
    assert cost.params == 2 * 12 + (24 + 4) + (4 + 1) + 120


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_extracted_is_smaller_fresh_and_trainable(interaction):
    model = make_model(interaction)
    small = extract(model, kept_for(model, "all"))
    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(small) < count(model)
    assert measure(small).flops < measure(model).flops
    assert measure(small).table_params < measure(model).table_params
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert all(p.requires_grad and p.untyped_storage().data_ptr() not in own for p in small.parameters())
    dense, sparse = random_inputs(model.structure, 16)
    small(dense, sparse).sum().backward()
    assert all(t.grad.is_sparse for t in small.sparse.tables.values())


def test_sparse_grad_flag_is_kept():
    model = make_model("cat", sparse_grad=False)
    small = extract(model, kept_for(model, "features"))
    assert not any(t.sparse for t in small.sparse.tables.values())


def test_pairs_renumbered_and_chainable():
    model = make_model("dot")
    kept = Kept.everything(model)
    kept.feature_ids = [1, 3]  # T rows 2 and 4 survive with row 0
    kept.pairs = [(4, 2), (3, 1), (2, 0)]  # (3, 1) is dead: both endpoints dropped
    small = extract(model, kept)
    assert small.structure.feature_ids == [1, 3]
    assert small.structure.pairs == [(1, 0), (2, 1)]  # renumbered, in the model's pair order
    assert_same_outputs(masked_copy(model, kept), small)
    # The result is a DLRM like any other: extract again, in its own numbering.
    again = Kept.everything(small)
    again.pairs = [(2, 1)]
    assert_same_outputs(masked_copy(small, again), extract(small, again))
    assert extract(small, again).structure.pairs == [(2, 1)]


def test_bad_kept_is_refused():
    model = make_model("dot")
    kept = Kept.everything(model)
    kept.feature_ids = [7]
    with pytest.raises(ValueError, match="not read by the model"):
        extract(model, kept)
    kept = Kept.everything(model)
    kept.dims["C2"] = [0, 1]
    with pytest.raises(ValueError, match="shared list"):
        extract(model, kept)
    kept = Kept.everything(model)
    kept.neurons["over.layers.1"] = [0]
    with pytest.raises(ValueError, match="logit"):
        masked_copy(model, kept)
    kept = Kept.everything(model)
    kept.neurons["dense.layers.0"] = [9]
    with pytest.raises(ValueError, match="dense.layers.0"):
        extract(model, kept)


# ---- ranks: truncated-SVD factorisation, and models that already have projections ---------------------


def with_rank(model, name, rank, seed=0):
    """Overwrite table `name` of `model` with a random matrix of exactly `rank` (its kept columns' rank)."""
    table = model.sparse.tables[name].weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        table.copy_(torch.randn(table.shape[0], rank, generator=gen) @ torch.randn(rank, table.shape[1],
                                                                                   generator=gen))
    return model


def ranked_kept(model, ranks):
    kept = Kept.everything(model)
    kept.ranks = dict(ranks)
    return kept


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_full_rank_factorisation_is_exact(interaction):
    model = with_rank(with_rank(make_model(interaction), "C2", 2), "C4", 1, seed=1)
    kept = ranked_kept(model, {"C2": 2, "C4": 1, "C3": 4})  # C3 at its width: left as it is
    small = extract(model, kept)
    assert small.structure == extracted_structure(model, kept)
    assert [t.embedding_dim for t in small.sparse.tables.values()] == [4, 2, 4, 1]
    if interaction == "dot":  # the interaction needs the shared width: projections r -> 4
        assert small.structure.table_dims == [4] * 4 and small.structure.table_ranks == [4, 2, 4, 1]
        assert sorted(small.sparse.projections) == ["C2", "C4"]
    else:  # folded into the top MLP: narrower tables, no projection
        assert small.structure.table_dims == [4, 2, 4, 1] and small.structure.table_ranks is None
        assert len(small.sparse.projections) == 0
        assert small.over.layers[0].in_features == 4 + 4 + 2 + 4 + 1
    assert_same_outputs(model, small)
    assert torch.equal(small.sparse.tables["C3"].weight, model.sparse.tables["C3"].weight)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_truncation_is_the_best_rank_r_approximation(interaction):
    model = make_model(interaction)
    small = extract(model, ranked_kept(model, {"C4": 2}))
    table = model.sparse.tables["C4"].weight.detach().double()
    singular = torch.linalg.svdvals(table)
    if interaction == "dot":
        approx = small.sparse.tables["C4"].weight.double() @ small.sparse.projections["C4"].weight.double().T
        err = (table - approx).norm()
        assert abs(err.item() - singular[2:].norm().item()) < 1e-5  # Eckart–Young: the tail's energy
    # Both: the stored columns are E V_r, whose norms are the top singular values.
    stored = small.sparse.tables["C4"].weight.detach().double()
    torch.testing.assert_close(stored.norm(dim=0), singular[:2], atol=1e-5, rtol=1e-5)


def test_factorisation_cost_by_hand():
    model = make_model("dot")
    cost = measure(extract(model, ranked_kept(model, {"C4": 2})))
    base = measure(model)
    assert cost.table_params == base.table_params - 40 * 2
    assert cost.params == base.params - 40 * 2 + 2 * 4  # + the 2 -> 4 projection
    assert cost.flops == base.flops + 2 * 2 * 4
    model = make_model("cat")
    cost = measure(extract(model, ranked_kept(model, {"C4": 2})))
    base = measure(model)
    # folded: the table is 40 x 2 and over.layers.0 (8 outputs) reads 2 columns of it instead of 4.
    assert cost.table_params == base.table_params - 40 * 2
    assert cost.params == base.params - 40 * 2 - 8 * 2
    assert cost.flops == base.flops - 2 * 8 * 2


def test_factorisation_is_deterministic_and_chunking_changes_nothing(monkeypatch):
    import umec_lightning.compression.extract as ex

    model = make_model("dot")
    kept = ranked_kept(model, {"C4": 3, "C1": 1})
    a, b = extract(model, kept), extract(model, kept)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    monkeypatch.setattr(ex, "GRAM_CHUNK", 7)  # several row blocks per table
    c = extract(model, kept)
    for (name, x), y in zip(a.state_dict().items(), c.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_ranks_combine_with_other_removals(interaction):
    model = make_model(interaction, top=(8, 6, 1))
    kept = kept_for(model, "all")
    name = NAMES[kept.feature_ids[-1]]
    width = len(kept.dims[name])
    with torch.no_grad():  # make the kept columns of that table rank 1
        w = model.sparse.tables[name].weight
        w[:, kept.dims[name]] = torch.randn(w.shape[0], 1) @ torch.randn(1, width)
    kept.ranks = {name: 1, "C1": 1}  # C1 is dropped: its rank is ignored like its dims
    small = extract(model, kept)
    assert small.structure == extracted_structure(model, kept)
    assert small.sparse.tables[name].embedding_dim == 1
    plain = Kept.from_dict({**kept.to_dict(), "ranks": {}})
    assert_same_outputs(masked_copy(model, plain), small)


def projected_model(interaction, seed=0):
    """A model that already has projections (as after a factorising extraction, or built that way)."""
    from umec_lightning.models import DLRMStructure

    s = make_model(interaction).structure.to_dict()
    s["table_ranks"] = [4, 2, 4, 3]
    return DLRM(DLRMStructure.from_dict(s), seed=seed)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_projected_model_extracts_again(interaction):
    model = projected_model(interaction)
    same = extract(model, Kept.everything(model))  # what the pipeline does after every stage
    assert same.structure == model.structure
    for (name, a), (_, b) in zip(model.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), name
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert all(p.untyped_storage().data_ptr() not in own for p in same.parameters())
    for case in CASES:
        if case == "pairs" and interaction == "cat":
            continue
        for seed in range(3 if case == "random" else 1):
            kept = kept_for(model, case, seed)
            small = extract(model, kept)
            assert small.structure == extracted_structure(model, kept)
            assert_same_outputs(masked_copy(model, kept), small)


def test_projection_wider_than_its_kept_output_is_multiplied_in():
    model = projected_model("cat")
    kept = Kept.everything(model)
    kept.dims.update({"C2": [1, 3], "C4": [0, 1, 2]})  # C2: 2 of 4 outputs at rank 2; C4: 3 at rank 3
    small = extract(model, kept)
    assert len(small.sparse.projections) == 0 and small.structure.table_ranks is None
    assert [t.embedding_dim for t in small.sparse.tables.values()] == [4, 2, 4, 3]
    assert_same_outputs(masked_copy(model, kept), small)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_projected_model_factorised_further(interaction):
    model = projected_model(interaction)
    with torch.no_grad():  # C4 = S Pᵀ with S of rank 2: its outputs have rank 2 < its stored width 3
        model.sparse.tables["C4"].weight[:, 2] = model.sparse.tables["C4"].weight[:, :2].sum(1)
    kept = ranked_kept(model, {"C4": 2, "C2": 3})  # C2 is already stored at 2 <= 3: kept as it is
    small = extract(model, kept)
    assert small.structure == extracted_structure(model, kept)
    assert small.sparse.tables["C4"].embedding_dim == small.sparse.tables["C2"].embedding_dim == 2
    assert ("C4" in small.sparse.projections) == (interaction == "dot")
    assert_same_outputs(model, small)


def test_dot_gate_folds_into_projections():
    model = projected_model("dot")
    with torch.no_grad():
        model.enable_dim_gate().copy_(torch.tensor([0.5, -1.5, 0.0, 2.0]))
    for case in ("everything", "all", "dims", "random"):
        kept = kept_for(model, case)
        small = extract(model, kept)
        assert small.dim_gate is None
        assert_same_outputs(masked_copy(model, kept), small)


def test_bad_ranks_are_refused():
    model = make_model("cat")
    for ranks, match in [({"C9": 2}, "ranks name tables"), ({"C2": 0}, r"rank of table C2 must lie in \[1, 4\]"),
                         ({"C2": 5}, "rank of table C2")]:
        with pytest.raises(ValueError, match=match):
            extract(model, ranked_kept(model, ranks))
    kept = ranked_kept(model, {"C2": 2})
    kept.dims["C2"] = [0]
    with pytest.raises(ValueError, match=r"\[1, 1\]"):
        extracted_structure(model, kept)
    with pytest.raises(ValueError, match="masks cannot express"):
        masked_copy(model, ranked_kept(model, {"C2": 2}))
    with pytest.raises(ValueError, match="masks cannot express"):
        apply_kept_masks_(model, ranked_kept(model, {"C2": 2}))


def test_kept_ranks_round_trip_and_old_dicts_load():
    model = make_model("dot")
    kept = ranked_kept(model, {"C2": 2})
    assert Kept.from_dict(kept.to_dict()) == kept
    old = Kept.everything(model).to_dict()
    old.pop("ranks")  # written before ranks existed
    assert Kept.from_dict(old).ranks == {} and Kept.from_dict(old) == Kept.everything(model)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_dot_dims_pruned_while_every_table_is_dropped_stay_pruned():
    """Under `dot` the kept dims live on the tables and on the bottom output. With every table gone only the
    bottom output's kept rows carry them: extraction must not bring all D back (the resource model, which
    met the budget, counts D')."""
    from umec_lightning.compression import ResourceModel, build_group_sets, kept_from_masks

    model = make_model("dot")
    sets = build_group_sets(model, {"feature", "dim"})
    masks = {"features": torch.tensor([False, True, True, True, True]),
             "dims": torch.tensor([True, False, True, False])}
    kept = kept_from_masks(model, sets, masks)
    assert kept.feature_ids == [] and kept.use_dense
    small = extract(model, kept)
    assert small.structure.bottom[-1] == 2
    cost = measure(small)
    assert ResourceModel(model, sets).of_masks(masks) == {"flops": cost.flops, "params": cost.params}


# ---- low-rank Linear layers, bases with means ------------------------------------------------------------
from umec_lightning.compression.extract import Basis, extracted_fractions  # noqa: E402
from umec_lightning.models import DLRMStructure, Factored  # noqa: E402


def full_ranks(model):
    """Every Linear at r = min(in, out)."""
    return {name: min(m.in_features, m.out_features) for name, m in model.linear_layers().items()}


def factored_model(interaction, ranks=None, activation=False, seed=0):
    s = make_model(interaction).structure.to_dict()
    s["layer_ranks"] = dict(ranks or {"dense.layers.0": 2, "over.layers.0": 3})
    s["factor_activation"] = activation
    return DLRM(DLRMStructure.from_dict(s), seed=seed)


def orthonormal(rows, cols, seed=0):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
    return q


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_full_rank_layer_factorisation_is_exact(interaction):
    model = make_model(interaction)
    kept = ranked_kept(model, full_ranks(model))  # dense.layers.0 is 3 -> 8: out > in, the bias is kept
    small = extract(model, kept)
    assert small.structure == extracted_structure(model, kept)
    assert small.structure.layer_ranks == full_ranks(model)
    assert all(isinstance(m, Factored) for m in small.linear_layers().values())
    assert_same_outputs(model, small)
    # With bases: a square orthonormal U (any rotation), with and without a mean.
    bases = {"over.layers.0": Basis(orthonormal(8, 8)), "dense.layers.1": Basis(orthonormal(4, 4, 1), torch.randn(4))}
    kept = ranked_kept(model, {"over.layers.0": 8, "dense.layers.1": 4})
    small = extract(model, kept, bases)
    assert small.structure == extracted_structure(model, kept, bases)
    assert_same_outputs(model, small)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_full_rank_layers_combine_with_pruning(interaction):
    model = make_model(interaction)
    for case in CASES:
        if case == "pairs" and interaction == "cat":
            continue
        kept = kept_for(model, case, seed=2)
        reference = masked_copy(model, kept)
        plain = extract(model, kept)
        ranks = full_ranks(plain)
        if not kept.use_dense:
            ranks = {n: r for n, r in ranks.items() if n.startswith("over.")}
        kept.ranks = ranks  # the pruned layers' full ranks (in the numbering of `model`, shapes of `plain`)
        small = extract(model, kept)
        assert small.structure == extracted_structure(model, kept)
        assert small.structure.layer_ranks == ranks
        assert_same_outputs(reference, small)


@pytest.mark.parametrize("name", ["dense.layers.0", "over.layers.0"])
def test_truncated_layer_is_the_best_rank_r_approximation(name):
    model = make_model("cat")
    small = extract(model, ranked_kept(model, {name: 2}))
    layer, original = small.linear_layers()[name], model.linear_layers()[name]
    assert isinstance(layer, Factored) and layer.rank == 2
    w, b = original.weight.detach().double(), original.bias.detach().double()
    u = torch.linalg.svd(w)[0][:, :2]
    x = torch.randn(16, w.shape[1], dtype=torch.float64)
    expected = (x @ w.T) @ u @ u.T + b  # U_r U_rᵀ W x + b: the best rank-r W, the bias kept exactly
    with torch.no_grad():
        got = layer(x.float()).double()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    product = layer.second.weight.double() @ layer.first.weight.double()
    singular = torch.linalg.svdvals(w)
    assert abs((w - product).norm().item() - singular[2:].norm().item()) < 1e-5  # Eckart–Young
    assert torch.equal(layer.first.bias, torch.zeros(2)) and torch.allclose(layer.second.bias, original.bias)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_a_basis_with_a_mean_reproduces_outputs_in_its_span(interaction):
    model = make_model(interaction)
    u, mean = orthonormal(8, 3, seed=4), torch.randn(8)
    layer = model.over.layers[0]
    with torch.no_grad():  # y = W x + b lies in span(U) + μ for every x
        layer.weight.copy_(u @ torch.randn(3, layer.in_features))
        layer.bias.copy_(u @ torch.randn(3) + mean)
    kept = ranked_kept(model, {"over.layers.0": 3})
    small = extract(model, kept, {"over.layers.0": Basis(u, mean)})
    f = small.over.layers[0]
    assert f.rank == 3
    torch.testing.assert_close(f.second.weight, u)
    torch.testing.assert_close(f.second.bias, mean)
    assert_same_outputs(model, small)
    # The SVD default also reproduces it (rank(W) = 3), but a wrong basis does not.
    assert_same_outputs(model, extract(model, kept))
    wrong = extract(model, kept, {"over.layers.0": Basis(u)})
    dense, sparse = random_inputs(model.structure, batch_size=16, seed=1)
    with torch.no_grad():
        assert (wrong(dense, sparse) - model(dense, sparse)).abs().max() > 1e-3


def test_a_basis_lives_in_the_pruned_output_space():
    model = make_model("cat")
    kept = kept_for(model, "neurons")
    rows = kept.neurons["over.layers.0"]  # 3 of 8 kept
    u, mean = orthonormal(len(rows), 2, seed=5), torch.randn(len(rows))
    layer = model.over.layers[0]
    with torch.no_grad():
        layer.weight[rows] = u @ torch.randn(2, layer.in_features)
        layer.bias[rows] = u @ torch.randn(2) + mean
    kept.ranks = {"over.layers.0": 2}
    small = extract(model, kept, {"over.layers.0": Basis(u, mean)})
    assert small.structure.top == [3, 1] and small.structure.layer_ranks == {"over.layers.0": 2}
    assert_same_outputs(masked_copy(model, Kept.from_dict({**kept.to_dict(), "ranks": {}})), small)
    with pytest.raises(ValueError, match=r"U has shape \(8, 2\), expected \(3, 2\)"):
        extract(model, kept, {"over.layers.0": Basis(orthonormal(8, 2))})


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_a_table_basis_with_a_mean(interaction):
    model = make_model(interaction)
    v, mean = orthonormal(4, 2, seed=6), torch.randn(4)
    table = model.sparse.tables["C3"].weight
    with torch.no_grad():  # every row of E in span(V) + μ
        table.copy_(torch.randn(table.shape[0], 2) @ v.T + mean)
    kept = ranked_kept(model, {"C3": 2, "C1": 2})  # C1 with the default (Gram) basis, no mean
    bases = {"C3": Basis(v, mean)}
    small = extract(model, kept, bases)
    assert small.structure == extracted_structure(model, kept, bases)
    torch.testing.assert_close(small.sparse.tables["C3"].weight, (table.detach() - mean) @ v)
    if interaction == "dot":
        assert small.structure.projection_bias
        torch.testing.assert_close(small.sparse.projections["C3"].bias, mean)
        assert torch.equal(small.sparse.projections["C1"].bias, torch.zeros(4))
    else:  # folded: W_cols μ moved into over.layers.0's bias
        assert not small.structure.projection_bias and len(small.sparse.projections) == 0
    # Exact for C3; C1's truncation changes the outputs, so compare against a model where only C3 changes.
    only = ranked_kept(model, {"C3": 2})
    assert_same_outputs(model, extract(model, only, bases))
    assert extracted_fractions(model, only, bases)["params"] < 1
    # Extracting again (a model with projection biases) is the identity, and pruning it stays exact.
    if interaction == "dot":
        again = extract(small, Kept.everything(small))
        assert again.structure == small.structure
        assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), again.state_dict().values()))
        for case in ("all", "random", "dims"):
            k = kept_for(small, case)
            assert_same_outputs(masked_copy(small, k), extract(small, k))
        # Re-factorising a biased projection with the default basis keeps E's best rank-r approximation.
        with torch.no_grad():
            small.sparse.projections["C3"].bias.copy_(mean)
        e = small.sparse.tables["C3"].weight.double() @ small.sparse.projections["C3"].weight.double().T + mean.double()
        once = extract(small, ranked_kept(small, {"C3": 1}))
        approx = once.sparse.tables["C3"].weight.double() @ once.sparse.projections["C3"].weight.double().T
        assert abs((e - approx).norm().item() - torch.linalg.svdvals(e)[1:].norm().item()) < 1e-4


@pytest.mark.parametrize("interaction", ["dot", "cat"])
@pytest.mark.parametrize("activation", [False, True])
def test_factored_model_extracts_again(interaction, activation):
    model = factored_model(interaction, activation=activation)
    same = extract(model, Kept.everything(model))
    assert same.structure == model.structure
    for (name, a), (_, b) in zip(model.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), name
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert all(p.untyped_storage().data_ptr() not in own for p in same.parameters())
    for case in CASES:  # pruning a factored layer's neurons and inputs: rows of `second`, columns of `first`
        if case == "pairs" and interaction == "cat":
            continue
        for seed in range(3 if case == "random" else 1):
            kept = kept_for(model, case, seed)
            if activation and min(extracted_structure(make_model(interaction), kept)
                                  .linear_shapes()["over.layers.0"]) < 3:
                with pytest.raises(ValueError, match="neither stay factored nor be multiplied back"):
                    extract(model, kept)  # a rank-3 layer with a ReLU inside, pruned below 3 wide
                continue
            small = extract(model, kept)
            assert small.structure == extracted_structure(model, kept)
            assert_same_outputs(masked_copy(model, kept), small)


def test_refactorising_and_multiplying_back():
    model = factored_model("cat", {"dense.layers.0": 3, "over.layers.0": 3})
    kept = ranked_kept(model, {"dense.layers.0": 2, "over.layers.0": 3})
    small = extract(model, kept)  # from the product of the factors (rank ≤ 3): 3 again is exact
    assert small.structure.layer_ranks == {"dense.layers.0": 2, "over.layers.0": 3}
    w = model.dense.layers[0].second.weight.double() @ model.dense.layers[0].first.weight.double()
    got = small.dense.layers[0].second.weight.double() @ small.dense.layers[0].first.weight.double()
    assert abs((w - got).norm().item() - torch.linalg.svdvals(w)[2:].norm().item()) < 1e-5
    exact = extract(model, ranked_kept(model, {"over.layers.0": 3}))
    assert_same_outputs(model, exact)
    # Pruning over.layers.0 to 2 neurons leaves its rank 3 wider than the layer: multiplied back.
    kept = Kept.everything(model)
    kept.neurons["over.layers.0"] = [1, 5]
    small = extract(model, kept)
    assert small.structure.layer_ranks == {"dense.layers.0": 3}
    assert isinstance(small.over.layers[0], torch.nn.Linear)
    assert_same_outputs(masked_copy(model, kept), small)
    relu = factored_model("cat", {"over.layers.0": 3}, activation=True)
    with pytest.raises(ValueError, match="neither stay factored nor be multiplied back"):
        extract(relu, kept)
    with pytest.raises(ValueError, match="cannot be re-factorised"):
        extract(relu, ranked_kept(relu, {"over.layers.0": 2}))
    with pytest.raises(ValueError, match="cannot change it"):
        extract(relu, Kept.everything(relu), factor_activation=False)


def test_factor_activation_puts_a_relu_between_new_factors():
    model = make_model("dot")
    kept = ranked_kept(model, {"dense.layers.0": 3})
    small = extract(model, kept, factor_activation=True)
    assert small.structure == extracted_structure(model, kept, factor_activation=True)
    assert small.structure.factor_activation and small.dense.layers[0].activation
    plain = extract(model, kept)
    assert plain.structure.layer_ranks == small.structure.layer_ranks and not plain.structure.factor_activation
    for (name, a), (_, b) in zip(plain.state_dict().items(), small.state_dict().items()):
        assert torch.equal(a, b), name  # same factors, only the ReLU differs
    f = small.dense.layers[0]
    x = torch.randn(5, 3)
    with torch.no_grad():
        torch.testing.assert_close(f(x), f.second(torch.relu(f.first(x))))


def test_factored_cost_matches_extracted_fractions():
    model = make_model("cat")
    kept = ranked_kept(model, {"dense.layers.0": 2, "over.layers.0": 3})
    small, base = measure(extract(model, kept)), measure(model)
    n_in = model.structure.interaction_out
    assert small.params == base.params - (3 * 8 + 8) - (n_in * 8 + 8) \
        + (3 * 2 + 2 + 2 * 8 + 8) + (n_in * 3 + 3 + 3 * 8 + 8)
    assert small.flops == base.flops - (2 * 3 * 8 + 8) - (2 * n_in * 8 + 8) \
        + (2 * 3 * 2 + 2 + 2 * 2 * 8 + 8) + (2 * n_in * 3 + 3 + 2 * 3 * 8 + 8)
    reached = extracted_fractions(model, kept)
    assert reached == {"flops": small.flops / base.flops, "params": small.params / base.params}


def test_bad_layer_ranks_and_bases_are_refused():
    model = make_model("dot")
    for ranks, match in [
        ({"dense.layers.9": 2}, "ranks name tables or Linear layers the model does not have"),
        ({"dense.layers.0": 0}, r"Kept rank 0 of dense.layers.0 must lie in \[1, 3\]"),
        ({"dense.layers.0": 4}, r"\[1, 3\] = \[1, min\(in, out\)\] of the extracted layer \(3 -> 8\)"),
        ({"over.layers.1": 2}, r"\[1, 1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            extract(model, ranked_kept(model, ranks))
    kept = kept_for(model, "neurons")
    kept.ranks = {"dense.layers.0": 5}  # 3 -> 5 kept neurons: rank at most 3
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        extracted_structure(model, kept)
    kept = ranked_kept(model, {"dense.layers.0": 2})
    kept.use_dense = False
    with pytest.raises(ValueError, match="drops the dense block"):
        extract(model, kept)
    kept = ranked_kept(model, {"over.layers.0": 2, "C1": 2})
    for bases, match in [
        ({"over.layers.1": Basis(torch.ones(1, 1))}, "does not factorise"),
        ({"over.layers.0": Basis(orthonormal(8, 3))}, r"U has shape \(8, 3\), expected \(8, 2\)"),
        ({"over.layers.0": Basis(orthonormal(8, 2).T)}, r"expected \(8, 2\)"),
        ({"over.layers.0": Basis(torch.ones(8, 2))}, "not orthonormal"),
        ({"over.layers.0": Basis(orthonormal(8, 2).long())}, "2-D float tensor"),
        ({"over.layers.0": Basis(orthonormal(8, 2), torch.zeros(7))}, r"mean must be a float tensor of shape \(8,\)"),
        ({"over.layers.0": (orthonormal(8, 2), None)}, "must be an extract.Basis"),
        ({"C1": Basis(orthonormal(4, 3))}, r"expected \(4, 2\)"),
        ({"C1": Basis(orthonormal(4, 2), torch.zeros(4, 1))}, "mean must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            extract(model, kept, bases)
        with pytest.raises(ValueError, match=match):
            extracted_structure(model, kept, bases)
    with pytest.raises(ValueError, match="masks cannot express"):
        masked_copy(model, ranked_kept(model, {"over.layers.0": 2}))


def test_group_sets_refuse_factored_models():
    from umec_lightning.compression.groups import build_group_sets

    with pytest.raises(ValueError, match="factored"):
        build_group_sets(factored_model("dot"), {"neuron"})
