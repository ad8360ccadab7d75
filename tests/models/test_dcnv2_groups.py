"""DCNv2's group sets (models/dcnv2_groups.py): zeroing a group's members removes exactly what its masks say, and
the structure they leave is read off the masks."""

from __future__ import annotations

import copy

import pytest
import torch

from umec_lightning.compression.export import random_inputs
from umec_lightning.compression.groups import apply_masks_, build_group_sets, kept_from_masks
from umec_lightning.models.dcnv2 import DCNv2, dense_dcnv2_structure


def model_of(**kw) -> DCNv2:
    args = dict(sparse_names=["a", "b", "c"], table_sizes=[7, 9, 5], embedding_dim=4, num_dense=3, deep=[8, 6],
                cross_layers=2, cross_rank=None, experts=1, stacking="parallel", dense_names=["x", "y", "z"])
    model = DCNv2(dense_dcnv2_structure(**{**args, **kw}), seed=0)
    with torch.no_grad():  # biases and batch-norm shifts off zero, so a forgotten slice shows
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()
    return model.eval()


def masked_reference(model: DCNv2, dense_gone: bool, columns: dict[str, list[int]], neurons: dict[str, list[int]]):
    """The model with x0 positions removed at their source (table columns, the dense block) and deep neurons
    zeroed: what the masks must compute."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, cols in columns.items():
            ref.sparse.tables[name].weight[:, cols] = 0.0
        norms = ref.batch_norms()
        for name, rows in neurons.items():
            layer = dict(ref.neuron_layers())[name]
            if name in norms:
                norms[name].weight[rows] = 0.0
                norms[name].bias[rows] = 0.0
            else:
                layer.weight[rows] = 0.0
                layer.bias[rows] = 0.0
    if dense_gone:  # the block's positions of x0 are zero: what comes out of its norm, not what goes in
        ref.dense.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    return ref


@pytest.mark.parametrize("kw", [{}, {"stacking": "stacked"}, {"cross_rank": 2, "experts": 3}, {"batch_norm": True},
                                {"deep": []}, {"cross_layers": 0}], ids=["parallel", "stacked", "mixture", "bn",
                                                                         "no-deep", "no-cross"])
def test_zeroing_the_pruned_groups_removes_exactly_their_positions_and_neurons(kw):
    model = model_of(**kw)
    sets = build_group_sets(model, {"feature", "dim", "neuron"})
    names = [gs.name for gs in sets]
    assert names[0] == "features" and sets[0].labels == ["dense", "a", "b", "c"]
    assert [n for n in names if n.startswith("dims:")] == ["dims:a", "dims:b", "dims:c"]
    pruned = {"features": torch.tensor([True, False, True, False]),  # the dense block and table b go
              "dims:c": torch.tensor([False, True, True, False])}
    neurons = {}
    if model.deep is not None:
        pruned["neurons:deep.layers.0"] = torch.zeros(8, dtype=torch.bool)
        pruned["neurons:deep.layers.0"][[1, 5]] = True
        neurons = {"deep.layers.0": [1, 5]}
    reference = masked_reference(model, True, {"b": list(range(4)), "c": [1, 2]}, neurons)
    dense, sparse = random_inputs(model.structure, batch_size=16, seed=3)
    expected = reference(dense, sparse)
    apply_masks_(model, sets, pruned)
    torch.testing.assert_close(model(dense, sparse), expected, rtol=0, atol=1e-5)
    kept = kept_from_masks(model, sets, pruned)
    assert (kept.use_dense, kept.feature_ids, kept.dims) == (False, [0, 2], {"a": [0, 1, 2, 3], "c": [0, 3]})
    assert kept.neurons == ({} if model.deep is None else {"deep.layers.0": [0, 2, 3, 4, 6, 7],
                                                           "deep.layers.1": list(range(6))})


def test_a_feature_group_spans_every_reader_of_its_positions():
    model = model_of()
    (features,) = build_group_sets(model, {"feature"})
    readers = {id(m.param): m for m in features.members}
    assert {id(p) for p in (model.cross.layers[0].linear.weight, model.cross.layers[1].linear.bias,
                            model.deep.layers[0].weight, model.head.weight)} <= set(readers)
    # Group "b" (x0 columns 7..10): the rows and columns of each cross matrix, the bias, deep and head columns.
    cols = list(range(7, 11))
    expected = sum(float(layer.linear.weight[cols].square().sum() + layer.linear.weight[:, cols].square().sum()
                         + layer.linear.bias[cols].square().sum()) for layer in model.cross.layers)
    expected += float(model.deep.layers[0].weight[:, cols].square().sum() + model.head.weight[:, cols].square().sum())
    assert float(features.norms()[2]) == pytest.approx(expected, rel=1e-5)


def test_dim_blocks_and_kinds_a_dcnv2_does_not_have():
    model = model_of(embedding_dim=4)
    sets = build_group_sets(model, {"dim"}, dim_block=2)
    assert [gs.num_groups for gs in sets] == [2, 2, 2] and sets[0].width == 2
    kept = kept_from_masks(model, sets, {"dims:a": torch.tensor([True, False])})
    assert kept.dims["a"] == [2, 3]
    with pytest.raises(ValueError, match=r"group kinds \['pair'\] do not exist in a DCNv2"):
        build_group_sets(model, {"feature", "pair"})
    with pytest.raises(ValueError, match="prune every input"):
        kept_from_masks(model, build_group_sets(model, {"feature"}), {"features": torch.ones(4, dtype=torch.bool)})
