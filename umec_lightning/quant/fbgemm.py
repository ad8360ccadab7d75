"""A `QuantizedSparseArch`'s tables in fbgemm's inference TBE (`IntNBitTableBatchedEmbeddingBagsCodegen`, the
kernel torchrec's quantized embedding modules serve with), on CPU, holding exactly our codes, scales and biases.

  to_fbgemm(arch)                             (tbe, order): one fbgemm table per feature, `order` their names
  fbgemm_lookup(tbe, order, sparse, columns)  one id per sample per table -> list of float32 (B, d), in `order`
  to_torchrec(arch), torchrec_lookup(...)     the same through torchrec's quantized EmbeddingBagCollection
  FbgemmSparseArch(arch, via)                 the arch's contract (sparse ids -> per-feature vectors) on either
  serve_with_fbgemm(model, via)               a quantized model of any family with its tables served by fbgemm

Bits map to fbgemm's `SparseType`: 8 INT8, 4 INT4, 16 FP16, 32 FP32. fbgemm's row layout (read in
fbgemm_gpu/split_table_batched_embeddings_ops_inference.py, `unpadded_row_size_in_bytes`,
`rounded_row_size_in_bytes`, `split_embedding_weights_with_scale_bias`; fbgemm_gpu 1.8, `reverse_qparam=False`,
`scale_bias_size_in_bytes=4`): each table is `rows` rows of `row_bytes` uint8, its start aligned to 128 bytes,

  INT8 / INT4   [scale fp16 | bias fp16 | codes: d bytes (INT8), d/2 bytes (INT4, element 2k in the low nibble
                of byte k, as ours) | zero padding]: the qparams at the FRONT of the row
  FP16 / FP32   [the d values, little-endian | zero padding]

row_bytes = (4 + d·b/8) or d·b/8, rounded up to `row_alignment` (fbgemm's own CPU default 1, torchrec's
`DEFAULT_ROW_ALIGNMENT` 16, this module's default, so that a torchrec server's tables have our layout byte for
byte). fbgemm packs int-N codes "at byte granularity": an INT4 table needs an even d (it asserts
`dim % 2 == 0`). A table stored at 4 bits with an odd width d (low rank and pruning make them; ours pads its last
high nibble) goes in as d + 1 columns, the pad nibble its last: the same bytes a row (`fbgemm_dim`), and the
lookups (given the arch's `dims`) cut that column off. INT8, FP16 and FP32 take any width.

Exactness: fbgemm's CPU kernel (fbgemm_gpu/codegen/inference/embedding_forward_quantized_cpu_template.cpp calls
fbgemm's `EmbeddingSpMDM[NBit]`; output in fp32 here, `output_dtype=FP32`) computes, as its reference
implementation spells out, out = fma(scale, q, out + bias) in fp32 per looked-up row, from out = 0 (its JIT
kernels agree: tests/quant/test_fbgemm.py finds no difference). With one id per bag that is
q·s + m rounded once to fp32. Ours is fl(q·s) + m with q·s exact in fp32 (q <= 255 has 8 significant bits, the
fp16 scale 11, the product at most 19 <= 24), so fl(fl(q·s) + m) = fl(q·s + m): the two agree bit for bit. FP16
and FP32 tables are upcast exactly. (fbgemm's default `output_dtype=FP16` would round each value to fp16 as well:
not ours.)

Lookups use `PoolingMode.SUM` over single-id bags (offsets = arange): the pooled (B, Σ d) output is each table's
row. `pooling="none"` (fbgemm's no-bag kernel, (T·B, d) out) is supported on CPU, but only when every table has
the same width (fbgemm asserts "Mixed dimension tables are only supported for pooling tables"). Ids out of a
table's range raise (`BoundsCheckMode.FATAL`) instead of fbgemm's default warning and zeroed id.

A projected table (stored at rank r < d) is looked up at its stored width r, as `QuantizedSparseArch` gathers it
before its `Projection`: apply `arch.projections[name]` to fbgemm's output to get the arch's vector.

fbgemm_gpu (and torchrec, for `to_torchrec`) are imported when these functions run, so this module imports without
them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .rowwise import META_BYTES, RowwiseTable, code_bytes
from .sparse import QuantizedSparseArch

__all__ = ["CPU_ROW_ALIGNMENT", "DEFAULT_ROW_ALIGNMENT", "FbgemmSparseArch", "fbgemm_dim", "fbgemm_lookup",
           "fbgemm_row_bytes", "fbgemm_rows", "serve_with_fbgemm", "to_fbgemm", "to_torchrec", "torchrec_lookup"]

DEFAULT_ROW_ALIGNMENT = 16  # torchrec's quantized embedding modules' (fbgemm's own CPU default is 1)
# What a CPU server's file holds (`compression.export.export_torchrec`): fbgemm's CPU default, rows unpadded. Aligned
# rows serve GPUs' vector loads; on CPU they only cost bytes (at 16, an int4 row of rank 1 takes 16 bytes, not 5).
CPU_ROW_ALIGNMENT = 1
POOLINGS = ("sum", "none")


def _fbgemm():
    try:
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            BoundsCheckMode,
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("quant.fbgemm needs fbgemm_gpu (the fbgemm-gpu or fbgemm-gpu-cpu package)") from err
    return SparseType, BoundsCheckMode, EmbeddingLocation, PoolingMode, IntNBitTableBatchedEmbeddingBagsCodegen


def _sparse_type(bits: int):
    SparseType = _fbgemm()[0]
    return {8: SparseType.INT8, 4: SparseType.INT4, 16: SparseType.FP16, 32: SparseType.FP32}[bits]


def _check_width(name: str, bits: int, dim: int) -> None:
    if dim <= 0:
        raise ValueError(f"table {name}: fbgemm needs a positive width, got {dim}")


def fbgemm_dim(dim: int, bits: int) -> int:
    """The width fbgemm holds a table of `dim` columns at: an odd width at 4 bits with its pad nibble as one more
    column (fbgemm's INT4 needs an even width; the row's bytes are the same), else `dim`."""
    return dim + 1 if bits == 4 and dim % 2 else dim


def fbgemm_row_bytes(dim: int, bits: int, row_alignment: int = DEFAULT_ROW_ALIGNMENT) -> int:
    """Bytes of one fbgemm row (fbgemm's `rounded_row_size_in_bytes`): fp16 scale and bias then the codes at 8 and
    4 bits, the values at 16 and 32, rounded up to `row_alignment`."""
    raw = code_bytes(fbgemm_dim(dim, bits), bits) + META_BYTES if bits < 16 else dim * bits // 8
    return (raw + row_alignment - 1) // row_alignment * row_alignment


def fbgemm_rows(table: RowwiseTable, row_alignment: int = DEFAULT_ROW_ALIGNMENT, name: str = "?") -> Tensor:
    """`table` as fbgemm stores it: uint8 (rows, `fbgemm_row_bytes`), each row [scale | bias | codes | 0 pad] at 8
    and 4 bits, [values | 0 pad] at 16 and 32 (module docstring). ValueError where fbgemm cannot hold it."""
    _check_width(name, table.bits, table.dim)
    rows, width = table.rows, fbgemm_row_bytes(table.dim, table.bits, row_alignment)
    out = torch.zeros(rows, width, dtype=torch.uint8)
    if table.bits < 16:
        n = code_bytes(table.dim, table.bits)
        out[:, 0:2] = table.scale.detach().cpu().contiguous().view(torch.uint8).view(rows, 2)
        out[:, 2:4] = table.bias.detach().cpu().contiguous().view(torch.uint8).view(rows, 2)
        out[:, META_BYTES: META_BYTES + n] = table.codes.detach().cpu()
    else:
        dtype = torch.float16 if table.bits == 16 else torch.float32
        values = table.codes.detach().cpu().to(dtype).contiguous().view(torch.uint8)  # (rows, d·b/8)
        out[:, : values.shape[1]] = values
    return out


def _tables_of(arch: QuantizedSparseArch, row_alignment: int) -> dict[str, RowwiseTable]:
    """{feature name: its table} in feature order, each checked to have an fbgemm form at `row_alignment`."""
    if row_alignment < 1:
        raise ValueError(f"row_alignment must be >= 1, got {row_alignment}")
    if not isinstance(arch, QuantizedSparseArch):
        raise TypeError(f"fbgemm serving needs a QuantizedSparseArch, got {type(arch).__name__}")
    if not arch.feature_names:
        raise ValueError("the arch has no tables (fbgemm's TBE needs at least one)")
    tables = {name: arch.table(name) for name in arch.feature_names}
    for name, table in tables.items():
        _check_width(name, table.bits, table.dim)
    return tables


def _fill(tbe, tables: dict[str, RowwiseTable], row_alignment: int) -> None:
    """Copy `tables` (in `tbe`'s table order) into the TBE's host rows."""
    # mode 0: each table's whole padded rows, (rows, row bytes) uint8 views of the TBE's host buffer
    raw = [split[0] for split in tbe.split_embedding_weights_with_scale_bias(split_scale_bias_mode=0)]
    if len(raw) != len(tables):
        raise RuntimeError(f"the TBE holds {len(raw)} tables, {len(tables)} were given")
    with torch.no_grad():
        for (name, table), dest in zip(tables.items(), raw):
            rows = fbgemm_rows(table, row_alignment, name)
            if tuple(dest.shape) != tuple(rows.shape):  # our reading of fbgemm's layout is wrong: never silently
                raise RuntimeError(f"table {name}: fbgemm's rows are {tuple(dest.shape)} bytes, ours "
                                   f"{tuple(rows.shape)}")
            dest.copy_(rows)


def to_fbgemm(arch: QuantizedSparseArch, row_alignment: int = DEFAULT_ROW_ALIGNMENT, pooling: str = "sum"):
    """(tbe, order): an `IntNBitTableBatchedEmbeddingBagsCodegen` on CPU with one table per feature of `arch`,
    table t holding `arch.table(order[t])` exactly (codes, fp16 scales and biases, or the fp16/fp32 weight), and
    `order` the feature names in table order (`arch.feature_names`). Tables at their stored width. `pooling`:
    "sum" (any widths) or "none" (every table the same width). Fp32 output. ValueError for a table fbgemm cannot
    hold (an odd width at 4 bits), naming it."""
    SparseType, BoundsCheckMode, EmbeddingLocation, PoolingMode, TBE = _fbgemm()
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    tables = _tables_of(arch, row_alignment)
    dims = {fbgemm_dim(table.dim, table.bits) for table in tables.values()}
    if pooling == "none" and len(dims) > 1:
        raise ValueError(f"pooling='none' needs every table the same width (fbgemm's no-bag kernel), got widths "
                         f"{ {name: t.dim for name, t in tables.items()} }; use pooling='sum'")
    specs = [(name, t.rows, fbgemm_dim(t.dim, t.bits), _sparse_type(t.bits), EmbeddingLocation.HOST)
             for name, t in tables.items()]
    tbe = TBE(specs, pooling_mode=PoolingMode.SUM if pooling == "sum" else PoolingMode.NONE, device="cpu",
              output_dtype=SparseType.FP32, row_alignment=row_alignment, bounds_check_mode=BoundsCheckMode.FATAL)
    tbe.initialize_weights()
    _fill(tbe, tables, row_alignment)
    return tbe, list(tables)


def to_torchrec(arch: QuantizedSparseArch, row_alignment: int = DEFAULT_ROW_ALIGNMENT):
    """(qebc, order): torchrec's quantized `EmbeddingBagCollection` (torchrec.quant.embedding_modules, the module a
    torchrec inference model serves its tables with; one fbgemm int-N TBE inside) on CPU, one table `t_<name>` per
    feature reading feature `<name>`, holding `arch`'s rows exactly (`to_fbgemm`'s layout), sum pooling, fp32
    output; `order` the feature names (`arch.feature_names`). Needs torchrec."""
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
    from torchrec.quant.embedding_modules import EmbeddingBagCollection

    tables = _tables_of(arch, row_alignment)
    data_type = {8: DataType.INT8, 4: DataType.INT4, 16: DataType.FP16, 32: DataType.FP32}
    configs = [EmbeddingBagConfig(name=f"t_{name}", embedding_dim=fbgemm_dim(t.dim, t.bits), num_embeddings=t.rows,
                                  feature_names=[name], data_type=data_type[t.bits], pooling=PoolingType.SUM)
               for name, t in tables.items()]
    qebc = EmbeddingBagCollection(configs, is_weighted=False, device=torch.device("cpu"), output_dtype=torch.float32,
                                  row_alignment=row_alignment)
    (tbe,) = qebc._emb_modules  # one pooling kind: one TBE, its tables in config order
    _fill(tbe, tables, row_alignment)
    return qebc, list(tables)


def _table_major_ids(sparse: Tensor, order: Sequence[str], columns: Sequence[int] | Mapping[str, int]) -> Tensor:
    """(T·B,) int64 on CPU: table t's ids `sparse[:, column of order[t]]`, table after table."""
    if sparse.dim() != 2:
        raise ValueError(f"the lookup needs sparse ids (B, S), got shape {tuple(sparse.shape)}")
    cols = [int(columns[name]) for name in order] if isinstance(columns, Mapping) else [int(c) for c in columns]
    if len(cols) != len(order):
        raise ValueError(f"{len(cols)} columns for {len(order)} tables")
    index = torch.tensor(cols, dtype=torch.long, device=sparse.device)
    return sparse.index_select(1, index).t().reshape(-1).to(device="cpu", dtype=torch.int64)


