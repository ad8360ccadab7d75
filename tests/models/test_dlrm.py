import math

import pytest
import torch

from umec_lightning.models import DLRM, DLRMStructure, dense_structure, measure
from umec_lightning.models.dlrm import MLP, InteractionArch, SparseArch

KAGGLE_SIZES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
NAMES = [f"C{i}" for i in range(1, 27)]


def small(interaction="dot", self_interaction=False, sizes=(5, 7, 3), dim=4):
    return dense_structure(sparse_names=[f"C{i + 1}" for i in range(len(sizes))], table_sizes=list(sizes),
                           embedding_dim=dim, bottom=[8, dim], top=[6, 1], num_dense=3,
                           interaction=interaction, self_interaction=self_interaction)


def kaggle(interaction="dot"):
    s = dense_structure(sparse_names=NAMES, table_sizes=KAGGLE_SIZES, embedding_dim=16,
                        bottom=[512, 256, 64, 16], top=[512, 256, 1], num_dense=13, interaction=interaction)
    with torch.device("meta"):  # shapes only: no 2 GB of tables
        return DLRM(s)


def test_sparse_arch_looks_up_the_right_rows():
    s = small()
    arch = SparseArch(s)
    arch.reset_parameters(torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 6, 2], [4, 0, 1]])
    out = arch(ids)
    assert [o.shape for o in out] == [torch.Size([2, 4])] * 3
    for k, name in enumerate(s.feature_names):
        torch.testing.assert_close(out[k], arch.tables[name].weight[ids[:, k]])
    bound = math.sqrt(1 / 7)
    assert arch.tables["C2"].weight.abs().max() <= bound


def test_sparse_arch_reads_only_its_kept_columns():
    s = DLRMStructure(sparse_names=["a", "b", "c"], feature_ids=[2, 0], table_sizes=[4, 5], table_dims=[3, 3],
                      num_dense=2, bottom=[3], top=[1])
    arch = SparseArch(s)
    ids = torch.tensor([[1, 9, 3]])  # column "b" (id 9, out of range for any table) must never be read
    out = arch(ids)
    torch.testing.assert_close(out[0], arch.tables["c"].weight[[3]])
    torch.testing.assert_close(out[1], arch.tables["a"].weight[[1]])


def test_mlp_relu_placement_and_reference_init():
    torch.manual_seed(0)
    mlp = MLP(5, [7, 3], relu_last=False)
    mlp.reset_parameters(torch.Generator().manual_seed(1))
    x = torch.randn(4, 5)
    w0, b0, w1, b1 = (p.detach() for p in mlp.parameters())
    expected = torch.relu(x @ w0.T + b0) @ w1.T + b1
    torch.testing.assert_close(mlp(x), expected)
    bottom = MLP(5, [7, 3], relu_last=True)
    assert (bottom(x) >= 0).all()
    big = MLP(400, [600], relu_last=True)
    big.reset_parameters(torch.Generator().manual_seed(2))
    std = big.layers[0].weight.std().item()
    assert abs(std - math.sqrt(2 / 1000)) < 0.002
    assert abs(big.layers[0].bias.std().item() - math.sqrt(1 / 600)) < 0.01


def test_dot_interaction_matches_explicit_loops():
    for self_int in (False, True):
        s = small(self_interaction=self_int)
        arch = InteractionArch(s)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 4, generator=g)
        embs = [torch.randn(2, 4, generator=g) for _ in range(3)]
        out = arch(x, embs)
        vecs = [x, *embs]
        expected = [x]
        cols = []
        for i in range(4):
            for j in range(i + (1 if self_int else 0)):
                cols.append((vecs[i] * vecs[j]).sum(1, keepdim=True))
        expected = torch.cat([x, *cols], dim=1)
        torch.testing.assert_close(out, expected)
        assert out.shape[1] == s.interaction_out == 4 + (10 if self_int else 6)


def test_cat_interaction_concatenates():
    s = small("cat")
    arch = InteractionArch(s)
    x = torch.randn(2, 4)
    embs = [torch.randn(2, 4) for _ in range(3)]
    torch.testing.assert_close(arch(x, embs), torch.cat([x, *embs], 1))
    assert s.interaction_out == 16


@pytest.mark.parametrize("interaction, width", [("dot", 16 + 351), ("cat", 27 * 16)])
def test_kaggle_interaction_widths(interaction, width):
    assert kaggle(interaction).structure.interaction_out == width


