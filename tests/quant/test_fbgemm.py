"""quant/fbgemm.py: a QuantizedSparseArch's tables in fbgemm's inference TBE (IntNBitTableBatchedEmbeddingBagsCodegen,
CPU kernels). On a DLRM with tables of several sizes and widths (4, 8, 16; odd widths 3, 5, 7 at 8, 16 and 32
bits), fbgemm's lookups of 1,000 random rows per table equal the arch's per-table outputs (before projections)
bit for bit (torch.equal, tolerance 0) at int8, int4, fp16, fp32 and mixed bits, at row alignments 1 and 16 and
with pooling SUM or NONE: fbgemm dequantizes in fp32 as fma(scale, q, 0 + bias), one rounding of q·s + m, and our
q·s is exact in fp32, so our fl(q·s + m) is the same number (module docstring). fbgemm's own split of its rows
(scale, bias, codes) is ours; an odd width at int4 is held one column wider (its pad nibble) and cut back."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("fbgemm_gpu")

from fbgemm_gpu.split_embedding_configs import SparseType  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import rounded_row_size_in_bytes  # noqa: E402

from umec_lightning.models import dense_structure  # noqa: E402
from umec_lightning.models.family import family_of_structure  # noqa: E402
from umec_lightning.quant import QuantizedSparseArch, dequantize_rows, quantize_tables  # noqa: E402
from umec_lightning.quant.fbgemm import (  # noqa: E402
    fbgemm_lookup,
    fbgemm_row_bytes,
    fbgemm_rows,
    serve_with_fbgemm,
    to_fbgemm,
)

NAMES = ["C1", "C2", "C3", "C4", "C5", "C6"]
# Kept features, their columns permuted (C6 first, C5 dropped), sizes 3 .. 1000 and widths 4, 8, 16.
KEPT = [5, 0, 3, 1, 2]
SIZES = [1000, 37, 500, 3, 200]
DIMS = [4, 8, 16, 8, 4]
ODD_DIMS = [5, 3, 7, 6, 4]
MIXED = {"C6": 8, "C1": 4, "C4": 16, "C3": 4}  # C2 unnamed: fp32; one table per group
MIXED_FUSED = {"C6": 4, "C3": 4, "C1": 8, "C2": 8, "C4": 16}  # C6 + C3 (4 bits, 4 wide) and C1 + C2 (8, 8) fused
ROWS = 1000


pytestmark = pytest.mark.usefixtures("one_thread")


def dlrm(dims: list[int], ranks: list[int] | None = None, seed: int = 0):
    s = dense_structure(sparse_names=NAMES, table_sizes=[10] * len(NAMES), embedding_dim=4, bottom=[8, 4],
                        top=[8, 1], num_dense=3, dense_names=["I1", "I2", "I3"], interaction="cat")
    s = dataclasses.replace(s, feature_ids=KEPT, table_sizes=SIZES, table_dims=dims, table_ranks=ranks)
    model = family_of_structure(s.to_dict()).build(s, seed=seed).eval()
    with torch.no_grad():  # wide-ranging rows: negative and positive, some large, one constant row
        gen = torch.Generator().manual_seed(seed + 1)
        for group in model.sparse.groups:
            group.weight.normal_(0.0, 1.0, generator=gen).mul_(torch.rand(group.weight.shape[0], 1, generator=gen)
                                                                * 20)
            group.weight[0] = 0.25
    return model


def random_sparse(arch: QuantizedSparseArch, seed: int = 0) -> torch.Tensor:
    """(ROWS, S) int64: column c holds ids of the table reading it (random elsewhere)."""
    gen = torch.Generator().manual_seed(seed)
    sparse = torch.randint(0, 3, (ROWS, len(NAMES)), generator=gen)
    for spec in arch.specs:
        sparse[:, spec.column] = torch.randint(0, spec.rows, (ROWS,), generator=gen)
    return sparse


def columns(arch: QuantizedSparseArch) -> dict[str, int]:
    return {spec.name: spec.column for spec in arch.specs}


def assert_same(arch: QuantizedSparseArch, got: list[torch.Tensor], sparse: torch.Tensor) -> None:
    want = arch(sparse)
    assert len(got) == len(want) == len(arch.feature_names)
    for name, g, w, spec in zip(arch.feature_names, got, want, arch.specs):
        assert g.dtype == torch.float32 and g.shape == (ROWS, spec.stored_dim), name
        assert torch.equal(g, w), f"{name} at {arch.bits[name]} bits: max |Δ| {(g - w).abs().max().item()}"


@pytest.mark.parametrize("row_alignment", [1, 16])
@pytest.mark.parametrize("bits", [8, 4, 16, 32, "mixed", "fused"])
def test_lookups_equal_the_arch(bits, row_alignment):
    bits = {"mixed": MIXED, "fused": MIXED_FUSED}.get(bits, bits)
    arch = quantize_tables(dlrm(DIMS), bits).sparse
    tbe, order = to_fbgemm(arch, row_alignment=row_alignment)
    assert order == arch.feature_names == ["C6", "C1", "C4", "C2", "C3"]
    sparse = random_sparse(arch)
    got = fbgemm_lookup(tbe, order, sparse, columns(arch))
    assert_same(arch, got, sparse)
    # columns parallel to `order` read the same
    by_list = fbgemm_lookup(tbe, order, sparse, [spec.column for spec in arch.specs])
    assert all(torch.equal(a, b) for a, b in zip(got, by_list))


def test_odd_widths_at_8_16_32_bits():
    """fbgemm's INT8, FP16 and FP32 rows take any width: 5 at int8, 3 at fp16, 7 at fp32 (6 at int4)."""
    arch = quantize_tables(dlrm(ODD_DIMS), {"C6": 8, "C1": 16, "C4": 32, "C2": 4, "C3": 8}).sparse
    sparse = random_sparse(arch, seed=1)
    for row_alignment in (1, 16):
        tbe, order = to_fbgemm(arch, row_alignment=row_alignment)
        assert_same(arch, fbgemm_lookup(tbe, order, sparse, columns(arch)), sparse)


