"""Row-wise quantization of embedding tables (fbgemm's convention), in plain PyTorch.

A table W (rows, d) float32 is stored at one of four bit widths b:

  32  the fp32 weight itself (untouched)                        rows·d·4 bytes
  16  the weight as fp16                                        rows·d·2 bytes
   8  per row i: codes q_ij ∈ [0, 255] (one uint8 each),       rows·(d + 4) bytes
      scale s_i and bias m_i (fp16 each)
   4  per row: codes q_ij ∈ [0, 15], two per uint8 byte         rows·(ceil(d/2) + 4) bytes
      (element j in byte j // 2, low nibble for even j: fbgemm's packing), s_i and m_i (fp16)

  levels L = 2^b − 1,  m_i = min_j W_ij rounded *down* to fp16,  s_i = (max_j W_ij − m_i) / L rounded *up* to fp16,
  q_ij = clamp(round((W_ij − m_i) / s_i), 0, L),  dequantized Ŵ_ij = q_ij · s_i + m_i  (in fp32, s and m upcast).

The scale and bias are the stored fp16 values the codes are computed from, so dequantization is exactly
reproducible from (codes, scale, bias). Rounding m down and s up (not to nearest) keeps every W_ij inside
[m_i, m_i + L·s_i], so |W_ij − Ŵ_ij| <= s_i / 2 (plus one fp32 rounding of the final add) with no clamping loss. A
constant row (max == min) gets s = 1 (fbgemm's choice) and codes 0: it dequantizes to m exactly, its value itself
whenever that is an fp16 number (zero rows in particular).

`fake_quantize_rows` is the straight-through estimator for quantization-aware training: forward Ŵ, backward the
identity. `storage_bytes` is the exact size of a stored table (what a server holds), `RowwiseTable.nbytes` the size
of the real tensors; they agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BITS", "RowwiseTable", "check_bits", "dequantize_codes", "dequantize_rows", "fake_quantize_rows",
           "quantize_rows", "row_bytes", "storage_bytes"]

BITS = (32, 16, 8, 4)
# Bytes per row of the per-row metadata of the integer widths: an fp16 scale and an fp16 bias.
META_BYTES = 4


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bit width must be one of {BITS}, got {bits!r}")
    return int(bits)


def code_bytes(dim: int, bits: int) -> int:
    """Bytes of one row's codes at 8 or 4 bits: ceil(d·b / 8)."""
    return (dim * bits + 7) // 8


def row_bytes(dim: int, bits: int) -> int:
    """Stored bytes of one d-wide row at `bits` (module docstring's table)."""
    check_bits(bits)
    if bits >= 16:
        return dim * bits // 8
    return code_bytes(dim, bits) + META_BYTES


def storage_bytes(rows: int, dim: int, bits: int) -> int:
    """Exact stored bytes of a (rows, dim) table at `bits`: rows·d·4 (32), rows·d·2 (16),
    rows·(ceil(d·b/8) + 4) (8 and 4: the codes, an fp16 scale and an fp16 bias per row)."""
    return rows * row_bytes(dim, bits)


@dataclass
class RowwiseTable:
    """A stored table. `codes`: uint8 (rows, ceil(d·bits/8)) at 8 and 4 bits; at 16 and 32 bits the weight itself,
    fp16 or fp32 (rows, d). `scale`, `bias`: fp16 (rows,) at 8 and 4 bits, empty (0,) fp16 tensors otherwise."""

    codes: Tensor
    scale: Tensor
    bias: Tensor
    bits: int
    dim: int

    @property
    def rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the real tensors (numel × element size), to compare with `storage_bytes`."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.bias))


def _half_toward(x: Tensor, up: bool) -> Tensor:
    """fp16 of x (float32/float64) rounded toward +inf (`up`) or -inf: the nearest fp16 stepped once where it
    landed on the wrong side. Raises where x is outside fp16's range (inf after rounding)."""
    h = x.to(torch.float16)
    wrong = h.to(x.dtype) < x if up else h.to(x.dtype) > x
    if bool(wrong.any()):
        target = torch.full_like(h, math.inf if up else -math.inf)
        h = torch.where(wrong, torch.nextafter(h, target), h)
    if not bool(torch.isfinite(h).all()):
        raise ValueError("row-wise quantization: a value is outside fp16's range (|x| > 65504)")
    return h