def test_kaggle_flops_and_params_by_hand():
    cost = measure(kaggle("dot"))
    bottom = (2 * 13 * 512 + 512) + (2 * 512 * 256 + 256) + (2 * 256 * 64 + 64) + (2 * 64 * 16 + 16)
    inter = 351 * 2 * 16
    top = (2 * 367 * 512 + 512) + (2 * 512 * 256 + 256) + (2 * 256 * 1 + 1)
    assert bottom == 311_120 and top == 639_233
    assert cost.flops == bottom + inter + top == 961_585
    mlp = (13 * 512 + 512) + (512 * 256 + 256) + (256 * 64 + 64) + (64 * 16 + 16) \
        + (367 * 512 + 512) + (512 * 256 + 256) + (256 + 1)
    assert mlp == 475_985
    assert cost.table_params == 33_762_577 * 16
    assert cost.params == mlp + 33_762_577 * 16 == 540_677_217
    assert cost.bytes == 4 * 540_677_217
    cat = measure(kaggle("cat"))
    assert cat.flops == 311_120 + (2 * 432 * 512 + 512) + (2 * 512 * 256 + 256) + 513 == 1_016_913


def test_dlrm_forward_is_seeded_and_matches_parts():
    s = small()
    a, b = DLRM(s, seed=7), DLRM(s, seed=7)
    dense = torch.randn(5, 3)
    sparse = torch.stack([torch.randint(0, n, (5,)) for n in s.table_sizes], 1)
    out = a(dense, sparse)
    assert out.shape == (5,)
    torch.testing.assert_close(out, b(dense, sparse))
    manual = a.over(a.interaction(a.dense(dense), a.sparse(sparse))).squeeze(1)
    torch.testing.assert_close(out, manual)
    assert not torch.equal(out, DLRM(s, seed=8)(dense, sparse))


def test_sparse_gradients_reach_only_touched_rows():
    s = small(sizes=(1000, 7, 3))
    m = DLRM(s, seed=0)
    dense = torch.randn(4, 3)
    sparse = torch.tensor([[1, 0, 0], [2, 1, 1], [1, 2, 2], [999, 3, 0]])
    m(dense, sparse).sum().backward()
    grad = m.sparse.tables["C1"].grad  # its rows of the fused weight's gradient
    assert grad.is_sparse
    assert set(grad.coalesce().indices()[0].tolist()) == {1, 2, 999}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = m.sparse.tables["C1"].weight.detach().clone()
    opt.step()
    changed = (m.sparse.tables["C1"].weight != before).any(1).nonzero().flatten().tolist()
    assert changed == [1, 2, 999]


