"""DCNv2's resource model (models/dcnv2_resources.py): for any masks of its group sets, R equals `measure` of the
DCNv2 that the masks leave, built by hand here; the NumPy and torch fast paths agree with `evaluate`; `minimum` is
what the smallest reachable DCNv2 measures."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from umec_lightning.compression.groups import GroupMember, GroupSet
from umec_lightning.models import measure
from umec_lightning.models.dcnv2 import DCNv2, DCNv2Structure
from umec_lightning.models.dcnv2_resources import DCNv2ResourceModel

ALL = ("feature", "dim", "neuron")


pytestmark = pytest.mark.usefixtures("one_thread")


def structure(use_dense=True, deep=(8, 5), cross_layers=2, cross_rank=None, experts=1, stacking="parallel"):
    return DCNv2Structure(sparse_names=["a", "b", "c", "d"], feature_ids=[0, 1, 2, 3], table_sizes=[10, 23, 7, 31],
                          table_dims=[4, 6, 2, 4], num_dense=3, deep=list(deep), cross_layers=cross_layers,
                          cross_rank=cross_rank, experts=experts, stacking=stacking, use_dense=use_dense)


def dummy(n: int, incidence: torch.Tensor) -> list[GroupMember]:
    return [GroupMember(param=nn.Parameter(torch.zeros(n)), dim=0, incidence=incidence)]


def group_sets(s: DCNv2Structure, kinds=ALL, block: int = 1) -> list[GroupSet]:
    """The sets' names, kinds, sizes and widths as DCNv2's groups have them (the members are placeholders)."""
    sets = []
    if "feature" in kinds:
        labels = (["dense"] if s.use_dense else []) + s.feature_names
        sets.append(GroupSet("features", "feature", dummy(len(labels), torch.eye(len(labels))), labels))
    if "dim" in kinds:
        for name, d in zip(s.feature_names, s.table_dims):
            incidence = torch.eye(d // block).repeat_interleave(block, dim=0)
            sets.append(GroupSet(f"dims:{name}", "dim", dummy(d, incidence), width=block))
    if "neuron" in kinds:
        for i, w in enumerate(s.deep):
            sets.append(GroupSet(f"neurons:deep.layers.{i}", "neuron", dummy(w, torch.eye(w))))
    return sets


def left_by(s: DCNv2Structure, sets: list[GroupSet], masks: dict[str, torch.Tensor]) -> DCNv2Structure | None:
    """The structure the masks leave (None when nothing of x0 survives: no DCNv2 to measure)."""
    widths = {gs.name: gs.width for gs in sets}

    def kept(name: str, full: int) -> int:
        if name not in masks:
            return full
        return int((~masks[name]).sum()) * widths[name]

    ud = int(s.use_dense)
    feature_kept = ~masks["features"] if "features" in masks else torch.ones(ud + len(s.feature_ids), dtype=bool)
    alive = [f for f, (name, d) in enumerate(zip(s.feature_names, s.table_dims))
             if feature_kept[ud + f] and kept(f"dims:{name}", d) > 0]
    out = dataclasses.replace(
        s, feature_ids=[s.feature_ids[f] for f in alive], table_sizes=[s.table_sizes[f] for f in alive],
        table_dims=[kept(f"dims:{s.feature_names[f]}", s.table_dims[f]) for f in alive],
        use_dense=bool(s.use_dense and feature_kept[0]),
        deep=[kept(f"neurons:deep.layers.{i}", w) for i, w in enumerate(s.deep)]) if alive or (
        s.use_dense and feature_kept[0]) else None
    return out


def measured(s: DCNv2Structure) -> tuple[int, int]:
    cost = measure(DCNv2(s, hold_tables=False))
    return cost.flops, cost.params


def random_masks(sets: list[GroupSet], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Each set pruned at random, down to one group; a dim set now and then pruned whole (its table dies)."""
    masks = {}
    p = float(torch.rand(1, generator=g)) * 0.8
    for gs in sets:
        mask = torch.rand(gs.num_groups, generator=g) < p
        if mask.all() and not (gs.kind == "dim" and float(torch.rand(1, generator=g)) < 0.5):
            mask[int(torch.randint(gs.num_groups, (1,), generator=g))] = False
        masks[gs.name] = mask
    return masks


CASES = [dict(cross_rank=rank, experts=experts, stacking=stacking, deep=deep, use_dense=use_dense)
         for (rank, experts), stacking, deep, use_dense
         in itertools.product([(None, 1), (3, 2)], ["parallel", "stacked"], [(8, 5), ()], [True, False])]
CASES += [dict(cross_layers=0, stacking=stacking) for stacking in ("parallel", "stacked")]
CASES += [dict(cross_layers=1, cross_rank=2, experts=1, deep=(6,), use_dense=False)]


