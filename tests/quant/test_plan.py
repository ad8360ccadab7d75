"""Bit-width plans (quant/plan.py) and quantization-aware lookups (quant/aware.py): planned bytes are the bytes of
the stored model, the auto plan takes the lowest free width, the completion meets a bytes limit by the cheapest
steps, and a fake-quantized lookup serves exactly what the quantized model serves while passing gradients on."""

from __future__ import annotations

import pytest
import torch

from umec_lightning.compression.export import random_inputs
from umec_lightning.models import dense_structure
from umec_lightning.models.deepfm import dense_deepfm_structure
from umec_lightning.models.family import family_of_structure
from umec_lightning.quant import model_bytes, quantize_tables
from umec_lightning.quant.aware import fake_quantize_tables, remove_hooks
from umec_lightning.quant.plan import (
    DENSE,
    BitsPlan,
    apply_plan,
    choose_plan,
    complete_to_budget,
    holdout_logloss,
    param_weights,
    params_budget,
    planned_bytes,
    row_weights,
)

NAMES = ["C1", "C2", "C3", "C4"]
SIZES = [50, 300, 40, 700]


def model_of(kind: str = "dot", seed: int = 0):
    if kind == "deepfm":
        s = dense_deepfm_structure(sparse_names=NAMES, table_sizes=SIZES, embedding_dim=8, num_dense=3, deep=[16],
                                   dense_names=["I1", "I2", "I3"])
    else:
        s = dense_structure(sparse_names=NAMES, table_sizes=SIZES, embedding_dim=8, bottom=[16, 8], top=[16, 1],
                            num_dense=3, dense_names=["I1", "I2", "I3"], interaction=kind)
    return family_of_structure(s.to_dict()).build(s, seed=seed).eval()


def batches(model, count: int = 3, size: int = 256):
    out = []
    for i in range(count):
        dense, sparse = random_inputs(model.structure, batch_size=size, seed=10 + i)
        labels = (torch.rand(size, generator=torch.Generator().manual_seed(i)) < 0.3).float()
        out.append((dense, sparse, labels))
    return out


@pytest.mark.parametrize("tables, dense", [(8, 32), (4, 16), ({"C1": 16, "C2": 4, "C3": 8, "C4": 32}, 32)])
def test_planned_bytes_are_the_stored_models_bytes(tables, dense):
    model = model_of()
    plan = choose_plan(model, tables, dense, [], 0.0)
    assert planned_bytes(model, plan) == model_bytes(apply_plan(model, plan))["total"]


def test_params_budget_is_the_share_of_priced_params_that_fits_the_bytes():
    model = model_of()
    fp32 = model_bytes(model)["total"]
    int8 = choose_plan(model, 8, 32, [], 0.0)
    assert params_budget(model, int8, 0.1) == pytest.approx(0.1 * fp32 / planned_bytes(model, int8))
    assert params_budget(model, int8, 1.0) == 1.0  # int8 tables alone meet it: nothing to prune
    int4 = choose_plan(model, 4, 16, [], 0.0)  # int4 rows reserve half a byte each for an odd width's padding
    assert params_budget(model, int4, 0.1) == pytest.approx(0.1 * fp32 / (planned_bytes(model, int4)
                                                                            + 0.5 * sum(SIZES)))
    assert set(param_weights(int8).values()) == {0.25} and set(row_weights(int8).values()) == {1.0}  # 4 B / 4 B
    assert set(param_weights(int4).values()) == {0.25} and set(row_weights(int4).values()) == {2.25}  # 4.5 B / 2 B
    assert set(row_weights(choose_plan(model, 16, 32, [], 0.0)).values()) == {0.0}


def test_auto_takes_the_lowest_free_width_and_says_what_each_cost():
    model = model_of()
    held = batches(model)
    loose = choose_plan(model, "auto", 32, held, tolerance=1.0)
    assert set(loose.tables.values()) == {4} and loose.dense == 16 and loose.how == "auto"
    assert set(loose.probe) == {16, 8, 4, "dense16"}
    strict = choose_plan(model, "auto", 32, held, tolerance=-1.0)  # nothing is free
    assert set(strict.tables.values()) == {32} and strict.dense == 32
    assert BitsPlan.from_dict(loose.to_dict()) == loose


def test_auto_lowers_table_by_table_where_the_uniform_width_is_not_free():
    """With a tolerance between uniform int8's and uniform int4's held-out cost, auto keeps some tables at 8 bits
    and lowers the others to 4: the plan's measured cost within the tolerance, fewer bytes than uniform int8."""
    model = model_of()
    with torch.no_grad():  # one table with a wide range in every row: int4 costs it far more than the others
        model.sparse.tables["C4"].weight.mul_(torch.linspace(0.1, 30.0, 8))
    held = batches(model)
    probe = choose_plan(model, "auto", 32, held, tolerance=1.0).probe
    assert probe[4] > probe[8]
    tolerance = (probe[4] + probe[8]) / 2
    plan = choose_plan(model, "auto", 32, held, tolerance=tolerance)
    assert set(plan.tables.values()) == {4, 8}, plan.tables
    uniform8 = BitsPlan({n: 8 for n in NAMES}, plan.dense)
    assert planned_bytes(model, plan) < planned_bytes(model, uniform8)
    base = holdout_logloss(model, held)
    assert holdout_logloss(quantize_tables(model, plan.tables), held) - base <= tolerance
    assert plan.probe["per_table"] == pytest.approx(holdout_logloss(quantize_tables(model, plan.tables), held) - base)


