import copy

import pytest
import torch

from umec_lightning.compression import UMEC, ADMMConfig, ADMMState, kept_from_masks
from umec_lightning.models import DLRM, dense_structure

from .conftest import ALL


def tiny(interaction="dot", seed=0):
    s = dense_structure(sparse_names=["C1", "C2", "C3", "C4"], table_sizes=[10, 20, 30, 40], embedding_dim=4,
                        bottom=[8, 4], top=[8, 1], num_dense=3, interaction=interaction)
    return DLRM(s, seed=seed)


def kinds_for(interaction):
    return ALL if interaction == "dot" else ALL - {"pair"}


def data(model, batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, 3, generator=g)
    sparse = torch.stack([torch.randint(0, n, (batch,), generator=g) for n in model.structure.table_sizes], 1)
    labels = (torch.rand(batch, generator=g) < 0.3).float()
    return dense, sparse, labels


def train(model, umec, steps, lr=0.1, seed=0):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    dense, sparse, labels = data(model, seed=seed)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), labels).backward()
        optimizer.step()
        z_before = umec.state.z.clone()
        stats = umec.step(lr)
        history.append((z_before, {k: v.clone() for k, v in stats.items()}))
    return history


@pytest.mark.parametrize("interaction, s_optimizer", [("dot", "adam"), ("cat", "sgd")])
def test_z_rises_while_over_budget_and_the_budget_ends_met(interaction, s_optimizer):
    model = tiny(interaction)
    budgets = {"flops": 0.5, "params": 0.6}
    umec = UMEC(model, kinds_for(interaction), ADMMConfig(budgets=budgets, s_optimizer=s_optimizer))
    history = train(model, umec, 200)
    names = umec.state.budget_names
    for z_before, stats in history:
        for b, name in enumerate(names):
            if stats[name] > budgets[name]:
                assert stats["z"][b] > z_before[b]
            else:
                assert stats["z"][b] <= z_before[b]
    assert history[0][1]["flops"] == 1.0 and history[-1][1]["flops"] < 0.6  # it did compress
    late = torch.stack([stats["flops"] for _, stats in history[-100:]])
    assert late.mean() < budgets["flops"] + 0.05  # oscillating around the budget, as dual ascent does
    masks, info = umec.final_pruned_masks()
    final = umec.resource_of(masks)
    assert final["flops"] <= budgets["flops"] and final["params"] <= budgets["params"]
    assert info["pruned_to_meet_budget"] <= 3
    assert all(int(m.sum()) < m.numel() for m in masks.values())


def test_prox_s_and_y_updates_by_hand():
    model = tiny("dot")
    umec = UMEC(model, {"neuron"}, ADMMConfig(budgets={"flops": 0.5}, s_optimizer="sgd"))
    assert umec.state.set_names == ["neurons:dense.layers.0", "neurons:over.layers.0"]
    layers = [model.dense.layers[0], model.over.layers[0]]
    umec.state.s = torch.tensor([1.5, 3.0], dtype=torch.float64)  # k = 2 and 3
    umec.state.y = torch.tensor([0.5, 1.0], dtype=torch.float64)
    before = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in layers]
    norms = [w.square().sum(1) + b.square() for w, b in before]
    lr = 0.1
    stats = umec.step(lr)
    for (w, b), v, layer, k, y in zip(before, norms, layers, [2, 3], [0.5, 1.0]):
        order = torch.sort(v, stable=True).indices
        factor = torch.ones_like(v)
        factor[order[:k]] = 1 / (1 + 2 * lr * y)  # the k smallest, paper A.1
        torch.testing.assert_close(layer.weight.detach(), w * factor[:, None])
        torch.testing.assert_close(layer.bias.detach(), b * factor)
    assert stats["kept"].tolist() == [6, 5]
    # y: ascent on the bottom-k norm after the prox
    after = [layer.weight.detach().square().sum(1) + layer.bias.detach().square() for layer in layers]
    expected_y = torch.stack([0.5 + 0.1 * after[0].sort().values[:2].sum(),
                              1.0 + 0.1 * after[1].sort().values[:3].sum()])
    torch.testing.assert_close(umec.state.y.float(), expected_y)
    # s (SGD): z was 0, so g_l = y_l · v_(k_l+1) of the pre-prox norms
    nxt = [v.sort().values[k] for v, k in zip(norms, [2, 3])]
    expected_s = torch.tensor([1.5 - 0.05 * 0.5 * nxt[0], 3.0 - 0.05 * 1.0 * nxt[1]], dtype=torch.float64)
    torch.testing.assert_close(umec.state.s, expected_s)


