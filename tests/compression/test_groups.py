import pytest
import torch

from umec_lightning.compression import (
    GroupMember,
    GroupSet,
    PackedGroups,
    apply_masks_,
    bottom_k_norm,
    build_group_sets,
    kept_from_masks,
    next_smallest,
)
from umec_lightning.models import DLRM, DLRMStructure

from .conftest import ALL, kinds_for, tiny


def inputs(model, batch=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, model.structure.num_dense, generator=g) * 5
    sparse = torch.stack([torch.randint(0, n, (batch,), generator=g) for n in model.structure.table_sizes], 1)
    return dense, sparse


# ---- the two ADMM primitives on a hand example ----------------------------------------------------


def test_bottom_k_norm_and_its_forward_difference_by_hand():
    v = torch.tensor([[4.0, 1.0, 9.0, 0.25]])
    ordered = v.sort(dim=1).values  # 0.25, 1, 4, 9
    for k, expected in [(0, 0.0), (1, 0.25), (2, 1.25), (3, 5.25), (4, 14.25)]:
        assert bottom_k_norm(ordered, torch.tensor([k])).item() == expected
    sizes = torch.tensor([4])
    # The STE: S(k+1) − S(k) = v_(k+1); at k = G the largest norm (paper A.1).
    for k in range(4):
        diff = bottom_k_norm(ordered, torch.tensor([k + 1])) - bottom_k_norm(ordered, torch.tensor([k]))
        assert next_smallest(ordered, torch.tensor([k]), sizes).item() == diff.item()
    assert next_smallest(ordered, torch.tensor([4]), sizes).item() == 9.0


def test_bottom_k_ignores_inf_padding():
    ordered = torch.tensor([[1.0, 2.0, float("inf")], [0.5, 3.0, 7.0]])
    out = bottom_k_norm(ordered, torch.tensor([2, 3]))
    assert out.tolist() == [3.0, 10.5]


def test_prox_closed_form_with_overlapping_incidence():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    # column 1 belongs to groups 0 and 1 (like a `dot` pair column in both of its features)
    inc = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float32)
    gs = GroupSet("toy", "feature", [GroupMember(w, 1, inc)])
    before = w.detach().clone()
    col = before.square().sum(0)
    assert torch.allclose(gs.norms(), torch.stack([col[0] + col[1], col[1] + col[2], col[3]]))

    a, b = 1 / 1.5, 1 / 1.2
    gs.scale_(torch.tensor([a, b, 1.0]))
    expected = before * torch.tensor([a, a * b, b, 1.0])
    torch.testing.assert_close(w.detach(), expected)

    # The packed (batched) path gives the same product of factors.
    w.data.copy_(before)
    packed = PackedGroups([gs])
    log_factor = torch.log(torch.tensor([[a, b, 1.0]]))
    packed.scale_(log_factor)
    torch.testing.assert_close(w.detach(), expected)

    # Hard prune: factor 0 zeroes every slice of the group, overlapping ones included.
    w.data.copy_(before)
    gs.zero_(torch.tensor([True, False, False]))
    assert (w[:, :2] == 0).all() and torch.equal(w.detach()[:, 2:], before[:, 2:])
    w.data.copy_(before)
    packed.zero_(torch.tensor([[True, False, False]]))
    assert (w[:, :2] == 0).all() and torch.equal(w.detach()[:, 2:], before[:, 2:])


# ---- the sets of a DLRM ------------------------------------------------------------------------------


def test_sets_of_a_dot_model():
    model = tiny("dot")
    sets = build_group_sets(model, ALL)
    assert [(gs.name, gs.kind, gs.num_groups) for gs in sets] == [
        ("features", "feature", 4),
        ("neurons:dense.layers.0", "neuron", 8),  # the last bottom layer is the shared dim's
        ("neurons:over.layers.0", "neuron", 8),  # the logit layer is never pruned
        ("dims", "dim", 4),
        ("pairs", "pair", 6),
    ]
    assert sets[0].labels == ["dense", "C1", "C2", "C3"]
    assert model.dim_gate is not None and sets[3].members[0].param is model.dim_gate
    assert all(gs.max_pruned == gs.num_groups - 1 for gs in sets)