def test_stable_names():
    m = DLRM(small(), seed=0)
    names = dict(m.named_parameters())
    for expected in ["sparse.groups.0.weight", "dense.layers.0.weight", "dense.layers.1.bias",
                     "over.layers.0.weight", "over.layers.1.bias"]:
        assert expected in names
    assert list(m.linear_layers()) == ["dense.layers.0", "dense.layers.1", "over.layers.0", "over.layers.1"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(interaction="dot", bottom=[8, 5]), "embedding_dim"),
    (dict(interaction="dot", top=[6, 2]), "end in 1"),
    (dict(interaction="sum"), "interaction"),
])
def test_bad_structures_are_rejected(kwargs, match):
    args = dict(sparse_names=["a", "b"], table_sizes=[3, 4], embedding_dim=4, bottom=[8, 4], top=[6, 1],
                num_dense=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dense_structure(**args)


def test_structure_round_trips_through_a_dict():
    s = DLRMStructure(sparse_names=["a", "b", "c"], feature_ids=[2, 0], table_sizes=[4, 5], table_dims=[3, 3],
                      num_dense=2, bottom=[3], top=[1], pairs=[(1, 0), (2, 1)])
    assert DLRMStructure.from_dict(s.to_dict()) == s
    assert s.interaction_out == 3 + 2


def projected(interaction="dot", ranks=(2, 4, 1), sizes=(5, 7, 3), dim=4):
    """A `small` structure whose tables are stored at `ranks` (projected where rank < dim)."""
    s = small(interaction, sizes=sizes, dim=dim)
    s.table_ranks = list(ranks)
    s.validate()
    return s


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_projected_tables_look_up_then_project(interaction):
    s = projected(interaction)
    m = DLRM(s, seed=0)
    assert [t.embedding_dim for t in m.sparse.tables.values()] == [2, 4, 1]
    assert {k: tuple(p.weight.shape) for k, p in m.sparse.projections.items()} == {"C1": (4, 2), "C3": (4, 1)}
    assert all(p.bias is None for p in m.sparse.projections.values())
    ids = torch.tensor([[0, 6, 2], [4, 0, 1]])
    out = m.sparse(ids)
    assert [o.shape for o in out] == [torch.Size([2, 4])] * 3
    torch.testing.assert_close(out[0], m.sparse.tables["C1"].weight[ids[:, 0]] @ m.sparse.projections["C1"].weight.T)
    torch.testing.assert_close(out[1], m.sparse.tables["C2"].weight[ids[:, 1]])
    torch.testing.assert_close(out[2], m.sparse.tables["C3"].weight[ids[:, 2]] @ m.sparse.projections["C3"].weight.T)
    assert "sparse.projections.C1.weight" in dict(m.named_parameters())
    dense = torch.randn(2, 3)
    m(dense, ids).sum().backward()  # the projection learns; its table still gets sparse gradients
    assert m.sparse.projections["C1"].weight.grad is not None
    assert m.sparse.tables["C1"].grad.is_sparse


def test_projected_model_is_seeded_and_plain_models_draw_as_before():
    s = projected()
    a, b = DLRM(s, seed=3), DLRM(s, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    plain = small()
    plain.table_ranks = [4, 4, 4]  # no projection anywhere: the canonical None
    plain.__post_init__()
    assert plain.table_ranks is None and plain == small()
    assert all(torch.equal(x, y) for x, y in zip(DLRM(plain, seed=3).state_dict().values(),
                                                 DLRM(small(), seed=3).state_dict().values()))


def test_projected_cost_by_hand():
    for interaction in ("dot", "cat"):
        base, cost = measure(DLRM(small(interaction), seed=0)), measure(DLRM(projected(interaction), seed=0))
        # C1: 5 x 2 + 2 x 4 projection instead of 5 x 4; C3: 3 x 1 + 1 x 4 instead of 3 x 4.
        assert cost.table_params == base.table_params - 5 * 2 - 3 * 3 == 5 * 2 + 7 * 4 + 3 * 1
        assert cost.params == base.params - (5 * 4 + 3 * 4) + (5 * 2 + 3 * 1) + (2 * 4 + 1 * 4)
        assert cost.flops == base.flops + 2 * (2 * 4 + 1 * 4)


@pytest.mark.parametrize("ranks, match", [
    ([2, 4], "table_ranks has 2 entries"),
    ([0, 4, 4], "table C1 has rank 0"),
    ([2, 5, 4], "table C2 has rank 5 for dim 4"),
])
def test_bad_table_ranks_are_rejected(ranks, match):
    with pytest.raises(ValueError, match=match):
        projected(ranks=ranks)


def test_projected_structure_round_trips_and_old_dicts_load():
    s = projected("cat")
    assert DLRMStructure.from_dict(s.to_dict()) == s
    old = small().to_dict()
    old.pop("table_ranks")  # written before projections existed
    assert DLRMStructure.from_dict(old) == small() and small().table_ranks is None


# ---- factored (low-rank) Linear layers and projection biases ------------------------------------------
def factored(interaction="dot", ranks=None, activation=False):
    """A `small` structure with Linear layers stored factored at `ranks` (default: two of them)."""
    s = small(interaction)
    s.layer_ranks = dict(ranks or {"dense.layers.0": 2, "over.layers.0": 3})
    s.factor_activation = activation
    s.__post_init__()
    return s


@pytest.mark.parametrize("activation", [False, True])
def test_factored_layers_compute_two_linears(activation):
    from umec_lightning.models import Factored

    s = factored(activation=activation)
    m = DLRM(s, seed=0)
    layers = m.linear_layers()
    assert list(layers) == ["dense.layers.0", "dense.layers.1", "over.layers.0", "over.layers.1"]
    assert sorted(m.factored_layers()) == ["dense.layers.0", "over.layers.0"]
    f = layers["dense.layers.0"]
    assert isinstance(f, Factored) and (f.in_features, f.rank, f.out_features) == (3, 2, 8)
    assert tuple(f.first.weight.shape) == (2, 3) and tuple(f.second.weight.shape) == (8, 2)
    assert isinstance(layers["dense.layers.1"], torch.nn.Linear)
    names = dict(m.named_parameters())
    for expected in ["dense.layers.0.first.weight", "dense.layers.0.first.bias", "dense.layers.0.second.weight",
                     "over.layers.0.second.bias", "dense.layers.1.weight"]:
        assert expected in names
    x = torch.randn(5, 3)
    hidden = f.first(x)
    expected = f.second(torch.relu(hidden) if activation else hidden)
    torch.testing.assert_close(f(x), expected)
    assert (hidden < 0).any()  # the ReLU case really differs
    ids = torch.tensor([[0, 6, 2], [4, 0, 1]])
    m(torch.randn(2, 3), ids).sum().backward()
    assert f.first.weight.grad is not None and f.second.weight.grad is not None
    a, b = DLRM(s, seed=3), DLRM(s, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_factored_cost_by_hand():
    for interaction in ("dot", "cat"):
        s = small(interaction)
        base = measure(DLRM(s, seed=0))
        n_in = s.interaction_out
        for activation in (False, True):
            cost = measure(DLRM(factored(interaction, {"dense.layers.0": 2, "over.layers.0": 3}, activation)))
            # dense.layers.0 3 -> 8 at rank 2; over.layers.0 n_in -> 6 at rank 3 (the ReLU costs nothing).
            plain_params = (3 * 8 + 8) + (n_in * 6 + 6)
            new_params = (3 * 2 + 2 + 2 * 8 + 8) + (n_in * 3 + 3 + 3 * 6 + 6)
            plain_flops = (2 * 3 * 8 + 8) + (2 * n_in * 6 + 6)
            new_flops = (2 * 3 * 2 + 2 + 2 * 2 * 8 + 8) + (2 * n_in * 3 + 3 + 2 * 3 * 6 + 6)
            assert cost.params == base.params - plain_params + new_params
            assert cost.flops == base.flops - plain_flops + new_flops
            assert cost.table_params == base.table_params


def test_projection_bias_costs_d_params_and_flops():
    s = projected("dot")
    s.projection_bias = True
    s.__post_init__()
    m = DLRM(s, seed=0)
    assert {k: tuple(p.bias.shape) for k, p in m.sparse.projections.items()} == {"C1": (4,), "C3": (4,)}
    assert all(torch.equal(p.bias, torch.zeros(4)) for p in m.sparse.projections.values())
    ids = torch.tensor([[0, 6, 2], [4, 0, 1]])
    with torch.no_grad():
        m.sparse.projections["C1"].bias.fill_(0.5)
    torch.testing.assert_close(m.sparse(ids)[0], m.sparse.tables["C1"].weight[ids[:, 0]]
                               @ m.sparse.projections["C1"].weight.T + 0.5)
    plain = measure(DLRM(projected("dot"), seed=0))
    cost = measure(m)
    assert cost.params == plain.params + 2 * 4 and cost.flops == plain.flops + 2 * 4
    assert cost.table_params == plain.table_params


def test_factored_structures_normalise_and_old_dicts_load():
    s = factored("cat", activation=True)
    assert DLRMStructure.from_dict(s.to_dict()) == s
    assert s.layer_ranks == {"dense.layers.0": 2, "over.layers.0": 3}
    shuffled = factored("cat", {"over.layers.0": 3, "dense.layers.0": 2}, activation=True)
    assert shuffled == s and list(shuffled.layer_ranks) == ["dense.layers.0", "over.layers.0"]
    # No factored layer / no projection: the canonical defaults, so structures compare equal.
    empty = factored(ranks={"dense.layers.0": 2}, activation=True)
    empty.layer_ranks = {}
    empty.__post_init__()
    assert empty.layer_ranks is None and empty.factor_activation is False and empty == small()
    biased = small()
    biased.projection_bias = True
    biased.__post_init__()
    assert biased.projection_bias is False and biased == small()
    old = small().to_dict()
    for key in ("table_ranks", "projection_bias", "layer_ranks", "factor_activation"):
        old.pop(key)  # written before these existed
    assert DLRMStructure.from_dict(old) == small()


@pytest.mark.parametrize("ranks, match", [
    ({"dense.layers.5": 2}, r"not Linear layers of the structure"),
    ({"sparse.tables.C1": 2}, r"not Linear layers"),
    ({"dense.layers.0": 0}, r"dense.layers.0 \(3 -> 8\) has rank 0"),
    ({"dense.layers.0": 4}, r"1 <= rank <= min\(in, out\); dense.layers.0 \(3 -> 8\) has rank 4"),
    ({"over.layers.1": 2}, r"over.layers.1 \(6 -> 1\) has rank 2"),
])
def test_bad_layer_ranks_are_rejected(ranks, match):
    with pytest.raises(ValueError, match=match):
        factored(ranks=ranks)


def test_layer_ranks_of_a_dropped_dense_block_are_rejected():
    s = DLRMStructure(sparse_names=["a", "b"], feature_ids=[0, 1], table_sizes=[3, 4], table_dims=[2, 2],
                      num_dense=0, bottom=[], top=[3, 1], use_dense=False, interaction="cat")
    with pytest.raises(ValueError, match="not Linear layers"):
        DLRMStructure(**{**s.to_dict(), "layer_ranks": {"dense.layers.0": 1}})
    with pytest.raises(ValueError, match="must be a dict"):
        DLRMStructure(**{**s.to_dict(), "layer_ranks": [1]})
    assert DLRMStructure(**{**s.to_dict(), "layer_ranks": {"over.layers.0": 1}}).layer_ranks == {"over.layers.0": 1}
