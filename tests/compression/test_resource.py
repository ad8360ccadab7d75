import numpy as np
import pytest
import torch

from umec_lightning.compression import ResourceModel, build_group_sets, kept_from_masks
from umec_lightning.models import DLRM, DLRMStructure, dense_structure, measure

from .conftest import ALL, kinds_for, tiny

KAGGLE_SIZES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]




def one(sets, name, groups):
    gs = next(gs for gs in sets if gs.name == name)
    mask = torch.zeros(gs.num_groups, dtype=torch.bool)
    mask[list(groups)] = True
    return {name: mask}


def saving(resource, masks):
    dense = resource.of_masks({})
    now = resource.of_masks(masks)
    return dense["flops"] - now["flops"], dense["params"] - now["params"]


# Hand computation for tiny("dot"): dense 3 -> [8, 4] bottom, tables 10/20/30 × 4, 6 pairs, top 10 -> 8 -> 1.
#   bottom 2·3·8+8 + 2·8·4+4 = 124 FLOPs, 32 + 36 = 68 params; pairs 2·4·6 = 48 FLOPs;
#   top 2·10·8+8 + 2·8+1 = 185 FLOPs, 88 + 9 = 97 params; tables 60·4 = 240 params. Total 357 / 405.


def test_dense_values_by_hand_and_equal_to_measure():
    for interaction, flops, params in [("dot", 357, 405), ("cat", 405, 453)]:
        model = tiny(interaction)
        resource = ResourceModel(model, build_group_sets(model, kinds_for(model)))
        assert resource.dense == {"flops": flops, "params": params}
        cost = measure(tiny(interaction))
        assert (cost.flops, cost.params) == (flops, params)


@pytest.mark.parametrize("name, groups, flops, params", [
    # a top neuron: top 10 -> 7 -> 1: 2·10 + 1 + 2·1 FLOPs, 10 + 1 + 1 params per neuron
    ("neurons:over.layers.0", [2], 23, 12),
    # a bottom neuron: 3 -> 7 -> 4: 2·3 + 1 + 2·4 FLOPs, 3 + 1 + 4 params
    ("neurons:dense.layers.0", [0], 15, 8),
    # a shared dot dim (D 4 -> 3): last bottom row 2·8+1, 6 pairs × 2, top column 2·8; params 8+1, 8, 60 rows
    ("dims", [1], 17 + 12 + 16, 9 + 8 + 60),
    # a pair: 2·D interaction + one top column 2·8 FLOPs; 8 params
    ("pairs", [3], 8 + 16, 8),
    # feature C3 (30 rows): its 3 pairs (3·8 FLOPs) and their 3 top columns (3·16 FLOPs, 3·8 params), its table
    ("features", [3], 24 + 48, 24 + 120),
    # the dense block: the bottom MLP (124, 68), its 4 direct + 3 pair columns (7·16, 7·8), 3 pairs (24)
    ("features", [0], 124 + 112 + 24, 68 + 56),
])
def test_dot_savings_by_hand(name, groups, flops, params):
    model = tiny("dot")
    sets = build_group_sets(model, ALL)
    resource = ResourceModel(model, sets)
    assert saving(resource, one(sets, name, groups)) == (flops, params)


@pytest.mark.parametrize("name, groups, flops, params", [
    # tiny("cat"): top input 4 + 3·4 = 16; one dim of C2: a top column (2·8) and 20 table rows
    ("dims:C2", [0], 16, 8 + 20),
    # a bottom-output neuron: its row (2·8+1, 9 params) and its top column (16, 8)
    ("neurons:dense.layers.1", [3], 17 + 16, 9 + 8),
    # all dims of a table: the table is dead, like its feature
    ("dims:C1", [0, 1, 2, 3], 4 * 16, 4 * 8 + 40),
    ("features", [1], 4 * 16, 4 * 8 + 40),
])
def test_cat_savings_by_hand(name, groups, flops, params):
    model = tiny("cat")
    sets = build_group_sets(model, ALL - {"pair"})
    resource = ResourceModel(model, sets)
    assert saving(resource, one(sets, name, groups)) == (flops, params)


def test_batched_variants_give_the_slopes_and_are_normalised():
    model = tiny("dot")
    sets = build_group_sets(model, ALL)
    resource = ResourceModel(model, sets)
    base = resource.pad({})
    variants = base.repeat(3, 1, 1)
    names = [gs.name for gs in sets]
    variants[1, names.index("neurons:over.layers.0"), 0] = True
    variants[2, names.index("pairs"), 5] = True
    flops, params = resource.evaluate(variants)
    assert flops.dtype == torch.float64 and flops[0] == 1.0 and params[0] == 1.0
    torch.testing.assert_close(1.0 - flops[1:], torch.tensor([23 / 357, 24 / 357], dtype=torch.float64))
    torch.testing.assert_close(1.0 - params[1:], torch.tensor([12 / 405, 8 / 405], dtype=torch.float64))