def test_s_descends_the_resource_slope():
    model = tiny("dot")
    umec = UMEC(model, {"neuron"}, ADMMConfig(budgets={"flops": 0.5}, s_optimizer="sgd"))
    umec.state.s = torch.tensor([0.5, 0.5], dtype=torch.float64)
    umec.state.z = torch.tensor([2.0], dtype=torch.float64)
    umec.step(0.1)  # y = 0: no prox, g = z · (R(k+1) − R(k))
    dense_flops = umec.resource.dense["flops"]
    # tiny("dot") dense FLOPs: bottom 3->8->4 (56 + 68), 10 pairs (80), top 14->8->1 (232 + 17)
    assert dense_flops == 453
    # a bottom neuron saves 2·3 + 1 + 2·4 = 15 FLOPs, a top neuron 2·14 + 1 + 2·1 = 31
    expected = torch.tensor([0.5 + 0.05 * 2 * 15 / 453, 0.5 + 0.05 * 2 * 31 / 453], dtype=torch.float64)
    torch.testing.assert_close(umec.state.s, expected)
    # z ascends on the violation R(ceil s) − budget with k = 1 in both sets
    torch.testing.assert_close(umec.state.z, torch.tensor([2.0 + 2.0 * ((453 - 15 - 31) / 453 - 0.5)],
                                                          dtype=torch.float64))


@pytest.mark.parametrize("s_optimizer, every", [("adam", 1), ("sgd", 1), ("adam", 3)])
def test_state_dict_round_trip_resumes_bit_exactly(s_optimizer, every):
    # every_n_steps 3: 20 steps end between two iterations (at steps 1, 4, ..., 19), the resumed run must not
    # iterate early
    config = ADMMConfig(budgets={"flops": 0.5, "params": 0.7}, s_optimizer=s_optimizer, every_n_steps=every)
    model = tiny("dot")
    umec = UMEC(model, ALL, config)
    train(model, umec, 20)
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(umec.state_dict())
    train(model, umec, 10, seed=1)

    fresh = tiny("dot", seed=7)
    resumed = UMEC(fresh, ALL, config)  # enables the gate before the weights are loaded
    fresh.load_state_dict(saved_model)
    resumed.load_state_dict(saved)
    train(fresh, resumed, 10, seed=1)
    for name in ("s", "y", "z", "step", "adam_m", "adam_v"):
        assert torch.equal(getattr(umec.state, name), getattr(resumed.state, name)), name
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


def test_state_flat_round_trip_and_name_checks():
    model = tiny("cat")
    umec = UMEC(model, kinds_for("cat"), ADMMConfig(budgets={"flops": 0.5}))
    train(model, umec, 5)
    st = umec.state
    flat = st.flat()
    assert flat.dtype == torch.float64 and flat.numel() == 4 * len(st.set_names) + len(st.budget_names) + 1
    copy_ = ADMMState.from_flat(flat, st.set_names, st.budget_names)
    for name in ("s", "y", "z", "step", "adam_m", "adam_v"):
        assert torch.equal(getattr(copy_, name), getattr(st, name))
    with pytest.raises(ValueError, match="flat ADMM state"):
        copy_.load_flat_(flat[:-1])
    other = UMEC(tiny("cat"), {"neuron"}, ADMMConfig(budgets={"flops": 0.5}))
    with pytest.raises(ValueError, match="ADMM state is for sets"):
        other.load_state_dict(umec.state_dict())


def test_final_masks_enforce_the_budget_greedily():
    model = tiny("dot")
    umec = UMEC(model, ALL, ADMMConfig(budgets={"flops": 0.5, "params": 0.8}))
    masks, info = umec.final_pruned_masks(enforce_budget=False)  # s = 0: nothing to prune
    assert info["pruned_to_meet_budget"] == 0 and not any(m.any() for m in masks.values())
    masks, info = umec.final_pruned_masks()
    assert info["pruned_to_meet_budget"] == sum(int(m.sum()) for m in masks.values()) > 0
    final = umec.resource_of(masks)
    assert final["flops"] <= 0.5 and final["params"] <= 0.8
    assert all(int(m.sum()) < m.numel() for m in masks.values())
    kept = kept_from_masks(model, umec.sets, masks)
    assert kept == umec.kept(masks)


