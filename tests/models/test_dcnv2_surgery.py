"""DCNv2's surgery by kept indices (models/dcnv2_surgery.py): the extracted model computes what the masked dense
model computes (removed table columns, dense block and deep neurons zeroed), costs what a fresh model of the
extracted structure costs, works on a model whose tables are meta, and refuses what it cannot do."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from umec_lightning.compression.export import random_inputs
from umec_lightning.compression.kept import Kept
from umec_lightning.models import measure
from umec_lightning.models.dcnv2 import DCNv2, DCNv2Structure, MixtureCrossLayer
from umec_lightning.models.dcnv2_surgery import dcnv2_extract, dcnv2_extracted_structure


def structure(**kw) -> DCNv2Structure:
    """Four data features, three read (ids 0, 2, 3) by tables of different widths; three dense columns."""
    deep = kw.pop("deep", [8, 6])
    batch_norm = kw.pop("batch_norm", False)
    args = dict(sparse_names=["a", "b", "c", "d"], feature_ids=[0, 2, 3], table_sizes=[7, 9, 5], table_dims=[4, 3, 5],
                num_dense=3, deep=deep, cross_layers=2, cross_rank=None, experts=1, stacking="parallel",
                dense_names=["x", "y", "z"],
                batch_norm=[f"deep.layers.{i}" for i in range(len(deep))] if batch_norm else None,
                dropout={"deep.layers.0": 0.2} if deep else None)
    return DCNv2Structure(**{**args, "deep": deep, **kw})


def trained_model(s: DCNv2Structure, seed: int = 0) -> DCNv2:
    """A model with nonzero cross biases, random batch-norm affine and running statistics moved off (0, 1)."""
    model = DCNv2(s, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in model.cross.layers:
            bias = layer.bias if isinstance(layer, MixtureCrossLayer) else layer.linear.bias
            bias.copy_(torch.randn(bias.shape, generator=gen))
        for norm in model.batch_norms().values():
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen))
        model.train()
        for k in range(3):
            dense, sparse = random_inputs(s, batch_size=16, seed=seed + k)
            model(dense * 3 + 1, sparse)
    return model.eval()


def random_kept(s: DCNv2Structure, rng: random.Random) -> Kept:
    """Drops the dense block or not, features, table columns and deep neurons at random (x0 never emptied)."""
    while True:
        use_dense = s.use_dense and rng.random() < 0.6
        features = [f for f in s.feature_ids if rng.random() < 0.7]
        dims = {}
        for name, width in zip(s.feature_names, s.table_dims):
            if rng.random() < 0.7:
                dims[name] = sorted(rng.sample(range(width), rng.randint(0, width)))
        if use_dense or any(dims.get(s.sparse_names[f], [0]) for f in features):
            break
    neurons = {name: sorted(rng.sample(range(width), rng.randint(1, width)))
               for name, width in zip(s.hidden_names, s.deep) if rng.random() < 0.8}
    return Kept(use_dense=use_dense, feature_ids=features, dims=dims, neurons=neurons)


def masked(model: DCNv2, kept: Kept) -> DCNv2:
    """A deep copy with the removed table columns (a removed feature's whole table) and deep neurons (weight
    rows, biases, batch-norm γ and β) zeroed; the dense block's removal is the caller's (dense · 0)."""
    out = copy.deepcopy(model)
    s = out.structure
    with torch.no_grad():
        for fid, name, width in zip(s.feature_ids, s.feature_names, s.table_dims):
            keep = set(kept.dims.get(name, range(width))) if fid in kept.feature_ids else set()
            out.sparse.tables[name].weight[:, [j for j in range(width) if j not in keep]] = 0.0
        norms = out.batch_norms()
        for name, rows in kept.neurons.items():
            layer = out.linear_layers()[name]
            removed = [r for r in range(layer.out_features) if r not in set(rows)]
            layer.weight[removed] = 0.0
            layer.bias[removed] = 0.0
            if name in norms:
                norms[name].weight[removed] = 0.0
                norms[name].bias[removed] = 0.0
    return out


def expected_structure(s: DCNv2Structure, kept: Kept) -> dict:
    kept_dims = [(fid, len(kept.dims.get(name, range(width)))) for fid, name, width
                 in zip(s.feature_ids, s.feature_names, s.table_dims) if fid in kept.feature_ids]
    kept_dims = [(fid, d) for fid, d in kept_dims if d]
    return dict(feature_ids=[f for f, _ in kept_dims], table_dims=[d for _, d in kept_dims],
                use_dense=kept.use_dense and s.use_dense,
                deep=[len(kept.neurons.get(name, range(w))) for name, w in zip(s.hidden_names, s.deep)])


CASES = [
    dict(),
    dict(stacking="stacked"),
    dict(cross_rank=2, experts=3),
    dict(cross_rank=2, experts=3, stacking="stacked", batch_norm=True),
    dict(batch_norm=True),
    dict(deep=[]),
    dict(deep=[], stacking="stacked", cross_rank=3, experts=2),
    dict(cross_layers=0, deep=[7, 5, 4], batch_norm=True),
    dict(num_dense=0, use_dense=False, dense_names=None),
    dict(deep=[9], stacking="stacked", batch_norm=True, cross_rank=1, experts=2),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_extracted_model_equals_the_masked_model(case):
    s = structure(**CASES[case])
    model = trained_model(s, seed=case)
    rng = random.Random(case)
    dense, sparse = random_inputs(s, batch_size=12, seed=case)
    for _ in range(6):
        kept = random_kept(s, rng)
        small = dcnv2_extract(model, kept)
        reference = masked(model, kept)
        expected = reference(dense * (1.0 if kept.use_dense else 0.0), sparse)
        assert not small.training
        assert torch.allclose(small(dense, sparse), expected, atol=1e-5), kept
        new = dcnv2_extracted_structure(model, kept)
        assert small.structure == new
        for key, value in expected_structure(s, kept).items():
            assert getattr(new, key) == value, key
        assert (new.cross_layers, new.cross_rank, new.experts, new.stacking, new.batch_norm, new.dropout) == \
            (s.cross_layers, s.cross_rank, s.experts, s.stacking, s.batch_norm, s.dropout)
        assert measure(small) == measure(DCNv2(new))
        # fresh storage: nothing shared with the input model
        ours = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
        assert not ours & {t.untyped_storage().data_ptr() for t in small.state_dict().values()}


def test_nothing_removed_rebuilds_the_same_model_in_its_mode():
    s = structure(batch_norm=True, cross_rank=2, experts=2)
    model = trained_model(s).train()
    small = dcnv2_extract(model, Kept.everything(model))
    assert small.training and small.structure == s and small.sparse_grad == model.sparse_grad
    for key, value in model.state_dict().items():
        assert torch.equal(small.state_dict()[key], value), key
    dense, sparse = random_inputs(s, batch_size=4)
    small.eval(), model.eval()
    assert torch.equal(small(dense, sparse), model(dense, sparse))
    wide = dcnv2_extract(copy.deepcopy(model).double(), Kept.everything(model))  # the dtype carries over
    assert {v.dtype for v in wide.state_dict().values() if v.is_floating_point()} == {torch.float64}


def test_a_dropped_dense_block_a_feature_and_neurons_give_the_expected_widths():
    s = structure(batch_norm=True)
    model = trained_model(s)
    kept = Kept(use_dense=False, feature_ids=[0, 3], dims={"a": [1, 3], "d": [0, 2, 4], "c": [0]},
                neurons={"deep.layers.0": [0, 2, 5], "deep.layers.1": [1]})
    small = dcnv2_extract(model, kept)
    assert small.structure.feature_names == ["a", "d"] and small.structure.table_dims == [2, 3]
    assert not small.structure.use_dense and small.dense is None
    assert small.structure.width == 5 and small.structure.deep == [3, 1]
    assert small.cross.layers[0].linear.weight.shape == (5, 5)
    assert small.deep.layers[0].weight.shape == (3, 5) and small.deep.norms[0].running_mean.shape == (3,)
    assert small.head.weight.shape == (1, 5 + 1)
    # P = columns of x0 (3 dense, a: 3..6, c: 7..9, d: 10..14): a's 1, 3 and d's 0, 2, 4
    P = [4, 6, 10, 12, 14]
    assert torch.equal(small.cross.layers[1].linear.weight, model.cross.layers[1].linear.weight[P][:, P])
    assert torch.equal(small.head.weight, model.head.weight[:, P + [15 + 1]])
    assert torch.equal(small.deep.norms[0].running_var, model.deep.norms[0].running_var[[0, 2, 5]])
    assert torch.equal(small.sparse.tables["d"].weight, model.sparse.tables["d"].weight[:, [0, 2, 4]])


@pytest.mark.parametrize("cross_rank", [None, 2])
def test_meta_tables_extract_to_meta_tables_of_the_new_shapes(cross_rank):
    s = structure(cross_rank=cross_rank, experts=2, batch_norm=True)
    full = trained_model(s)
    bare = DCNv2(s, hold_tables=False)
    bare.load_state_dict({k: v for k, v in full.state_dict().items() if k not in full.table_keys()}
                         | bare.table_placeholders(), assign=True)
    bare.eval()
    assert not bare.holds_tables
    kept = Kept(use_dense=True, feature_ids=[2, 3], dims={"c": [0, 2], "d": [1]}, neurons={"deep.layers.1": [0, 4]})
    theirs, ours = dcnv2_extract(bare, kept), dcnv2_extract(full, kept)
    assert not theirs.holds_tables and ours.holds_tables
    assert theirs.structure == ours.structure
    assert [t.weight.shape for t in theirs.sparse.tables.values()] == [(9, 2), (5, 1)]
    for key, value in ours.state_dict().items():
        got = theirs.state_dict()[key]
        if key in ours.table_keys():
            assert got.is_meta and got.shape == value.shape, key
        else:
            assert torch.equal(got, value), key
    assert measure(theirs) == measure(ours)


def test_bad_inputs_are_refused():
    model = trained_model(structure())
    everything = Kept.everything(model)

    def kept(**kw) -> Kept:
        return Kept(**{**everything.to_dict(), "pairs": None, **kw})

    refused = [
        (kept(ranks={"head": 1}), "cannot factorise"),
        (kept(feature_ids=[0, 1]), "feature ids"),
        (kept(dims={"zz": [0]}), "tables the model does not have"),
        (kept(neurons={"deep.layers.5": [0]}), "does not have"),
        (kept(neurons={"head": [0]}), "logit layer"),
        (kept(neurons={"cross.layers.0.linear": [0, 1]}), "cross layer"),
        (kept(neurons={"deep.layers.0": []}), "keeps no neuron"),
        (kept(neurons={"deep.layers.0": [8]}), "must lie in"),
        (kept(use_dense=False, feature_ids=[]), "nothing of x0"),
        (kept(use_dense=False, dims={"a": [], "c": [], "d": []}), "nothing of x0"),
    ]
    for bad, message in refused:
        for fn in (dcnv2_extract, dcnv2_extracted_structure):
            with pytest.raises(ValueError, match=message):
                fn(model, bad)
    for fn in (dcnv2_extract, dcnv2_extracted_structure):
        with pytest.raises(ValueError, match="bases"):
            fn(model, everything, bases={"a": object()})
