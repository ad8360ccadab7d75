"""`QuantizedSparseArch`: a `SparseArch` whose tables are stored row-wise quantized (`quant.rowwise`), for serving.

Same contract as `models.dlrm.SparseArch`: sparse ids (B, S) int64 -> list of F float32 (B, d_f) in feature order,
a table stored at rank r_f < d_f projected by its fp32 `Projection` after the lookup. Each table is looked up on
its own (no fused groups: the quantized tables of one width may differ in bits) and only the looked-up rows are
dequantized. Everything is a buffer (inference only), under stable state-dict names:

  tables.<name>.codes / .scale / .bias   a table at 8 or 4 bits: uint8 (rows, ceil(d·b/8)), fp16 (rows,), fp16 (rows,)
  tables.<name>.weight                   a table at 16 or 32 bits: fp16 or fp32 (rows, d)
  projections.<name>.weight (.bias)      as SparseArch's

so `QuantizedSparseArch.empty(structure, bits)` then `load_state_dict` rebuilds a saved one. Its output equals the
float SparseArch's run on the dequantized weights (`dequantized_weights`) exactly: the lookup is a row gather
either way, and dequantization is element-wise (`rowwise.dequantize_codes`). Scriptable and traceable; exports to
ONNX (int4 unpacking is int32 Mod/Div in the graph).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..models.dlrm import Projection, SparseArch
from .rowwise import RowwiseTable, check_bits, code_bytes, dequantize_codes, quantize_rows, storage_bytes

__all__ = ["FloatLookup", "QuantizedSparseArch", "RowwiseLookup", "TableSpec"]


class TableSpec(NamedTuple):
    """One table: its feature name, the column of the data's sparse block it reads, rows, stored width
    (its rank when projected), the width it feeds the model."""

    name: str
    column: int
    rows: int
    stored_dim: int
    out_dim: int


class RowwiseLookup(nn.Module):
    """A table at 8 or 4 bits: buffers `codes` uint8 (rows, ceil(d·b/8)), `scale`, `bias` fp16 (rows,).
    forward: sparse (B, S) -> float32 (B, d), the rows of column `column` dequantized."""

    def __init__(self, rows: int, dim: int, bits: int, column: int, device: torch.device | str | None = None):
        super().__init__()
        if bits not in (8, 4):
            raise ValueError(f"RowwiseLookup stores 8 or 4 bits, got {bits}")
        self.bits, self.dim, self.column = bits, dim, column
        self.register_buffer("codes", torch.zeros(rows, code_bytes(dim, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(rows, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(rows, dtype=torch.float16, device=device))

    def forward(self, sparse: Tensor) -> Tensor:
        ids = sparse[:, self.column]
        return dequantize_codes(self.codes.index_select(0, ids), self.scale.index_select(0, ids),
                                self.bias.index_select(0, ids), self.bits, self.dim)

    def extra_repr(self) -> str:
        return f"rows={self.codes.shape[0]}, dim={self.dim}, bits={self.bits}, column={self.column}"


class FloatLookup(nn.Module):
    """A table at 16 or 32 bits: buffer `weight` fp16 or fp32 (rows, d). forward: sparse (B, S) -> float32 (B, d)."""

    def __init__(self, rows: int, dim: int, bits: int, column: int, device: torch.device | str | None = None):
        super().__init__()
        if bits not in (16, 32):
            raise ValueError(f"FloatLookup stores 16 or 32 bits, got {bits}")
        self.bits, self.dim, self.column = bits, dim, column
        dtype = torch.float16 if bits == 16 else torch.float32
        self.register_buffer("weight", torch.zeros(rows, dim, dtype=dtype, device=device))

    def forward(self, sparse: Tensor) -> Tensor:
        return self.weight.index_select(0, sparse[:, self.column]).to(torch.float32)

    def extra_repr(self) -> str:
        return f"rows={self.weight.shape[0]}, dim={self.dim}, bits={self.bits}, column={self.column}"


def _lookup(spec: TableSpec, bits: int, device=None) -> nn.Module:
    kind = RowwiseLookup if bits < 16 else FloatLookup
    return kind(spec.rows, spec.stored_dim, bits, spec.column, device=device)


def _resolve_bits(names: list[str], bits: int | dict[str, int]) -> dict[str, int]:
    """{name: bits} for every table: one int for all, or a dict (a missing name: 32). Unknown names are an error
    (a typo would silently leave a table at fp32)."""
    if isinstance(bits, int):
        return {name: check_bits(bits) for name in names}
    unknown = sorted(set(bits) - set(names))
    if unknown:
        raise ValueError(f"bits for unknown tables {unknown}; the tables are {names}")
    return {name: check_bits(int(bits.get(name, 32))) for name in names}


def specs_of_structure(structure) -> list[TableSpec]:
    """The tables of any family's structure (what `SparseArch` reads of it), in feature order. The width a table
    feeds the model is its projection's output where it has one, else its stored width (DeepFM's and Wide & Deep's
    tables store a first-order column beyond their `table_dims`)."""
    projected = set(structure.projected())
    stored = structure.stored_dims
    # The looked-up width a projection restores: DeepFM's and W&D's tables are D + 1 wide (`lookup_dims`)
    looked_up = getattr(structure, "lookup_dims", structure.table_dims)
    return [TableSpec(name, int(column), int(rows), int(stored[f]),
                      int(looked_up[f] if f in projected else stored[f]))
            for f, (name, column, rows) in enumerate(zip(structure.feature_names, structure.feature_ids,
                                                         structure.table_sizes))]


def specs_of_arch(arch: SparseArch) -> list[TableSpec]:
    """The tables of a built `SparseArch`, in feature order. Its `feature_ids` buffer is in group order (group
    after group), so the column of feature f is read through its group's positions."""
    column: dict[int, int] = {}
    for group in arch.groups:
        for t, f in enumerate(group.positions):
            column[f] = int(arch.feature_ids[group.start + t])
    out = []
    for f, (name, table) in enumerate(arch.tables.items()):
        projection = arch.projections[name] if name in arch.projections else None
        out_dim = table.embedding_dim if projection is None else projection.out_features
        out.append(TableSpec(name, column[f], table.num_embeddings, table.embedding_dim, out_dim))
    return out