def test_step_keeps_the_dim_gate_non_negative_and_returns_tensors():
    model = tiny("dot")
    umec = UMEC(model, ALL, ADMMConfig(budgets={"flops": 0.5}))
    with torch.no_grad():
        model.dim_gate.copy_(torch.tensor([1.0, -0.5, 0.3, -2.0]))
    stats = umec.step(0.1)
    assert (model.dim_gate >= 0).all()
    assert all(isinstance(v, torch.Tensor) for v in stats.values())
    logged = umec.log_values(stats)
    assert logged["resource/flops"] == 1.0 and "z/flops" in logged and "kept/dims" in logged


def test_config_validation_and_feasibility():
    with pytest.raises(ValueError, match="at least one budget"):
        ADMMConfig(budgets={"flops": None})
    with pytest.raises(ValueError, match="s_optimizer"):
        ADMMConfig(budgets={"flops": 0.5}, s_optimizer="rmsprop")
    with pytest.raises(ValueError, match="params budget 0.01 is below"):
        UMEC(tiny("dot"), {"neuron"}, ADMMConfig(budgets={"params": 0.01}), mode="prediction")


@pytest.mark.parametrize("interaction, s_optimizer", [("dot", "adam"), ("cat", "sgd"), ("cat", "adam")])
def test_cpu_fast_path_equals_the_device_path(interaction, s_optimizer):
    """On CPU `step` runs the NumPy path (`_step_host`); the fixed-op tensor path (`_step_device`, what an
    accelerator runs) gives the same s, y, z, masks, resource and weights up to float rounding."""
    config = ADMMConfig(budgets={"flops": 0.5, "params": 0.7}, s_optimizer=s_optimizer, eta_s=0.2)
    runs = []
    for host in (True, False):
        model = tiny(interaction)
        umec = UMEC(model, kinds_for(interaction), config)
        assert umec._host  # a CPU model
        umec._host = host
        runs.append((model, umec, train(model, umec, 60)))
    (model_h, umec_h, hist_h), (model_d, umec_d, hist_d) = runs
    assert int((hist_h[-1][1]["kept"] < umec_h._num_groups).sum()) > 0  # it did prune (the prox ran)
    for (_, a), (_, b) in zip(hist_h, hist_d):
        assert torch.equal(a["kept"], b["kept"])
        for key in ("flops", "params"):
            assert a[key].dtype == b[key].dtype == torch.float64 and a[key].shape == b[key].shape == ()
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=0)
        for key in ("s", "y", "z"):
            assert a[key].dtype == b[key].dtype == torch.float64
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    for name in ("step", "adam_m", "adam_v"):
        torch.testing.assert_close(getattr(umec_h.state, name), getattr(umec_d.state, name), rtol=1e-5, atol=1e-7)
    for (name, p), q in zip(model_h.named_parameters(), model_d.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_final_masks_restore_groups_when_admm_overshot():
    from umec_lightning.compression import UMEC, ADMMConfig
    from umec_lightning.models import DLRM, dense_structure

    s = dense_structure(sparse_names=["a", "b", "c"], table_sizes=[7, 9, 5], embedding_dim=4, bottom=[16, 4],
                        top=[16, 1], num_dense=3)
    umec = UMEC(DLRM(s, seed=0), {"neuron"}, ADMMConfig(budgets={"flops": 0.8}, normalize_norms=True))
    umec.state.s = (umec.packed.num_groups.double() - 1)  # ADMM overshot: every set down to one group
    over_pruned = umec.resource_of(umec.pruned_masks())["flops"]
    masks, info = umec.final_pruned_masks()
    final = umec.resource_of(masks)["flops"]
    assert info["pruned_to_meet_budget"] == 0 and umec.restored_groups == info["restored_under_budget"] > 0
    assert over_pruned < final <= 0.8
    # Tight: no single pruned group fits back in.
    for name, mask in masks.items():
        for g in mask.nonzero().flatten().tolist():
            trial = {n: m.clone() for n, m in masks.items()}
            trial[name][g] = False
            assert umec.resource_of(trial)["flops"] > 0.8 or umec.resource_of(trial)["flops"] == final


def _steps(model, umec, steps, lr=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    dense, sparse, labels = data(model)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), labels).backward()
        umec.observe_gradients()
        optimizer.step()
        umec.step(lr)