def structure_from_kept(s: DLRMStructure, kept) -> DLRMStructure:
    names = s.feature_names
    alive = [names.index(s.sparse_names[i]) for i in kept.feature_ids]
    new_row = {0: 0} if kept.use_dense else {}
    for n, f in enumerate(alive):
        new_row[int(s.use_dense) + f] = int(kept.use_dense) + n
    return DLRMStructure(
        sparse_names=s.sparse_names, feature_ids=kept.feature_ids, table_sizes=[s.table_sizes[f] for f in alive],
        table_dims=[len(kept.dims[names[f]]) for f in alive], num_dense=s.num_dense,
        bottom=[len(kept.neurons[f"dense.layers.{i}"]) for i in range(len(s.bottom))] if kept.use_dense else [],
        top=[len(kept.neurons[f"over.layers.{i}"]) for i in range(len(s.top) - 1)] + [1],
        interaction=s.interaction, self_interaction=s.self_interaction, use_dense=kept.use_dense,
        pairs=[(new_row[i], new_row[j]) for i, j in kept.pairs] if kept.pairs is not None else None,
    )


@pytest.mark.filterwarnings("ignore:Initializing zero-element")  # a top MLP left with no input
@pytest.mark.parametrize("interaction, self_interaction, kinds", [
    ("dot", False, ALL), ("dot", True, ALL), ("cat", False, ALL - {"pair"}),
    ("dot", False, {"neuron", "pair"}), ("cat", False, {"feature", "dim"}),
    # `cat` without dim sets: the per-table dims are constants (a bug once counted the top input wrong).
    ("cat", False, {"neuron"}), ("cat", False, {"feature"}), ("cat", False, {"feature", "neuron"}),
])
def test_resource_of_random_masks_equals_measure_of_the_smaller_model(interaction, self_interaction, kinds):
    model = tiny(interaction, sizes=(10, 20, 30, 40, 50), bottom=(8, 6, 4), top=(8, 6, 1),
                 self_interaction=self_interaction)
    sets = build_group_sets(model, kinds)
    resource = ResourceModel(model, sets)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        pruned = {}
        for gs in sets:
            k = int(torch.randint(0, gs.num_groups, (1,), generator=g))
            pruned[gs.name] = torch.randperm(gs.num_groups, generator=g) < k
        kept = kept_from_masks(model, sets, pruned)
        with torch.device("meta"):
            small = DLRM(structure_from_kept(model.structure, kept))
        cost = measure(small)
        assert resource.of_masks(pruned) == {"flops": cost.flops, "params": cost.params}


@pytest.mark.parametrize("interaction, kinds", [("dot", ALL), ("cat", ALL - {"pair"}), ("cat", {"dim"})])
def test_dims_pruned_in_blocks_cost_what_the_smaller_model_measures(interaction, kinds):
    """dim_block 2 (widths 4): a dim group is 2 consecutive dims, kept dims come in whole blocks, and R of
    any masks is what the extracted model measures."""
    model = tiny(interaction, sizes=(10, 20, 30, 40, 50), bottom=(8, 6, 4), top=(8, 6, 1))
    sets = build_group_sets(model, kinds, dim_block=2)
    dim_sets = [gs for gs in sets if gs.kind == "dim"]
    assert dim_sets and all(gs.num_groups == 2 and gs.width == 2 and gs.labels == ["0-1", "2-3"] for gs in dim_sets)
    resource = ResourceModel(model, sets)
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        pruned = {gs.name: torch.randperm(gs.num_groups, generator=g) < int(torch.randint(0, gs.num_groups, (1,),
                                                                                            generator=g))
                  for gs in sets}
        kept = kept_from_masks(model, sets, pruned)
        for dims in kept.dims.values():
            assert dims in ([0, 1, 2, 3], [0, 1], [2, 3])
        with torch.device("meta"):
            small = DLRM(structure_from_kept(model.structure, kept))
        cost = measure(small)
        assert resource.of_masks(pruned) == {"flops": cost.flops, "params": cost.params}
    with pytest.raises(ValueError, match="dim_block`: 3 does not divide"):
        build_group_sets(model, kinds, dim_block=3)


def test_kaggle_sizes_are_exact_in_float64():
    s = dense_structure(sparse_names=[f"C{i}" for i in range(1, 27)], table_sizes=KAGGLE_SIZES, embedding_dim=16,
                        bottom=[512, 256, 64, 16], top=[512, 256, 1], num_dense=13)
    with torch.device("meta"):
        model = DLRM(s)
    resource = ResourceModel(model, build_group_sets(model, ALL))
    cost = measure(model)
    assert resource.dense == {"flops": cost.flops, "params": cost.params - 16}  # the gate is not counted
    assert cost.params - 16 == 33_762_577 * 16 + 13 * 512 + 512 + 512 * 256 + 256 + 256 * 64 + 64 + 64 * 16 + 16 \
        + 367 * 512 + 512 + 512 * 256 + 256 + 256 + 1


