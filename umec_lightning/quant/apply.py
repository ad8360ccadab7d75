"""Quantizing a built model of any family (DLRM, DCNv2, DeepFM, Wide & Deep: every one keeps its tables in
`model.sparse`), and counting what it stores.

  quantize_tables(model, bits)   a copy with `model.sparse` a `QuantizedSparseArch` (tables row-wise quantized)
  dense_to_half(model, dtype)    a copy whose Linears (outside `sparse`) store weight and bias as fp16/bf16 and
                                 compute in the input's dtype (fp32): weight-only, the activations stay fp32
  model_bytes(model)             stored bytes by part, each tensor at its own dtype

Apply them to the model as served: `models.serve.fold_batch_norm` first when the model has batch norm or dropout
in its MLPs (export folds a float model itself, but a folded model is rebuilt from its float structure and cannot
hold quantized tables).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sparse import QuantizedSparseArch

__all__ = ["HalfStoredLinear", "dense_to_half", "model_bytes", "quantize_tables"]


def quantize_tables(model: nn.Module, bits: int | dict[str, int]) -> nn.Module:
    """A deep copy of `model` (any family) whose `sparse` is `QuantizedSparseArch.from_float(model.sparse, bits)`:
    `bits` one width (32, 16, 8, 4) for every table, or {feature name: width} (a missing name: 32). The float
    tables are not copied (only quantized), so the copy costs the quantized tables and the rest of the model."""
    placeholder = nn.Module()
    # deepcopy's memo maps the float arch to a placeholder: its (large) tables are never copied.
    out = copy.deepcopy(model, memo={id(model.sparse): placeholder})
    out.sparse = QuantizedSparseArch.from_float(model.sparse, bits)
    return out


class HalfStoredLinear(nn.Linear):
    """A Linear whose weight and bias are stored in `dtype` (fp16 or bf16) and upcast to the input's dtype in
    forward: y = x · W.to(x)ᵀ + b.to(x). Weight-only: half the bytes, the arithmetic stays fp32. Still an nn.Linear
    (in_features, out_features, weight), so code that finds a model's Linears finds it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> HalfStoredLinear:
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, linear.weight.device)
        out.weight.copy_(linear.weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
        return out.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias
        if bias is not None:
            bias = bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def dense_to_half(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """A deep copy of `model` with every plain nn.Linear outside `model.sparse` (the MLPs, the cross network, a
    factored layer's two factors, heads) a `HalfStoredLinear` in `dtype`. The tables, the projections, batch norms
    and other parameters (DCNv2's mixture biases, a gate) are left as they are."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dense_to_half stores fp16 or bf16, got {dtype}")
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if name == "sparse" or name.startswith("sparse."):
            continue
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:  # exactly: a Projection or a HalfStoredLinear is not converted
                setattr(module, child_name, HalfStoredLinear.from_linear(child, dtype))
    return out


def _is_table_key(key: str) -> bool:
    """State-dict keys of the tables: a float SparseArch's fused groups (or old per-table keys), a quantized arch's
    table buffers."""
    return key.startswith(("sparse.groups.", "sparse.tables.", "sparse.qgroups."))


def model_bytes(model: nn.Module) -> dict[str, int]:
    """{tables, dense, total}: bytes of what a server stores, each tensor of the state dict at its own dtype
    (numel × element size; meta tensors count as if held). `tables`: the embedding tables (a quantized table by its
    codes, scales and biases); `dense`: everything else, projections, Linears (fp16 ones at 2 bytes), batch-norm
    affine and running statistics, gates. Batch norm's `num_batches_tracked` (training bookkeeping) and
    non-persistent buffers (rebuilt from the structure) are not counted."""
    tables = dense = 0
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    for key, tensor in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if not tensor.is_meta:  # a tensor shared under two names is stored once
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
            if ident in seen:
                continue
            seen.add(ident)
        size = tensor.numel() * tensor.element_size()
        if _is_table_key(key):
            tables += size
        else:
            dense += size
    return {"tables": tables, "dense": dense, "total": tables + dense}