def test_taylor_warm_up_weighs_the_norms_and_resumes_exactly():
    """During the warm-up nothing is pruned or shrunk; at its end the weighted norms equal the Taylor scores
    on the scale of each set's norms; a checkpoint taken mid-warm-up continues bit for bit."""
    config = ADMMConfig(budgets={"flops": 0.5}, group_score="taylor", warmup_steps=6, normalize_norms=True)
    model = tiny("dot")
    umec = UMEC(model, {"feature", "neuron"}, config)
    before = copy.deepcopy(model.state_dict())
    _steps(model, umec, 3)
    assert umec.warming_up and umec.packed.group_weight is None and float(umec.state.s.sum()) == 0.0
    snapshot_model, snapshot = copy.deepcopy(model), copy.deepcopy(umec.state_dict())
    _steps(model, umec, 3)
    assert not umec.warming_up and umec.packed.group_weight is not None
    valid = umec.packed.valid
    weighted = umec.packed.norms()
    ratio = torch.where(valid, weighted.double() / umec.taylor.clamp(min=1e-300), 0.0)
    for l in range(umec.packed.num_sets):  # per set, weighted norm ∝ Taylor score
        r = ratio[l][valid[l] & (umec.taylor[l] > 0)]
        assert torch.allclose(r, r[0].expand_as(r), rtol=1e-4)
    _steps(model, umec, 5)  # ADMM runs after the warm-up
    assert umec.state.step == 5

    resumed = UMEC(snapshot_model, {"feature", "neuron"}, config)
    resumed.load_state_dict(snapshot)
    _steps(snapshot_model, resumed, 8)
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot_model.state_dict()[key]), key
    assert torch.equal(resumed.state.s, umec.state.s) and torch.equal(resumed.packed.group_weight,
                                                                     umec.packed.group_weight)
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_taylor_group_score_needs_a_warm_up():
    with pytest.raises(ValueError, match="warmup_steps` must be > 0 with group_score=taylor"):
        ADMMConfig(budgets={"flops": 0.5}, group_score="taylor")
    with pytest.raises(ValueError, match="group_score` must be one of"):
        ADMMConfig(budgets={"flops": 0.5}, group_score="fisher", warmup_steps=3)


def test_a_fractional_warm_up_is_a_share_of_the_stage():
    umec = UMEC(tiny("dot"), {"feature"}, ADMMConfig(budgets={"flops": 0.9}, group_score="taylor", warmup_steps=0.05))
    umec.begin(1000)
    assert umec.warmup == 50
    umec.begin(3)
    assert umec.warmup == 1  # at least one step measures the scores
    with pytest.raises(ValueError, match="fraction in"):
        ADMMConfig(budgets={"flops": 0.5}, warmup_steps=1.5)


def test_budget_ramp_moves_the_target_from_one_to_the_budget():
    """z ascends on a target that goes linearly from 1 to the budget over `budget_ramp` ADMM steps (a float
    is a share of the stage's ADMM steps, after the warm-up); on the CPU and the tensor path alike."""
    config = ADMMConfig(budgets={"flops": 0.5}, budget_ramp=0.5, group_score="taylor", warmup_steps=100)
    umec = UMEC(tiny("dot"), {"feature", "neuron"}, config)
    umec.begin(1100)
    assert umec.ramp == 500
    for step, want in ((0.0, 1.0), (250.0, 0.75), (500.0, 0.5), (900.0, 0.5)):
        assert umec.target(step)[0] == pytest.approx(want)
        assert float(umec.target(torch.tensor(step, dtype=torch.float64))[0]) == pytest.approx(want)
    paper = UMEC(tiny("dot"), {"feature"}, ADMMConfig(budgets={"flops": 0.5}))
    paper.begin(1000)
    assert paper.ramp == 0 and paper.target(1.0)[0] == 0.5
    with pytest.raises(ValueError, match="budget_ramp` must be an integer >= 0"):
        ADMMConfig(budgets={"flops": 0.5}, budget_ramp=-2)


def test_on_a_ramp_z_stays_small_and_the_resource_follows_the_target():
    """The point of the ramp: early on the resource is at or under the target, so z does not pile up."""
    def run(ramp):
        model = tiny("dot")
        umec = UMEC(model, {"feature", "neuron"}, ADMMConfig(budgets={"flops": 0.5}, budget_ramp=ramp,
                                                             normalize_norms=True))
        umec.begin(60)
        _steps(model, umec, 30)
        return float(umec.state.z[0])
    assert run(60) < run(0)