def test_minimum_and_feasibility_error():
    model = tiny("dot")
    resource = ResourceModel(model, build_group_sets(model, {"neuron"}))
    # one neuron per hidden layer: bottom 3 -> 1 -> 4 (7 + 12), top 10 -> 1 -> 1 (21 + 3), pairs 48
    assert resource.minimum() == pytest.approx({"flops": 91 / 357, "params": (4 + 8 + 11 + 2 + 240) / 405})
    with pytest.raises(ValueError, match=r"params budget 0.001 is below the 0.6543 .* mode=prediction"):
        resource.check_budgets({"params": 0.001, "flops": None}, mode="prediction")
    with pytest.raises(ValueError, match="unknown budget"):
        resource.check_budgets({"bytes": 0.5})
    resource.check_budgets({"flops": 0.3, "params": 0.7})  # reachable: no error


def test_minimum_keeps_the_cheapest_feature():
    model = tiny("dot")
    resource = ResourceModel(model, build_group_sets(model, {"feature"}))
    # keep only C1 (10 rows): no pair has two live ends, top input 0; params: top 0·8+8 + 9, table 40
    assert resource.minimum()["params"] == pytest.approx((8 + 9 + 40) / 405)
    assert resource.minimum()["flops"] == pytest.approx((8 + 17) / 357)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_numpy_evaluation_equals_torch(interaction):
    """`evaluate_bottom_k` on NumPy arrays (the CPU step's path) gives exactly the torch values."""
    model = tiny(interaction, sizes=(10, 20, 30, 40))
    sets = build_group_sets(model, kinds_for(model))
    resource = ResourceModel(model, sets)
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([gs.num_groups for gs in sets])
    ranks = torch.stack([torch.cat([torch.randperm(int(n), generator=g), torch.arange(int(n), resource.max_groups)])
                         for n in sizes])
    k = (torch.rand(20, len(sets), generator=g) * sizes).long()
    expected = resource.evaluate_bottom_k(ranks, k)
    assert torch.equal(torch.from_numpy(resource.evaluate_bottom_k(ranks.numpy(), k.numpy())), expected)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_step_variants_cache_equals_the_uncached_evaluation_across_steps(interaction):
    """The memoised variants of the CPU ADMM step equal a fresh evaluation at every step of a run whose k
    and whose pruned features/pairs change, and the cache is hit when nothing that decides R changed."""
    from umec_lightning.compression import UMEC, ADMMConfig

    model = tiny(interaction, sizes=(10, 20, 30, 40))
    umec = UMEC(model, kinds_for(model), ADMMConfig(budgets={"flops": 0.4, "params": 0.6}, eta_s=0.2))
    resource = umec.resource
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(64, 3, generator=g)
    sparse = torch.stack([torch.randint(0, n, (64,), generator=g) for n in model.structure.table_sizes], 1)
    labels = (torch.rand(64, generator=g) < 0.3).float()
    ks, feature_orders = set(), set()
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), labels).backward()
        optimizer.step()
        _, ranks = umec.packed.ranks(umec.packed.norms())
        k = umec._k()
        cached = resource.step_variants(ranks.numpy(), k.numpy())
        fresh = resource.evaluate_bottom_k(ranks, k[None] + umec._plus_one)
        assert torch.equal(torch.from_numpy(np.array(cached)), fresh)
        ks.add(tuple(k.tolist()))
        f = umec.sets.index(next(gs for gs in umec.sets if gs.name == "features"))
        feature_orders.add(tuple(ranks[f, : resource._num_vectors].tolist()))
        umec.step(0.1)
    assert len(ks) > 5 and len(feature_orders) > 1  # k and the feature ranking did change
    assert resource.cache_hits > 0 and resource.cache_misses >= len(ks)


def test_step_variants_cache_key_ignores_the_order_among_pruned_groups_only():
    model = tiny("dot", sizes=(10, 20, 30, 40))
    sets = build_group_sets(model, ALL)
    resource = ResourceModel(model, sets)
    f = [gs.name for gs in sets].index("features")
    nv = resource._num_vectors  # dense block + 4 features
    ranks = np.tile(np.arange(resource.max_groups), (len(sets), 1))
    k = np.zeros(len(sets), dtype=np.int64)
    k[f] = 2
    first = resource.step_variants(ranks, k)
    swapped = ranks.copy()
    swapped[f, :2] = [1, 0]  # the same two pruned, in the other order: a hit, the same values
    assert resource.step_variants(swapped, k) is first
    other = ranks.copy()
    other[f, :nv] = [4, 1, 2, 3, 0]  # a different feature pruned: a miss, its own values
    miss = resource.step_variants(other, k)
    assert miss is not first
    np.testing.assert_array_equal(miss, resource.evaluate_bottom_k(other, k[None] + resource._plus_one_np))
    assert not np.array_equal(miss, first)