class QuantizedSparseArch(nn.Module):
    """Row-wise quantized tables: sparse (B, S) int64 -> list of F float32 (B, d_f) in feature order (module
    docstring). `bits` {name: 32, 16, 8 or 4}, every table named. Build with `from_float` (a float SparseArch's
    weights quantized) or `empty` (zeros of the right shapes, to `load_state_dict` into)."""

    def __init__(self, specs: list[TableSpec], bits: int | dict[str, int], projection_bias: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.feature_names: list[str] = [s.name for s in specs]
        self.bits: dict[str, int] = _resolve_bits(self.feature_names, bits)
        self.num_features = len(specs)
        self.specs = list(specs)
        self.tables = nn.ModuleDict({s.name: _lookup(s, self.bits[s.name], device) for s in specs})
        self.projections = nn.ModuleDict({
            s.name: Projection(s.stored_dim, s.out_dim, f, bias=projection_bias)
            for f, s in enumerate(specs) if s.stored_dim < s.out_dim
        })
        if device is not None:
            self.projections.to(device)
        # No fused float groups: empty, so that `TablesOfRecord` (holds_tables, sparse_grad, table_keys) still reads
        # this arch without error (it holds its tables; none has a gradient; no float table key).
        self.groups = nn.ModuleList()

    __jit_ignored_attributes__ = ["specs", "bits", "feature_names"]  # Python-side bookkeeping only

    @classmethod
    def empty(cls, structure, bits: int | dict[str, int], device: torch.device | str | None = None
              ) -> QuantizedSparseArch:
        """Zero tables of `structure`'s shapes at `bits` (an int for every table, or {name: bits}, missing: 32), and
        projections as `SparseArch` builds them: the skeleton that a saved state dict loads into."""
        return cls(specs_of_structure(structure), bits, projection_bias=bool(structure.projection_bias), device=device)

    @classmethod
    @torch.no_grad()
    def from_float(cls, arch: SparseArch, bits: int | dict[str, int]) -> QuantizedSparseArch:
        """`arch`'s tables quantized to `bits` (an int, or {name: bits}, missing: 32), its projections copied."""
        if any(group.weight.is_meta for group in arch.groups):
            raise ValueError("QuantizedSparseArch.from_float: the tables are meta tensors (a model that does not hold "
                             "its tables); quantize the model of record")
        specs = specs_of_arch(arch)
        device = next(iter(arch.groups)).weight.device if len(arch.groups) else None
        bias = any(p.bias is not None for p in arch.projections.values())
        out = cls(specs, bits, projection_bias=bias, device=device)
        for spec in specs:
            out.set_table(spec.name, quantize_rows(arch.tables[spec.name].weight, out.bits[spec.name]))
        out.projections.load_state_dict(arch.projections.state_dict())
        return out

    @torch.no_grad()
    def set_table(self, name: str, table: RowwiseTable) -> None:
        """Store `table` (from `quantize_rows` at this table's bits and shape) as table `name`."""
        lookup = self.tables[name]
        if table.bits != lookup.bits or table.dim != lookup.dim:
            raise ValueError(f"table {name}: got {table.bits} bits × {table.dim} columns, stores "
                             f"{lookup.bits} × {lookup.dim}")
        if table.bits < 16:
            lookup.codes.copy_(table.codes)
            lookup.scale.copy_(table.scale)
            lookup.bias.copy_(table.bias)
        else:
            lookup.weight.copy_(table.codes)

    def table(self, name: str) -> RowwiseTable:
        """Table `name` as a `RowwiseTable` (its buffers, not copies)."""
        lookup = self.tables[name]
        if lookup.bits < 16:
            return RowwiseTable(lookup.codes, lookup.scale, lookup.bias, lookup.bits, lookup.dim)
        empty = lookup.weight.new_empty(0, dtype=torch.float16)
        return RowwiseTable(lookup.weight, empty, empty.clone(), lookup.bits, lookup.dim)

    @torch.no_grad()
    def dequantized_weights(self) -> dict[str, Tensor]:
        """{name: float32 (rows, stored d)}: every table dequantized whole (what a float SparseArch holding these
        weights computes the same outputs with)."""
        out = {}
        for name in self.feature_names:
            lookup = self.tables[name]
            if lookup.bits < 16:
                out[name] = dequantize_codes(lookup.codes, lookup.scale, lookup.bias, lookup.bits, lookup.dim)
            else:
                out[name] = lookup.weight.to(torch.float32, copy=True)
        return out

    def storage_bytes(self) -> int:
        """Stored bytes: each table at its bits (`rowwise.storage_bytes`) plus the projections at fp32."""
        tables = sum(storage_bytes(s.rows, s.stored_dim, self.bits[s.name]) for s in self.specs)
        return tables + 4 * sum(p.numel() for p in self.projections.parameters())

    def forward(self, sparse: Tensor) -> list[Tensor]:
        out: list[Tensor] = []
        for table in self.tables.values():  # feature order
            out.append(table(sparse))
        for projection in self.projections.values():  # empty for a model without projections
            out[projection.position] = projection(out[projection.position])
        return out