def test_holdout_scores_replace_taylor_for_the_feature_set_only():
    """group_score=holdout: at the warm-up's end the feature set's weighted norms are proportional to the
    held-out scores handed in (a negative one clamped to a tiny positive), the other sets' to Taylor."""
    config = ADMMConfig(budgets={"flops": 0.5}, group_score="holdout", warmup_steps=4, normalize_norms=True)
    model = tiny("dot")
    umec = UMEC(model, {"feature", "neuron"}, config)
    _steps(model, umec, 3)
    row = next(l for l, gs in enumerate(umec.sets) if gs.kind == "feature")
    g = umec.sets[row].num_groups
    held_out = torch.linspace(1.0, 2.0, g, dtype=torch.float64)
    held_out[0] = -0.5  # worse than useless
    umec.holdout_feature_scores = held_out
    _steps(model, umec, 1)
    assert not umec.warming_up
    weighted = umec.packed.norms()[row, :g].double()
    ratio = weighted[1:] / held_out[1:]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
    assert weighted[0] < 1e-6 * weighted[1:].min()
    valid = umec.packed.valid
    for l in range(umec.packed.num_sets):
        if l == row:
            continue
        r = (umec.packed.norms()[l].double() / umec.taylor[l].clamp(min=1e-300))[valid[l] & (umec.taylor[l] > 0)]
        assert torch.allclose(r, r[0].expand_as(r), rtol=1e-4)


def test_feature_cost_ranks_features_by_worth_per_resource_freed():
    """feature_cost: the feature set's weighted norms are the held-out scores divided by the params each feature
    frees, so under a params budget a large table that is worth twice a small one ranks
    below it (ADMM prunes it first), where by worth alone it ranked above."""
    def weighted(feature_cost: bool, budgets: dict | None = None):
        # params 0.98: C3 holds 97 % of the params, so under a lower budget no model keeps it at all (and it is
        # ranked first to go whatever the cost ranking: test_prox_step.py)
        config = ADMMConfig(budgets=budgets or {"params": 0.98}, group_score="holdout", warmup_steps=2,
                            normalize_norms=True, feature_cost=feature_cost)
        s = dense_structure(sparse_names=["C1", "C2", "C3", "C4"], table_sizes=[10, 20, 3000, 40], embedding_dim=4,
                            bottom=[8, 4], top=[8, 1], num_dense=3)
        model = DLRM(s, seed=0)
        umec = UMEC(model, {"feature"}, config)
        _steps(model, umec, 1)
        (features,) = umec.sets
        worth = torch.ones(features.num_groups, dtype=torch.float64)
        big = features.labels.index("C3")
        worth[big] = 2.0
        umec.holdout_feature_scores = worth
        _steps(model, umec, 1)
        return umec.packed.norms()[0, : features.num_groups].double(), umec._feature_costs(), big

    plain, _, big = weighted(False)
    by_cost, cost, _ = weighted(True)
    assert plain[big] == plain.max()
    assert by_cost[big] == by_cost.min() and cost[big] == cost.max()
    worth = torch.where(torch.arange(len(cost)) == big, 2.0, 1.0).to(by_cost)
    ratio = by_cost * cost / worth  # weighted norm ∝ worth / cost
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
    with pytest.raises(ValueError, match="feature_cost"):
        ADMMConfig(budgets={"params": 0.5}, feature_cost=True)
    # Under a FLOPs budget alone it changes nothing (a dense block barely learned looks cheapest per FLOP).
    assert torch.equal(weighted(True, {"flops": 0.5})[0], weighted(False, {"flops": 0.5})[0])