def _cut(rows: list[Tensor], dims: Sequence[int] | None) -> list[Tensor]:
    """Each table's rows cut to its width in `dims` (an odd int4 table's pad column off); None: as fbgemm holds them."""
    if dims is None:
        return rows
    return [r if r.shape[1] == d else r[:, :d].contiguous() for r, d in zip(rows, dims, strict=True)]


def torchrec_lookup(qebc, order: Sequence[str], sparse: Tensor, columns: Sequence[int] | Mapping[str, int],
                    dims: Sequence[int] | None = None) -> list[Tensor]:
    """`fbgemm_lookup` through torchrec's quantized EmbeddingBagCollection (`to_torchrec`'s): one id per sample per
    feature as a KeyedJaggedTensor, the pooled rows back as float32 (B, d) in `order`."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    ids = _table_major_ids(sparse, order, columns)
    offsets = torch.arange(ids.numel() + 1, dtype=torch.int64)  # single-id bags
    out = qebc(KeyedJaggedTensor.from_offsets_sync(keys=list(order), values=ids, offsets=offsets)).to_dict()
    return _cut([out[name].to(torch.float32) for name in order], dims)


def fbgemm_lookup(tbe, order: Sequence[str], sparse: Tensor, columns: Sequence[int] | Mapping[str, int],
                  dims: Sequence[int] | None = None) -> list[Tensor]:
    """Table t's rows `sparse[:, column of order[t]]` (one id per sample per table) from `tbe` (`to_fbgemm`'s):
    a list of float32 (B, d_t) in `order`. `sparse` (B, S) int64, the data's sparse block; `columns` the column
    each table reads, parallel to `order` or {name: column} (`arch.specs`' columns); `dims` the tables' widths
    (parallel to `order`): an odd-width int4 table's pad column cut off (None: fbgemm's widths, `fbgemm_dim`)."""
    PoolingMode = _fbgemm()[3]
    ids = _table_major_ids(sparse, order, columns)
    batch, tables = sparse.shape[0], len(order)
    offsets = torch.arange(tables * batch + 1, dtype=torch.int64)  # single-id bags
    out = tbe(ids, offsets).to(torch.float32)
    if int(tbe.pooling_mode) == int(PoolingMode.NONE):  # (T·B, d): one row per id
        return _cut([rows.contiguous() for rows in out.view(tables, batch, -1).unbind(0)], dims)
    bounds = tbe.D_offsets.tolist()  # pooled (B, Σ d): table t in columns [D_offsets[t], D_offsets[t + 1])
    return _cut([out[:, bounds[t]: bounds[t + 1]].contiguous() for t in range(tables)], dims)


VIAS = ("torchrec", "tbe")


class FbgemmSparseArch(nn.Module):
    """`arch`'s contract (sparse ids (B, S) int64 -> list of F float32 (B, d_f) in feature order) computed by
    fbgemm's int-N kernels, `via` torchrec's quantized EmbeddingBagCollection (`to_torchrec`, what a torchrec
    inference model holds) or fbgemm's TBE alone (`to_fbgemm`); the tables in fbgemm's layout (torchrec's row
    alignment by default), a projected table's fp32 `Projection` after its lookup. Equal to `arch`'s output bit for
    bit (module docstring). Inference only, CPU; not scriptable (the lookups around fbgemm's op are Python)."""

    def __init__(self, arch: QuantizedSparseArch, row_alignment: int = DEFAULT_ROW_ALIGNMENT, via: str = "torchrec"):
        super().__init__()
        if via not in VIAS:
            raise ValueError(f"via must be one of {VIAS}, got {via!r}")
        self.via = via
        to = to_torchrec if via == "torchrec" else to_fbgemm
        self.tables, self.order = to(arch, row_alignment)
        self.feature_names = list(arch.feature_names)
        self.columns = [spec.column for spec in arch.specs]  # parallel to `order` (the arch's feature order)
        self.dims = [arch.table(name).dim for name in self.order]
        self.projections = copy.deepcopy(arch.projections)

    def forward(self, sparse: Tensor) -> list[Tensor]:
        lookup = torchrec_lookup if self.via == "torchrec" else fbgemm_lookup
        out = lookup(self.tables, self.order, sparse, self.columns, self.dims)
        for projection in self.projections.values():
            out[projection.position] = projection(out[projection.position])
        return out


def serve_with_fbgemm(model: nn.Module, row_alignment: int = DEFAULT_ROW_ALIGNMENT, via: str = "torchrec"
                      ) -> nn.Module:
    """A copy of `model` (any family, its `sparse` a `QuantizedSparseArch`) whose tables fbgemm's kernels serve
    (`FbgemmSparseArch`, `via` torchrec's quantized EmbeddingBagCollection or the bare TBE); the rest of the model
    is shared with `model`, not copied. Its outputs equal `model`'s."""
    if not isinstance(getattr(model, "sparse", None), QuantizedSparseArch):
        raise TypeError(f"serve_with_fbgemm needs a model with quantized tables (quant.quantize_tables), got "
                        f"{type(getattr(model, 'sparse', model)).__name__}")
    out = copy.copy(model)  # a shallow copy: its own module dict, the same dense layers
    out._modules = dict(model._modules)
    out.sparse = FbgemmSparseArch(model.sparse, row_alignment, via)
    return out