def test_sets_of_a_cat_model():
    sets = build_group_sets(tiny("cat"), ALL - {"pair"})
    assert [(gs.name, gs.num_groups) for gs in sets] == [
        ("features", 4), ("neurons:dense.layers.0", 8), ("neurons:dense.layers.1", 4),
        ("neurons:over.layers.0", 8), ("dims:C1", 4), ("dims:C2", 4), ("dims:C3", 4),
    ]


def test_bad_kinds_are_errors():
    with pytest.raises(ValueError, match="'pair'.*`cat`"):
        build_group_sets(tiny("cat"), {"pair"})
    with pytest.raises(ValueError, match="unknown group kinds"):
        build_group_sets(tiny("dot"), {"channel"})


def test_group_norms_of_each_kind_dot_by_explicit_computation():
    model = tiny("dot")
    sets = {gs.name: gs for gs in build_group_sets(model, ALL)}
    with torch.no_grad():
        model.dim_gate.copy_(torch.tensor([1.0, 0.5, 2.0, 0.0]))
    w0 = model.over.layers[0].weight.detach()  # (8, 4 + 6): direct bottom columns, then 6 pairs
    col = w0.square().sum(0)
    # pairs in reference order: (1,0) (2,0) (2,1) (3,0) (3,1) (3,2) at columns 4..9
    pair_cols = {(1, 0): 4, (2, 0): 5, (2, 1): 6, (3, 0): 7, (3, 1): 8, (3, 2): 9}
    expected_features = []
    for row in range(4):
        cols = [c for (i, j), c in pair_cols.items() if row in (i, j)] + (list(range(4)) if row == 0 else [])
        expected_features.append(col[cols].sum())
    torch.testing.assert_close(sets["features"].norms(), torch.stack(expected_features))
    torch.testing.assert_close(sets["pairs"].norms(), col[4:])
    torch.testing.assert_close(sets["dims"].norms(), torch.tensor([1.0, 0.25, 4.0, 0.0]))
    for name in ("dense.layers.0", "over.layers.0"):
        layer = dict(model.linear_layers())[name]
        expected = layer.weight.detach().square().sum(1) + layer.bias.detach().square()
        torch.testing.assert_close(sets[f"neurons:{name}"].norms(), expected)


def test_group_norms_cat_by_explicit_computation():
    model = tiny("cat")
    sets = {gs.name: gs for gs in build_group_sets(model, ALL - {"pair"})}
    col = model.over.layers[0].weight.detach().square().sum(0)  # 4 bottom + 3 × 4 table columns
    expected = torch.stack([col[0:4].sum(), col[4:8].sum(), col[8:12].sum(), col[12:16].sum()])
    torch.testing.assert_close(sets["features"].norms(), expected)
    torch.testing.assert_close(sets["dims:C2"].norms(), col[8:12])
    last = model.dense.layers[1]
    torch.testing.assert_close(sets["neurons:dense.layers.1"].norms(),
                               last.weight.detach().square().sum(1) + last.bias.detach().square())


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_packed_norms_and_scaling_match_the_sets(interaction):
    model = tiny(interaction)
    packed = PackedGroups(build_group_sets(model, kinds_for(model)))
    grid = packed.norms()
    for l, gs in enumerate(packed.sets):
        torch.testing.assert_close(grid[l, : gs.num_groups], gs.norms())
        assert torch.isinf(grid[l, gs.num_groups :]).all()
    # Batched scaling == scaling set after set (the factors of overlapping groups multiply).
    g = torch.Generator().manual_seed(3)
    factors = torch.rand(packed.num_sets, packed.max_groups, generator=g) + 0.5
    reference = tiny(interaction)
    ref_sets = {gs.name: gs for gs in build_group_sets(reference, kinds_for(reference))}
    for l, gs in enumerate(packed.sets):
        ref_sets[gs.name].scale_(factors[l, : gs.num_groups].double())
    packed.scale_(factors.log())
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_packed_ranks_sort_each_set():
    model = tiny("cat", sizes=(10,) * 5)
    packed = PackedGroups(build_group_sets(model, ALL - {"pair"}))
    norms = packed.norms()
    values, ranks = packed.ranks(norms)
    for l, gs in enumerate(packed.sets):
        g = gs.num_groups
        expected = torch.sort(norms[l, :g], stable=True)
        torch.testing.assert_close(values[l, :g], expected.values)
        assert torch.equal(ranks[l, expected.indices], torch.arange(g))