@pytest.mark.parametrize("interaction, host", [("dot", True), ("cat", True), ("dot", False)])
def test_every_n_steps_is_one_iteration_with_n_times_the_steps(interaction, host):
    """every_n_steps n: the first step after the warm-up iterates with η1..η4 times n (the same as an
    every-step UMEC with those etas and n·lr), the next n − 1 steps change nothing, then it iterates again."""
    n, lr = 3, 0.1
    base = dict(budgets={"flops": 0.5, "params": 0.7}, eta_s=0.2)
    lazy_model, eager_model = tiny(interaction), tiny(interaction)
    lazy = UMEC(lazy_model, kinds_for(interaction), ADMMConfig(**base, every_n_steps=n))
    eager = UMEC(eager_model, kinds_for(interaction),
                 ADMMConfig(**{**base, "eta_s": 0.2 * n}, eta_y=0.1 * n, eta_z=2.0 * n))
    lazy._host = eager._host = host
    for u in (lazy, eager):  # start from a state where the prox and the duals all act
        u.state.s = torch.full_like(u.state.s, 1.5)
        u.state.y = torch.full_like(u.state.y, 0.5)
        u.state.z = torch.full_like(u.state.z, 0.3)
    for _ in range(3):
        lazy_stats = lazy.step(lr)
        eager.step(lr * n)
        for name in ("s", "y", "z", "step", "adam_m", "adam_v"):
            torch.testing.assert_close(getattr(lazy.state, name), getattr(eager.state, name), rtol=1e-12,
                                       atol=0, msg=name)
        for (name, p), q in zip(lazy_model.named_parameters(), eager_model.parameters()):
            assert torch.equal(p, q), name
        before = copy.deepcopy(lazy.state_dict())
        weights = [p.detach().clone() for p in lazy_model.parameters()]
        for _ in range(n - 1):  # between iterations: the same stats, nothing moves
            assert lazy.step(lr) is lazy_stats
        after = lazy.state_dict()
        assert all(torch.equal(before[name], after[name]) for name in ("s", "y", "z", "step"))
        assert all(torch.equal(w, p) for w, p in zip(weights, lazy_model.parameters()))
        with torch.no_grad():  # SGD would move the weights in between; let it here too, alike on both
            for p, q in zip(lazy_model.parameters(), eager_model.parameters()):
                noise = torch.randn_like(p) * 0.01
                p.add_(noise)
                q.add_(noise)
    assert int(lazy.state.step) == 3 and torch.any(lazy.state.s != 1.5)


def test_every_n_steps_counts_the_ramp_in_iterations_and_is_validated():
    model = tiny("dot")
    config = ADMMConfig(budgets={"flops": 0.5}, every_n_steps=4, budget_ramp=0.5, warmup_steps=8,
                        group_score="taylor")
    umec = UMEC(model, ALL, config)
    umec.begin(408)  # 400 steps after the warm-up: 100 iterations, half of them on the ramp
    assert umec.warmup == 8 and umec.ramp == 50
    umec = UMEC(model, ALL, ADMMConfig(budgets={"flops": 0.5}, every_n_steps=4, budget_ramp=10))
    umec.begin(100)
    assert umec.ramp == 3  # an int counts optimizer steps: 10 steps are 3 iterations (rounded up)
    for bad in (0, -1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="mode.method.admm.every_n_steps"):
            ADMMConfig(budgets={"flops": 0.5}, every_n_steps=bad)


def test_final_masks_swap_an_expensive_last_group_for_a_cheaper_one():
    """Greedy cuts by score per unit saved take every sparse feature first and strand the feature set on its
    dense block, which alone exceeds the budget; the completion keeps a cheap feature instead (it used to
    raise 'every group set is down to one group' after a whole training run: input_selection, flops 0.5)."""
    from umec_lightning.compression import UMEC, ADMMConfig
    from umec_lightning.compression.selection import select_groups
    from umec_lightning.models import DLRM, dense_structure

    s = dense_structure(sparse_names=["a", "b", "c"], table_sizes=[7, 9, 5], embedding_dim=4, bottom=[64, 4],
                        top=[16, 1], num_dense=3)
    umec = UMEC(DLRM(s, seed=0), {"feature"}, ADMMConfig(budgets={"flops": 0.5}, normalize_norms=True))
    (features,) = umec.sets
    dense = features.labels.index("dense")
    scores = torch.ones(1, umec.packed.max_groups, dtype=torch.float64)
    scores[0, dense] = 100.0  # by far the most useful input: the greedy cuts it last
    only_dense = umec.packed.valid.clone()
    only_dense[0, dense] = False
    assert umec.resource.evaluate(only_dense[None])[0].item() > 0.5  # the dense block alone is over budget
    pruned, info = select_groups(umec.resource, umec.packed, scores, {"flops": 0.5})
    flops = umec.resource.evaluate(pruned[None])[0].item()
    assert flops <= 0.5 and bool(pruned[0, dense]) and info["pruned_to_meet_budget"] >= 1
    assert int((umec.packed.valid & ~pruned).sum()) >= 1
