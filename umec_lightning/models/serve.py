"""The model a server runs: batch norm folded into the Linear before it, dropout gone.

A batch norm in eval mode is an affine map per channel, y = a·(z − μ) + β with a = γ / sqrt(σ² + ε) and z the
output of the Linear before it (z = Wx + b), so W' = diag(a)·W, b' = a·(b − μ) + β computes y with no batch
norm at all. Dropout is the identity in eval mode. `fold_batch_norm` builds that model; export, latency and
every resource figure (`models.cost.measure` counts Linears, never a batch norm) are about it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .dlrm import DLRM, Factored


def batch_norm_affine(norm: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
    """(a, c) with norm(z) = a·z + c in eval mode, per channel: a = γ/sqrt(σ² + ε), c = β − a·μ."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -scale * norm.running_mean
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def folded_linear(layer: nn.Module, norm: nn.Module | None) -> tuple[Tensor, Tensor]:
    """(W', b') of a plain Linear followed by `norm` (a BatchNorm1d, or None / an Identity: W, b), fresh."""
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    if isinstance(norm, nn.BatchNorm1d):
        scale, shift = batch_norm_affine(norm)
        weight, bias = weight * scale[:, None], bias * scale + shift
    return weight, bias


@torch.no_grad()
def fold_batch_norm(model: DLRM) -> DLRM:
    """A fresh eval-mode DLRM computing what `model` computes in eval mode, without batch norm or dropout
    (`model` itself when it has neither). A factored layer's norm folds into its second factor."""
    s = model.structure
    if s.batch_norm is None and s.dropout is None:
        return model
    if model.dim_gate is not None:
        raise ValueError("fold_batch_norm: the model still has a dim gate (a model in the middle of compression); "
                         "fold an extracted model")
    norms = model.batch_norms()
    state = {k: v for k, v in model.state_dict().items() if ".norms." not in k}
    for name, layer in model.linear_layers().items():
        if name in norms:
            key = f"{name}.second" if isinstance(layer, Factored) else name
            linear = layer.second if isinstance(layer, Factored) else layer
            state[f"{key}.weight"], state[f"{key}.bias"] = folded_linear(linear, norms[name])
    from ..quant.sparse import QuantizedSparseArch  # here: quant builds on the models

    quantized = isinstance(model.sparse, QuantizedSparseArch)
    with torch.random.fork_rng(devices=[]):  # its throwaway init must not move the caller's random stream
        out = type(model)(dataclasses.replace(s, batch_norm=None, dropout=None), sparse_grad=model.sparse_grad,
                          hold_tables=not quantized)
    if quantized:  # row-wise quantized tables (`quant.sparse`): the same arch, empty, to load the codes into
        out.sparse = type(model.sparse).empty(out.structure, dict(model.sparse.bits))
    out.load_state_dict(state, strict=True)
    return out.to(next(model.parameters()).device).eval()
