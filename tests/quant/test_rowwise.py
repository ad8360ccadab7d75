"""Row-wise quantization maths (quant/rowwise.py): the round-trip error bound |x − x̂| <= s/2, constant rows, int4
nibble packing (odd widths too), the straight-through estimator's identity gradient, and the byte formula against
the real tensors."""

from __future__ import annotations

import pytest
import torch

from umec_lightning.quant.rowwise import (
    dequantize_rows,
    fake_quantize_rows,
    quantize_rows,
    row_bytes,
    storage_bytes,
)

EPS32 = torch.finfo(torch.float32).eps


pytestmark = pytest.mark.usefixtures("one_thread")


def weights(rows: int = 64, dim: int = 7, seed: int = 0) -> torch.Tensor:
    """Rows of very different spans and offsets: tiny, unit, large, far from zero (the fp16 bias rounds there)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=gen)
    spread = torch.logspace(-5, 2, rows)[:, None]
    offset = torch.where(torch.arange(rows)[:, None] % 3 == 0, 100.0 + 7.3 * torch.arange(rows)[:, None], 0.0)
    return (w * spread + offset).float()


def levels_of(w: torch.Tensor, table) -> torch.Tensor:
    """The codes by the formula, independently: clamp(round((x − m) / s), 0, 2^b − 1) from the stored s and m."""
    q = torch.round((w.double() - table.bias.double()[:, None]) / table.scale.double()[:, None])
    return q.clamp(0, (1 << table.bits) - 1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim", [1, 6, 7, 16])
def test_round_trip_within_half_a_step(bits, dim):
    w = weights(dim=dim)
    table = quantize_rows(w, bits)
    assert table.codes.dtype == torch.uint8 and table.codes.shape == (64, (dim * bits + 7) // 8)
    assert table.scale.dtype == table.bias.dtype == torch.float16 and table.scale.shape == table.bias.shape == (64,)
    deq = dequantize_rows(table)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    scale = table.scale.float()[:, None]
    # s/2 from rounding to the nearest level, plus the one fp32 rounding of q·s + m
    bound = scale / 2 + EPS32 * w.abs()
    assert ((w - deq).abs() <= bound).all()
    assert (table.bias.float() <= w.min(1).values).all()  # bias rounded down, the top level covers the max
    assert (table.bias.float() + ((1 << bits) - 1) * table.scale.float() >= w.max(1).values).all()


def test_dequantization_is_reproducible_from_stored_values():
    w = weights(dim=5)
    for bits in (8, 4):
        table = quantize_rows(w, bits)
        q = levels_of(w, table)
        expected = q.float() * table.scale.float()[:, None] + table.bias.float()[:, None]
        assert torch.equal(dequantize_rows(table), expected)


def test_float_widths():
    w = weights(dim=5)
    assert torch.equal(dequantize_rows(quantize_rows(w, 32)), w)
    stored = quantize_rows(w, 32)
    assert stored.codes.data_ptr() != w.data_ptr()  # a copy: later writes to the model do not reach it
    assert dequantize_rows(stored).data_ptr() != stored.codes.data_ptr()
    half = quantize_rows(w, 16)
    assert half.codes.dtype == torch.float16 and torch.equal(dequantize_rows(half), w.half().float())


@pytest.mark.parametrize("bits", [8, 4])
def test_constant_rows_exact(bits):
    values = [0.0, 1.0, -3.5, 2.0**-20, 1024.0, 0.1]
    w = torch.tensor(values)[:, None].repeat(1, 5)
    table = quantize_rows(w, bits)
    deq = dequantize_rows(table)
    exact = torch.tensor(values).half().float() == torch.tensor(values)  # fp16 numbers: 0.1 is not one
    assert torch.equal(deq[exact], w[exact])
    assert (table.scale[exact] == 1).all() and (table.codes[exact] == 0).all()  # fbgemm: s = 1, codes 0
    # a non-fp16 value: within half a step, a tiny one (the bias is 0.1 rounded down to fp16, a 2^-14 gap at most)
    assert ((deq[~exact] - w[~exact]).abs() <= table.scale[~exact].float()[:, None] / 2 + EPS32).all()
    assert table.scale[~exact].float().max() <= 2.0**-14 / ((1 << bits) - 1) + 2.0**-24  # + one fp16 subnormal
    assert (deq.std(1) == 0).all()  # still constant


@pytest.mark.parametrize("dim", [1, 5, 6])
def test_int4_packing(dim):
    w = weights(rows=9, dim=dim, seed=3)
    table = quantize_rows(w, 4)
    assert table.codes.shape == (9, (dim + 1) // 2)
    q = levels_of(w, table).to(torch.uint8)
    low, high = table.codes & 15, table.codes >> 4
    assert torch.equal(low, q[:, 0::2])  # element 2k: low nibble of byte k (fbgemm's order)
    assert torch.equal(high[:, : dim // 2], q[:, 1::2])
    if dim % 2:
        assert (high[:, -1] == 0).all()  # the pad nibble
    assert torch.equal(dequantize_rows(table), q.float() * table.scale.float()[:, None] + table.bias.float()[:, None])


def test_dequantize_selected_rows():
    w = weights(dim=5)
    ids = torch.tensor([3, 0, 3, 63])
    for bits in (32, 16, 8, 4):
        table = quantize_rows(w, bits)
        assert torch.equal(dequantize_rows(table, ids), dequantize_rows(table)[ids])


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_straight_through_gradient(bits):
    w = weights(dim=6).requires_grad_(True)
    out = fake_quantize_rows(w, bits)
    assert torch.equal(out, dequantize_rows(quantize_rows(w.detach(), bits)))
    upstream = torch.randn_like(w)
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)
    assert fake_quantize_rows(w, 32) is w


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
@pytest.mark.parametrize("dim", [1, 5, 16])
def test_storage_bytes_match_tensors(bits, dim):
    table = quantize_rows(weights(rows=11, dim=dim), bits)
    real = table.codes.numel() * table.codes.element_size() + 2 * table.scale.numel() + 2 * table.bias.numel()
    assert storage_bytes(11, dim, bits) == real == table.nbytes
    assert row_bytes(dim, bits) * 11 == real
    if bits < 16:
        assert table.codes.element_size() == 1 and real == 11 * ((dim * bits + 7) // 8 + 4)


def test_compression_ratios_of_d16():
    fp32 = storage_bytes(1000, 16, 32)
    assert fp32 / storage_bytes(1000, 16, 16) == 2
    assert fp32 / storage_bytes(1000, 16, 8) == pytest.approx(16 * 4 / (16 + 4))  # 3.2
    assert fp32 / storage_bytes(1000, 16, 4) == pytest.approx(64 / (8 + 4))  # 5.33


def test_refusals():
    w = weights(dim=4)
    with pytest.raises(ValueError, match="bit width"):
        quantize_rows(w, 3)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows(torch.tensor([[1.0, float("inf")]]), 8)
    with pytest.raises(ValueError, match="fp16's range"):
        quantize_rows(torch.tensor([[1.0, 70000.0]]), 16)
    with pytest.raises(ValueError, match="fp16's range"):  # the bias (the row's min) is fp16
        quantize_rows(torch.tensor([[-70000.0, 1.0]]), 8)
    # a large max alone is fine at 8/4 bits: only the span / L needs to be an fp16 number
    big = torch.tensor([[1.0, 70000.0]])
    assert (dequantize_rows(quantize_rows(big, 8)) - big).abs().max() <= 70000 / 255
    with pytest.raises(ValueError, match="rows, d"):
        quantize_rows(torch.ones(4), 8)