def quantize_rows(weight: Tensor, bits: int) -> RowwiseTable:
    """weight (rows, d) float -> `RowwiseTable` at `bits` (module docstring). The arithmetic that picks the codes
    is float64, so the codes depend on the stored fp16 scale and bias alone, not on float32 rounding order."""
    bits = check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"quantize_rows needs a (rows, d) weight, got shape {tuple(weight.shape)}")
    weight = weight.detach()
    rows, dim = weight.shape
    empty = torch.empty(0, dtype=torch.float16, device=weight.device)
    if bits == 32:
        return RowwiseTable(weight.to(torch.float32).clone(), empty, empty.clone(), bits, dim)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("row-wise quantization: the weight has a non-finite value")
    if bits == 16:
        half = weight.to(torch.float16)
        if not bool(torch.isfinite(half).all()):
            raise ValueError("row-wise quantization: a value is outside fp16's range (|x| > 65504)")
        return RowwiseTable(half, empty, empty.clone(), bits, dim)
    levels = (1 << bits) - 1
    x = weight.to(torch.float64)
    if dim == 0:
        lo, hi = x.new_zeros(rows), x.new_zeros(rows)
    else:
        lo, hi = x.min(dim=1).values, x.max(dim=1).values
    bias = _half_toward(lo, up=False)  # m <= min: no value below the first level
    span = (hi - bias.to(torch.float64)) / levels
    scale = _half_toward(span, up=True)  # m + L·s >= max: no value above the last level
    scale = torch.where(span > 0, scale, torch.ones_like(scale))  # constant row: s = 1, codes 0, Ŵ = m
    q = torch.round((x - bias.to(torch.float64)[:, None]) / scale.to(torch.float64)[:, None])
    q = q.clamp_(0, levels).to(torch.uint8)  # (rows, d)
    if bits == 4:
        if dim % 2:  # odd d: the last byte's high nibble is a zero pad
            q = torch.cat([q, q.new_zeros(rows, 1)], dim=1)
        q = q[:, 0::2] | (q[:, 1::2] << 4)  # element 2k in the low nibble of byte k, 2k+1 in its high nibble
    return RowwiseTable(q.contiguous(), scale, bias, bits, dim)


def dequantize_codes(codes: Tensor, scale: Tensor, bias: Tensor, bits: int, dim: int) -> Tensor:
    """Rows of a stored table -> float32 (n, dim): `codes` (n, ·) and, at 8/4 bits, `scale`, `bias` (n,) fp16 of the
    same n rows. The one formula every path uses (eager, `QuantizedSparseArch`, TorchScript, ONNX): the first three
    agree bit for bit, ONNX runtimes to float rounding. int4 unpacking is remainder and floor division by 16 of the
    int32 codes (ONNX: Mod, and Div and Floor on a float cast, exact for codes <= 255)."""
    if bits >= 16:
        return codes.to(torch.float32)
    if bits == 4:
        c = codes.to(torch.int32)
        low = torch.remainder(c, 16)  # element 2k
        high = torch.div(c, 16, rounding_mode="floor")  # element 2k + 1
        q = torch.stack([low, high], dim=2).flatten(1)[:, :dim]  # (n, 2·ceil(d/2)) -> (n, d)
    else:
        q = codes
    return q.to(torch.float32) * scale.to(torch.float32).unsqueeze(1) + bias.to(torch.float32).unsqueeze(1)


def dequantize_rows(table: RowwiseTable, ids: Tensor | None = None) -> Tensor:
    """float32 (n, d): the rows `ids` (int64 (n,)) of the stored table, or all its rows (n = rows)."""
    codes, scale, bias = table.codes, table.scale, table.bias
    if ids is not None:
        codes = codes.index_select(0, ids)
        if table.bits < 16:
            scale, bias = scale.index_select(0, ids), bias.index_select(0, ids)
    out = dequantize_codes(codes, scale, bias, table.bits, table.dim)
    return out.clone() if out is table.codes else out  # never hand out the stored fp32 weight itself


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, bits: int) -> Tensor:
        return dequantize_rows(quantize_rows(weight, bits)).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None  # straight through: d Ŵ / d W taken as the identity


def fake_quantize_rows(weight: Tensor, bits: int) -> Tensor:
    """Ŵ = dequantize(quantize(W)) (rows, d) in the forward, the identity in the backward (straight-through
    estimator, for quantization-aware training). At 32 bits W itself."""
    if check_bits(bits) == 32:
        return weight
    return _FakeQuantize.apply(weight, bits)
