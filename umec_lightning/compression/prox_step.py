"""The step size of UMEC's prox under the optimizer that trains the weights (`admm.prox_step: adaptive`).

The prox of y·||W_g||² with step η is W_g ← W_g / (1 + 2ηy) (admm.py, step 1). Proximal gradient needs η to be
the step the optimizer just took on g's weights. Under plain SGD that is the learning rate. Under Adam, Adagrad
or RMSprop the step on weight i is lr·P_i·(its gradient), with the preconditioner P_i = 1/(√v̂_i + ε): a pruned
group whose gradients are small still moves ~lr per weight per step, since Adam normalises them. A prox at the
nominal lr (shrink 1 + 2·lr·y with lr 1e-3) then cannot hold the group at zero. Its leftover norm keeps the
sparsity dual y climbing, y·v holds s back while the resource dual z climbs after it, and ADMM stalls short of the
budget, y and z still rising (docs/admm_schedule.md).

The group's step here is the optimizer's gain on this step's gradient over the group:

    η_g = lr · sqrt( Σ_{i in g} (P_i·g_i)² / Σ_{i in g} g_i² )       (lr where the group has no gradient)

which is lr under SGD, and under Adam the step per unit gradient that the optimizer actually applied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .groups import slice_sum

Preconditioner = Callable[[nn.Parameter], "Tensor | None"]


def _adam(state: dict, group: dict) -> Tensor | None:
    v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
    step = state.get("step")
    if v is None or step is None or float(step) < 1:
        return None
    correction = 1.0 - group["betas"][1] ** float(step)
    return 1.0 / ((v / correction).sqrt() + group["eps"])


def _adagrad(state: dict, group: dict) -> Tensor | None:
    total = state.get("sum")
    return None if total is None else 1.0 / (total.sqrt() + group["eps"])


def _rmsprop(state: dict, group: dict) -> Tensor | None:
    avg = state.get("square_avg")
    return None if avg is None else 1.0 / (avg.sqrt() + group["eps"])


_RULES = ((torch.optim.Adam, _adam), (torch.optim.AdamW, _adam), (torch.optim.Adagrad, _adagrad),
          (torch.optim.RMSprop, _rmsprop))


def preconditioner(optimizer) -> Preconditioner | None:
    """param -> P (the param's shape, same dtype) of the optimizer's last step, or None for a parameter it has
    no state for. None for an optimizer without a per-weight preconditioner (SGD: the step is the lr)."""
    rule = next((r for cls, r in _RULES if isinstance(optimizer, cls)), None)
    if rule is None:
        return None
    # param id -> its group, rebuilt when the optimizer's group list is replaced (loading a checkpoint replaces it
    # and the state dict: both are read through `optimizer` at call time, never kept stale).
    index: dict = {"groups": None, "of": {}}

    def of(param: nn.Parameter) -> Tensor | None:
        if index["groups"] is not optimizer.param_groups:
            index["groups"] = optimizer.param_groups
            index["of"] = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        group = index["of"].get(id(param))
        state = optimizer.state.get(param)
        if group is None or not state:
            return None
        sparse = next((v for v in state.values() if isinstance(v, Tensor) and v.is_sparse), None)
        return None if sparse is not None else rule(state, group)

    return of


@torch.no_grad()
def group_gain(packed, precondition: Preconditioner) -> Tensor:
    """(S, Gmax) float64: sqrt(Σ (P·g)² / Σ g²) per group of `packed` (the gradients in `.grad`); 1 where a
    group has no gradient or no preconditioner (and in the padding)."""
    cache: dict[int, tuple[Tensor | None, Tensor | None]] = {}

    def terms(param):
        if id(param) not in cache:
            grad = param.grad
            p = precondition(param) if grad is not None else None
            if p is not None and grad.is_sparse:  # a sparse table (Adagrad): only the rows the batch touched
                grad = grad.coalesce()
                p = p.sparse_mask(grad)
            cache[id(param)] = (grad, None if p is None else p * grad)
        return cache[id(param)]

    def sums(values, dim):
        if not values.is_sparse:
            return slice_sum(values.square(), dim)
        squared = values.square()
        other = [d for d in range(values.dim()) if d != dim]
        return (torch.sparse.sum(squared, dim=other) if other else squared).to_dense()

    def gained(param, dim):
        grad, scaled = terms(param)
        return param.new_zeros(param.shape[dim]) if scaled is None else sums(scaled, dim)

    def plain(param, dim):
        grad, scaled = terms(param)
        return param.new_zeros(param.shape[dim]) if scaled is None else sums(grad, dim)

    num = packed.group_sums(gained, torch.float64)
    den = packed.group_sums(plain, torch.float64)
    return torch.where(den > 0, (num / den.clamp(min=1e-300)).sqrt(), torch.ones_like(den))