# ---- masks -> Kept, masked model ---------------------------------------------------------------------


def test_kept_from_masks_dot_by_hand():
    model = tiny("dot")
    sets = build_group_sets(model, ALL)
    pruned = {
        "features": torch.tensor([False, False, True, False]),  # C2
        "neurons:dense.layers.0": torch.tensor([False, True] + [False] * 6),
        "neurons:over.layers.0": torch.tensor([False, False, True] + [False] * 5),
        "dims": torch.tensor([True, False, False, False]),
        "pairs": torch.tensor([False, False, False, False, True, False]),  # (3, 1)
    }
    kept = kept_from_masks(model, sets, pruned)
    assert kept.use_dense
    assert kept.feature_ids == [0, 2]
    assert kept.dims == {"C1": [1, 2, 3], "C3": [1, 2, 3]}
    assert kept.neurons == {"dense.layers.0": [0, 2, 3, 4, 5, 6, 7], "dense.layers.1": [1, 2, 3],
                            "over.layers.0": [0, 1, 3, 4, 5, 6, 7]}
    assert kept.pairs == [(1, 0), (3, 0)]  # pairs of C2 (row 2) die with it, (3, 1) is pruned


def test_kept_from_masks_cat_drops_a_table_without_dims_and_a_dead_dense_block():
    model = tiny("cat")
    sets = build_group_sets(model, ALL - {"pair"})
    kept = kept_from_masks(model, sets, {"features": torch.tensor([True, False, False, False]),
                                         "dims:C3": torch.ones(4, dtype=torch.bool),
                                         "dims:C1": torch.tensor([False, True, False, False])})
    assert not kept.use_dense and "dense.layers.0" not in kept.neurons
    assert kept.feature_ids == [0, 1]
    assert kept.dims == {"C1": [0, 2, 3], "C2": [0, 1, 2, 3]}
    assert kept.pairs is None
    with pytest.raises(ValueError, match="every neuron of over.layers.0"):
        kept_from_masks(model, sets, {"neurons:over.layers.0": torch.ones(8, dtype=torch.bool)})


def _extract(model: DLRM, kept) -> DLRM:
    """A test-local extraction (the real one lives elsewhere): the physically smaller model for `kept`,
    weights copied, the `dot` gate folded into the tables and the last bottom layer."""
    s = model.structure
    dot = s.interaction == "dot"
    names = s.feature_names
    alive = [names.index(s.sparse_names[i]) for i in kept.feature_ids]
    layers = model.linear_layers()
    bottom = [len(kept.neurons[f"dense.layers.{i}"]) for i in range(len(s.bottom))] if kept.use_dense else []
    top = [len(kept.neurons[f"over.layers.{i}"]) for i in range(len(s.top) - 1)] + [1]
    new_row = {}
    if kept.use_dense:
        new_row[0] = 0
    for n, f in enumerate(alive):
        new_row[int(s.use_dense) + f] = int(kept.use_dense) + n
    pairs = [(new_row[i], new_row[j]) for i, j in kept.pairs] if dot else None
    small = DLRMStructure(sparse_names=s.sparse_names, feature_ids=kept.feature_ids,
                          table_sizes=[s.table_sizes[f] for f in alive],
                          table_dims=[len(kept.dims[names[f]]) for f in alive], num_dense=s.num_dense,
                          bottom=bottom, top=top, interaction=s.interaction, use_dense=kept.use_dense,
                          pairs=pairs, self_interaction=s.self_interaction)
    out = DLRM(small)
    gate = model.dim_gate.detach() if model.dim_gate is not None else None
    with torch.no_grad():
        for f in alive:
            dims = kept.dims[names[f]]
            w = model.sparse.tables[names[f]].weight[:, dims]
            out.sparse.tables[names[f]].weight.copy_(w * gate[dims] if gate is not None else w)
        previous = None
        if kept.use_dense:
            previous = list(range(s.num_dense))
            for i in range(len(s.bottom)):
                keep = kept.neurons[f"dense.layers.{i}"]
                src, dst = layers[f"dense.layers.{i}"], out.dense.layers[i]
                scale = gate[keep][:, None] if (gate is not None and i == len(s.bottom) - 1) else 1.0
                dst.weight.copy_(src.weight[keep][:, previous] * scale)
                dst.bias.copy_(src.bias[keep] * (scale[:, 0] if torch.is_tensor(scale) else 1.0))
                previous = keep
        # top-MLP input columns of the kept inputs, in the small model's order
        cols = []
        bo = s.bottom_out
        if kept.use_dense:
            cols += previous
        if dot:
            index = {p: bo + c for c, p in enumerate(s.kept_pairs())}
            cols += [index[p] for p in kept.pairs]
        else:
            start = bo + torch.tensor([0] + s.table_dims).cumsum(0)
            for f in alive:
                cols += [int(start[f]) + d for d in kept.dims[names[f]]]
        previous = cols
        for i in range(len(s.top)):
            keep = kept.neurons.get(f"over.layers.{i}", [0])
            src, dst = layers[f"over.layers.{i}"], out.over.layers[i]
            dst.weight.copy_(src.weight[keep][:, previous])
            dst.bias.copy_(src.bias[keep])
            previous = keep
    return out