def case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("block", [1, 2])
def test_resource_of_random_masks_equals_measure_of_the_smaller_model(case, block):
    s = structure(**case)
    sets = group_sets(s, block=block)
    resource = DCNv2ResourceModel(DCNv2(s, hold_tables=False), sets)
    assert resource.dense == dict(zip(("flops", "params"), measured(s)))
    g = torch.Generator().manual_seed(block)
    checked = 0
    for _ in range(25):
        masks = random_masks(sets, g)
        smaller = left_by(s, sets, masks)
        if smaller is None:
            continue
        assert resource.of_masks(masks) == dict(zip(("flops", "params"), measured(smaller))), masks
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize("kinds", [("feature",), ("dim",), ("neuron",), ("feature", "neuron"), ("dim", "neuron")])
@pytest.mark.parametrize("case", [CASES[0], CASES[7], CASES[-1]], ids=case_id)
def test_absent_sets_prune_nothing(kinds, case):
    s = structure(**case)
    sets = group_sets(s, kinds, block=2)
    if not sets:
        pytest.skip("no set of these kinds")
    resource = DCNv2ResourceModel(DCNv2(s, hold_tables=False), sets)
    assert resource.kinds == [k for k in ("feature", "neuron", "dim") if k in {gs.kind for gs in sets}]
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        masks = random_masks(sets, g)
        smaller = left_by(s, sets, masks)
        if smaller is not None:
            assert resource.of_masks(masks) == dict(zip(("flops", "params"), measured(smaller)))


def test_dense_block_and_whole_tables():
    """Pruning the dense block removes its num_dense columns of x0; a table with every dim pruned is dead with its
    feature kept; pruning a feature and pruning all of its dims cost the same."""
    s = structure(cross_rank=3, experts=2)
    sets = group_sets(s)
    resource = DCNv2ResourceModel(DCNv2(s, hold_tables=False), sets)
    no_dense = resource.of_masks({"features": torch.tensor([True, False, False, False, False])})
    assert tuple(no_dense.values()) == measured(dataclasses.replace(s, use_dense=False))
    by_feature = resource.of_masks({"features": torch.tensor([False, False, True, False, False])})
    by_dims = resource.of_masks({"dims:b": torch.ones(6, dtype=torch.bool)})
    assert by_feature == by_dims
    fewer = dataclasses.replace(s, feature_ids=[0, 2, 3], table_sizes=[10, 7, 31], table_dims=[4, 2, 4])
    assert tuple(by_dims.values()) == measured(fewer)


def ranks_and_k(resource: DCNv2ResourceModel, sets: list[GroupSet], g: torch.Generator, variants: int = 20):
    sizes = torch.tensor([gs.num_groups for gs in sets])
    ranks = torch.stack([torch.cat([torch.randperm(int(n), generator=g), torch.arange(int(n), resource.max_groups)])
                         for n in sizes])
    k = (torch.rand(variants, len(sets), generator=g) * sizes).long()
    return ranks, k


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bottom_k_numpy_and_torch_equal_evaluate(case):
    s = structure(**case)
    sets = group_sets(s, block=2)
    resource = DCNv2ResourceModel(DCNv2(s, hold_tables=False), sets)
    g = torch.Generator().manual_seed(0)
    ranks, k = ranks_and_k(resource, sets, g)
    valid = torch.arange(resource.max_groups)[None, :] < torch.tensor([gs.num_groups for gs in sets])[:, None]
    pruned = (ranks[None] < k[:, :, None]) & valid  # (V, S, Gmax): the k smallest of every set
    expected = torch.stack(resource.evaluate(pruned))
    assert torch.equal(resource.evaluate_bottom_k(ranks, k), expected)
    assert np.array_equal(resource.evaluate_bottom_k(ranks.numpy(), k.numpy()), expected.numpy())
    # The memoised ADMM variants: the current k and each set with one more group pruned.
    k0 = k[0].clamp(max=torch.tensor([gs.num_groups - 2 for gs in sets]).clamp(min=0))
    both = resource.step_variants(ranks.numpy(), k0.numpy())
    assert np.array_equal(both, resource.evaluate_bottom_k(ranks.numpy(), k0.numpy()[None] + resource._plus_one_np))
    assert np.array_equal(resource.step_variants(ranks.numpy(), k0.numpy()), both)
    assert resource.cache_hits == 1


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("kinds", [ALL, ("feature",), ("dim", "neuron")])
def test_minimum_is_what_the_smallest_model_measures(case, kinds):
    s = structure(**case)
    block = 2
    sets = group_sets(s, kinds, block=block)
    if not sets:
        pytest.skip("no set of these kinds")
    resource = DCNv2ResourceModel(DCNv2(s, hold_tables=False), sets)
    deep = [1] * len(s.deep) if "neuron" in kinds else s.deep
    dims = [block if "dim" in kinds else d for d in s.table_dims]
    if "feature" in kinds:  # one feature survives, any of them
        smallest = [dataclasses.replace(s, use_dense=False, feature_ids=[s.feature_ids[f]],
                                        table_sizes=[s.table_sizes[f]], table_dims=[dims[f]], deep=deep)
                    for f in range(len(s.feature_ids))]
        if s.use_dense:
            smallest.append(dataclasses.replace(s, feature_ids=[], table_sizes=[], table_dims=[], deep=deep))
    else:
        smallest = [dataclasses.replace(s, table_dims=dims, deep=deep)]
    costs = [measured(x) for x in smallest]
    dense = measured(s)
    low = resource.minimum()
    scale = 1.0 / torch.tensor(dense, dtype=torch.float64)
    assert low["flops"] == float(min(c[0] for c in costs) * scale[0])
    assert low["params"] == float(min(c[1] for c in costs) * scale[1])
    resource.check_budgets({"flops": low["flops"] * 1.001, "params": None})
    with pytest.raises(ValueError, match="flops budget"):
        resource.check_budgets({"flops": low["flops"] * 0.999})
    with pytest.raises(ValueError, match="unknown budget"):
        resource.check_budgets({"latency": 0.5})