@pytest.mark.parametrize("via", ["tbe", "torchrec"])
def test_odd_width_at_int4_is_served(via):
    """fbgemm packs int4 two codes a byte and asserts an even width: a 5-wide (C6) and a 3-wide (C1) int4 table go
    in one column wider (the pad nibble; the same bytes a row) and the lookups cut it off: equal to the arch."""
    arch = quantize_tables(dlrm(ODD_DIMS), {"C6": 4, "C1": 4, "C4": 8}).sparse
    sparse = random_sparse(arch, seed=2)
    dims = [arch.table(name).dim for name in arch.feature_names]
    if via == "tbe":
        tbe, order = to_fbgemm(arch)
        assert [d for d in tbe.D_offsets.diff().tolist()][:2] == [6, 4]  # C6 and C1 held at 6 and 4 columns
        assert_same(arch, fbgemm_lookup(tbe, order, sparse, columns(arch), dims), sparse)
    else:
        pytest.importorskip("torchrec")
        got = serve_with_fbgemm(quantize_tables(dlrm(ODD_DIMS), {"C6": 4, "C1": 4, "C4": 8})).sparse(sparse)
        assert_same(arch, got, sparse)
    assert fbgemm_row_bytes(5, 4) == fbgemm_row_bytes(6, 4) and fbgemm_row_bytes(5, 4, 1) == 4 + 3


@pytest.mark.parametrize("row_alignment", [1, 16])
def test_layout_is_fbgemms(row_alignment):
    """Our rows' bytes are fbgemm's: its row size, and its own split of an int-N row into scale, bias and codes
    (at the FRONT of each row, `split_embedding_weights_with_scale_bias(2)`; needs rows of even bytes to view as
    fp16) gives back our fp16 scales, biases and codes; the padding is zero."""
    for bits in (8, 4, 16, 32):
        ty = {8: SparseType.INT8, 4: SparseType.INT4, 16: SparseType.FP16, 32: SparseType.FP32}[bits]
        for dim in (2, 4, 6, 8, 16, 5, 3):
            if bits == 4 and dim % 2:
                continue
            assert fbgemm_row_bytes(dim, bits, row_alignment) == rounded_row_size_in_bytes(dim, ty, row_alignment)
    arch = quantize_tables(dlrm(DIMS), MIXED).sparse
    tbe, order = to_fbgemm(arch, row_alignment=row_alignment)
    splits = tbe.split_embedding_weights_with_scale_bias(split_scale_bias_mode=0)
    for name, (raw, _, _) in zip(order, splits):
        table = arch.table(name)
        assert torch.equal(raw, fbgemm_rows(table, row_alignment, name))
        used = table.codes.shape[1] + 4 if table.bits < 16 else table.dim * table.bits // 8
        assert raw.shape[1] == fbgemm_row_bytes(table.dim, table.bits, row_alignment)
        assert not raw[:, used:].any()
    if row_alignment == 16:  # 16-byte rows view as fp16: fbgemm's own split of each int-N row
        for name, (codes, scale, bias) in zip(order, tbe.split_embedding_weights_with_scale_bias(2)):
            table = arch.table(name)
            if table.bits < 16:
                assert torch.equal(codes, table.codes)
                assert torch.equal(scale.reshape(-1), table.scale) and torch.equal(bias.reshape(-1), table.bias)