def test_the_completion_meets_the_limit_by_lowering_widths_and_reports_each_step():
    model = model_of()
    plan = choose_plan(model, 32, 32, [], 0.0)
    limit = 0.5 * planned_bytes(model, plan)
    done, steps = complete_to_budget(model, plan, limit, batches(model))
    assert planned_bytes(model, done) <= limit < planned_bytes(model, plan)
    assert steps and all(s["bytes_saved"] > 0 for s in steps)
    for step in steps:
        assert step["to"] < step["from"]
        if step["table"] != DENSE:
            assert done.tables[step["table"]] <= step["to"]
    # An unreachable limit: every table at 4 bits and the Linears at fp16, reported over (not hidden).
    floor, _ = complete_to_budget(model, plan, 1.0, batches(model))
    assert set(floor.tables.values()) == {4} and floor.dense == 16 and planned_bytes(model, floor) > 1.0


def test_a_plan_follows_the_tables_a_pruned_model_still_has():
    model = model_of()
    plan = choose_plan(model, 4, 32, [], 0.0)
    assert plan.on(model) == plan
    assert BitsPlan({**plan.tables, "gone": 8}, 32).on(model).tables == plan.tables  # a feature pruning removed


@pytest.mark.parametrize("kind, bits", [("dot", 4), ("cat", {"C1": 8, "C2": 4, "C3": 16}), ("deepfm", 8)])
def test_a_fake_quantized_lookup_serves_what_the_quantized_model_serves(kind, bits):
    model = model_of(kind)
    dense, sparse = random_inputs(model.structure, batch_size=64, seed=3)
    widths = bits if isinstance(bits, dict) else {n: bits for n in NAMES}
    served = quantize_tables(model, widths)(dense, sparse)
    hooks = fake_quantize_tables(model, widths)
    try:
        assert torch.equal(model(dense, sparse), served)
    finally:
        remove_hooks(hooks)
    assert not torch.equal(model(dense, sparse), served)  # the hooks are gone: the float model again


def test_fake_quantized_training_passes_the_gradient_to_the_float_rows():
    model = model_of().train()
    hooks = fake_quantize_tables(model, {n: 4 for n in NAMES})
    dense, sparse = random_inputs(model.structure, batch_size=32, seed=4)
    model(dense, sparse).sum().backward()
    remove_hooks(hooks)
    grad = model.sparse.groups[0].weight.grad
    assert grad is not None and grad.coalesce().values().abs().sum() > 0


def test_fake_quantization_refuses_what_it_cannot_do():
    model = model_of()
    with pytest.raises(ValueError, match="not features of the model"):
        fake_quantize_tables(model, {"nope": 4})
    with pytest.raises(ValueError, match="bit width"):
        fake_quantize_tables(model, {"C1": 3})


@pytest.mark.parametrize("kind", ["dot", "cat", "deepfm"])
def test_priced_params_are_the_stored_bytes_over_a_dense_parameters(kind):
    """With `table_param_weights` set (what a bytes budget does), the resource model's params of any masks equal
    the extracted model's priced params, and those are its stored bytes at the plan's widths over a dense
    parameter's bytes (exactly, at int8: no padding)."""
    from umec_lightning.compression.extract import extract, extracted_fractions
    from umec_lightning.compression.groups import build_group_sets, kept_from_masks
    from umec_lightning.compression.resource import resource_model

    model = model_of(kind)
    plan = choose_plan(model, 8, 32, [], 0.0)
    model.table_param_weights, model.table_row_weights = param_weights(plan), row_weights(plan)
    sets = build_group_sets(model, {"feature", "dim", "neuron"})
    gen = torch.Generator().manual_seed(0)
    pruned = {gs.name: torch.rand(gs.num_groups, generator=gen) < 0.3 for gs in sets}
    pruned["features"][:] = False
    pruned["features"][2] = True  # one table removed: its rows' scale and bias go with it
    resource = resource_model(model, sets)
    kept = kept_from_masks(model, sets, pruned)
    fraction = resource.of_masks(pruned, normalise=True)["params"]
    assert fraction == pytest.approx(extracted_fractions(model, kept)["params"], rel=1e-9)
    small = extract(model, kept)
    stored = planned_bytes(small, BitsPlan({n: 8 for n in small.sparse.feature_names}, 32))
    assert resource.of_masks(pruned)["params"] * 4 == pytest.approx(stored, abs=1e-6)