@pytest.mark.filterwarnings("ignore:Initializing zero-element")  # a top MLP left with no input
@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_masked_model_equals_the_extracted_model(interaction):
    g = torch.Generator().manual_seed(5)
    for trial in range(6):
        model = tiny(interaction, sizes=(10, 20, 30, 40), bottom=(8, 6, 4), top=(8, 6, 1), seed=trial)
        sets = build_group_sets(model, kinds_for(model))
        if model.dim_gate is not None:
            with torch.no_grad():
                model.dim_gate.uniform_(0.5, 1.5, generator=g)
        pruned = {}
        for gs in sets:
            k = int(torch.randint(0, gs.num_groups, (1,), generator=g))
            pruned[gs.name] = torch.randperm(gs.num_groups, generator=g) < k
        if trial == 0:
            pruned["features"][0] = True  # a dead dense block
        kept = kept_from_masks(model, sets, pruned)
        apply_masks_(model, sets, pruned)
        small = _extract(model, kept)
        dense, sparse = inputs(model)
        torch.testing.assert_close(model(dense, sparse), small(dense, sparse), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
@pytest.mark.parametrize("dense_fraction", [0.0, 0.25, 1.0])  # always whole sources / default / always indexed
def test_host_prox_equals_scale_and_touches_only_shrunk_sets(interaction, dense_fraction, monkeypatch):
    """The CPU prox (`_prox_bottom_k_`, NumPy on the host) == `scale_` with the bottom-k mask, whether it
    multiplies whole sources or gathers the shrunk rows/columns, and leaves the parameters of sets with
    k = 0 or a zero log factor bit-identical."""
    monkeypatch.setattr(PackedGroups, "DENSE_PROX_FRACTION", dense_fraction)
    model, reference = tiny(interaction), tiny(interaction)
    packed = PackedGroups(build_group_sets(model, kinds_for(model)))
    ref_packed = PackedGroups(build_group_sets(reference, kinds_for(reference)))
    _, ranks = packed.ranks(packed.norms())
    g = torch.Generator().manual_seed(5)
    k = (torch.rand(packed.num_sets, generator=g) * packed.num_groups).long()
    log_factor = -torch.rand(packed.num_sets, generator=g, dtype=torch.float64)
    names = [gs.name for gs in packed.sets]
    idle = names.index("neurons:dense.layers.0")
    log_factor[idle] = 0.0  # y = 0: no shrinkage
    packed._prox_bottom_k_(ranks.numpy(), k.numpy(), log_factor.numpy())
    ref_packed.scale_(torch.where(ranks < k[:, None], log_factor[:, None], 0.0))
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)
    untouched = tiny(interaction)
    assert torch.equal(model.dense.layers[0].weight, untouched.dense.layers[0].weight)
    nothing = tiny(interaction)
    nothing_packed = PackedGroups(build_group_sets(nothing, kinds_for(nothing)))
    nothing_packed._prox_bottom_k_(ranks.numpy(), k.numpy() * 0, log_factor.numpy())
    after = dict(nothing.named_parameters())
    for name, q in untouched.named_parameters():
        assert torch.equal(after[name], q), name