def test_pooling_none():
    """fbgemm's no-bag kernel on CPU: the same values; it needs one width for every table."""
    arch = quantize_tables(dlrm([8] * len(KEPT)), MIXED).sparse
    sparse = random_sparse(arch, seed=2)
    tbe, order = to_fbgemm(arch, pooling="none")
    assert_same(arch, fbgemm_lookup(tbe, order, sparse, columns(arch)), sparse)
    with pytest.raises(ValueError, match="same width"):
        to_fbgemm(quantize_tables(dlrm(DIMS), 8).sparse, pooling="none")


def test_projected_tables_at_their_stored_width():
    """A table stored at rank r < d is in fbgemm at width r: its projection of fbgemm's rows is the arch's output."""
    arch = quantize_tables(dlrm(DIMS, ranks=[2, 8, 6, 4, 4]), MIXED).sparse
    assert set(arch.projections) == {"C6", "C4", "C2"}
    sparse = random_sparse(arch, seed=3)
    tbe, order = to_fbgemm(arch)
    got = fbgemm_lookup(tbe, order, sparse, columns(arch))
    want = arch(sparse)
    for name, g, w, spec in zip(order, got, want, arch.specs):
        assert torch.equal(g, dequantize_rows(arch.table(name), sparse[:, spec.column]))
        if name in arch.projections:
            assert g.shape[1] == spec.stored_dim < spec.out_dim
            g = arch.projections[name](g)
        assert torch.equal(g, w), name


@pytest.mark.parametrize("via", ["torchrec", "tbe"])
def test_a_whole_model_served_by_fbgemm_computes_the_quantized_model(via):
    """`serve_with_fbgemm`: the model's tables in torchrec's quantized EmbeddingBagCollection (or fbgemm's bare TBE),
    projections after them, its dense layers shared: the logits equal the in-framework quantized model's bit for
    bit; the quantized model itself is not touched."""
    if via == "torchrec":
        pytest.importorskip("torchrec")
    model = quantize_tables(dlrm(DIMS, ranks=[2, 8, 6, 4, 4]), MIXED_FUSED)
    served = serve_with_fbgemm(model, via=via)
    assert served.sparse is not model.sparse and isinstance(model.sparse, QuantizedSparseArch)
    sparse = random_sparse(model.sparse, seed=5)
    dense = torch.randn(ROWS, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(served(dense, sparse), model(dense, sparse))
    with pytest.raises(TypeError, match="quantized tables"):
        serve_with_fbgemm(dlrm(DIMS), via=via)


def test_torchrecs_quantized_collection_holds_our_rows():
    """torchrec's quantized EmbeddingBagCollection built by `to_torchrec`: one table per feature at its width, its
    TBE's rows our fbgemm rows byte for byte, its lookups the arch's tables."""
    pytest.importorskip("torchrec")
    from torchrec.modules.embedding_configs import DataType

    from umec_lightning.quant.fbgemm import to_torchrec, torchrec_lookup

    arch = quantize_tables(dlrm(DIMS), MIXED_FUSED).sparse
    qebc, order = to_torchrec(arch)
    widths = {8: DataType.INT8, 4: DataType.INT4, 16: DataType.FP16, 32: DataType.FP32}
    assert [(c.feature_names, c.data_type) for c in qebc.embedding_bag_configs()] == \
        [([n], widths[arch.bits[n]]) for n in order]
    (tbe,) = qebc._emb_modules
    for name, split in zip(order, tbe.split_embedding_weights_with_scale_bias(split_scale_bias_mode=0)):
        assert torch.equal(split[0], fbgemm_rows(arch.table(name), 16, name))
    sparse = random_sparse(arch, seed=7)
    for name, got, spec in zip(order, torchrec_lookup(qebc, order, sparse, columns(arch)), arch.specs):
        assert torch.equal(got, dequantize_rows(arch.table(name), sparse[:, spec.column])), name


def test_out_of_range_ids_raise():
    arch = quantize_tables(dlrm(DIMS), 8).sparse
    tbe, order = to_fbgemm(arch)
    sparse = random_sparse(arch)
    sparse[7, arch.specs[3].column] = arch.specs[3].rows  # C2 has 37 rows: id 37 is out of range
    with pytest.raises(RuntimeError):
        fbgemm_lookup(tbe, order, sparse, columns(arch))
