"""`QuantizedSparseArch`: a `SparseArch` whose tables are stored row-wise quantized (`quant.rowwise`), for serving.

Same contract as `models.dlrm.SparseArch`: sparse ids (B, S) int64 -> list of F float32 (B, d_f) in feature order,
a table stored at rank r_f < d_f projected by its fp32 `Projection` after the lookup. Like SparseArch's
`TableGroup`s, the tables of one (bits, stored width) share one set of buffers (a `RowwiseGroup` at 8 or 4 bits, a
`FloatGroup` at 16 or 32), table after table in feature order: one gather and one dequantization per group per
forward, of the looked-up rows only. Everything is a buffer (inference only), under stable state-dict names:

  qgroups.<g>.codes / .scale / .bias   a group at 8 or 4 bits: uint8 (Σ rows, ceil(d·b/8)), fp16 (Σ rows,) twice
  qgroups.<g>.weight                   a group at 16 or 32 bits: fp16 or fp32 (Σ rows, d)
  projections.<name>.weight (.bias)    as SparseArch's

(groups in order of their first table), so `QuantizedSparseArch.empty(structure, bits)` then `load_state_dict`
rebuilds a saved one; the per-table keys `tables.<name>.codes / .scale / .bias / .weight` of files written before
the tables were grouped still load (`fuse_table_keys_`). `tables` {name: `RowwiseView` | `FloatView`} reads each
table on its own (its rows of its group's buffers: views, not copies, and not in the state dict). `groups` (a float
SparseArch's `TableGroup`s) is empty, so that `TablesOfRecord` reads this arch (it holds its tables; none has a
gradient; no float table key).

Its output equals the float SparseArch's run on the dequantized weights (`dequantized_weights`) exactly: the lookup
is a row gather either way, and dequantization is element-wise (`rowwise.dequantize_codes`). Scriptable and
traceable; exports to ONNX (int4 unpacking is int32 Mod/Div in the graph).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..models.dlrm import Projection, SparseArch
from .rowwise import RowwiseTable, check_bits, code_bytes, dequantize_codes, quantize_rows, storage_bytes

__all__ = ["FloatGroup", "FloatView", "QuantizedSparseArch", "RowwiseGroup", "RowwiseView", "TableSpec"]

ROWWISE_PARTS = ("codes", "scale", "bias")  # a RowwiseGroup's buffers (and an old per-table key's suffixes)
FLOAT_PARTS = ("weight",)


class TableSpec(NamedTuple):
    """One table: its feature name, the column of the data's sparse block it reads, rows, stored width
    (its rank when projected), the width it feeds the model."""

    name: str
    column: int
    rows: int
    stored_dim: int
    out_dim: int


class _Group(nn.Module):
    """The T tables of one (bits, stored width d), table t at rows `row_offsets[t]` onwards of the group's buffers.
    `start`/`stop`: its rows in the arch's (F, B) id block; `positions`: its tables' places in the output."""

    parts: tuple[str, ...] = ()

    def __init__(self, rows: list[int], dim: int, bits: int, positions: list[int], start: int,
                 device: torch.device | str | None = None):
        super().__init__()
        self.bits, self.dim = bits, dim
        self.rows = [int(r) for r in rows]
        self.row_offsets = [sum(self.rows[:t]) for t in range(len(self.rows))]
        self.register_buffer("offsets", torch.tensor(self.row_offsets, dtype=torch.long, device=device),
                             persistent=False)
        self.positions = list(positions)
        self.start, self.stop = start, start + len(self.rows)

    def flat_ids(self, ids: Tensor) -> Tensor:
        """ids (T, B), row t table t's own ids -> (T·B,) rows of the group's buffers."""
        return (ids + self.offsets[:, None]).reshape(-1)

    def extra_repr(self) -> str:
        return f"tables={len(self.rows)}, rows={sum(self.rows)}, dim={self.dim}, bits={self.bits}, " \
               f"positions={self.positions}"


class RowwiseGroup(_Group):
    """Tables at 8 or 4 bits: buffers `codes` uint8 (Σ rows, ceil(d·b/8)), `scale`, `bias` fp16 (Σ rows,).
    forward: ids (T, B) -> float32 (T, B, d), the looked-up rows dequantized."""

    parts = ROWWISE_PARTS

    def __init__(self, rows: list[int], dim: int, bits: int, positions: list[int], start: int,
                 device: torch.device | str | None = None):
        if bits not in (8, 4):
            raise ValueError(f"RowwiseGroup stores 8 or 4 bits, got {bits}")
        super().__init__(rows, dim, bits, positions, start, device)
        total = sum(self.rows)
        self.register_buffer("codes", torch.zeros(total, code_bytes(dim, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(total, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(total, dtype=torch.float16, device=device))

    def forward(self, ids: Tensor) -> Tensor:
        flat = self.flat_ids(ids)
        out = dequantize_codes(self.codes.index_select(0, flat), self.scale.index_select(0, flat),
                               self.bias.index_select(0, flat), self.bits, self.dim)
        return out.view(ids.shape[0], ids.shape[1], self.dim)


class FloatGroup(_Group):
    """Tables at 16 or 32 bits: buffer `weight` fp16 or fp32 (Σ rows, d). forward: ids (T, B) -> float32 (T, B, d)."""

    parts = FLOAT_PARTS

    def __init__(self, rows: list[int], dim: int, bits: int, positions: list[int], start: int,
                 device: torch.device | str | None = None):
        if bits not in (16, 32):
            raise ValueError(f"FloatGroup stores 16 or 32 bits, got {bits}")
        super().__init__(rows, dim, bits, positions, start, device)
        dtype = torch.float16 if bits == 16 else torch.float32
        self.register_buffer("weight", torch.zeros(sum(self.rows), dim, dtype=dtype, device=device))

    def forward(self, ids: Tensor) -> Tensor:
        out = self.weight.index_select(0, self.flat_ids(ids)).to(torch.float32)
        return out.view(ids.shape[0], ids.shape[1], self.dim)


class _View:
    """One table of a group: its `rows` rows from `offset` on. Not a module (neither in the state dict nor found as
    a table twice); its tensors are slices of the group's buffers, read when asked (they follow `.to`, loads)."""

    def __init__(self, group: _Group, offset: int, rows: int):
        self.group, self.offset, self.rows = group, offset, rows

    @property
    def bits(self) -> int:
        return self.group.bits

    @property
    def dim(self) -> int:
        return self.group.dim

    def _rows(self, buffer: Tensor) -> Tensor:
        return buffer[self.offset: self.offset + self.rows]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rows={self.rows}, dim={self.dim}, bits={self.bits})"


class RowwiseView(_View):
    """A table at 8 or 4 bits: `codes` uint8 (rows, ceil(d·b/8)), `scale`, `bias` fp16 (rows,)."""

    @property
    def codes(self) -> Tensor:
        return self._rows(self.group.codes)

    @property
    def scale(self) -> Tensor:
        return self._rows(self.group.scale)

    @property
    def bias(self) -> Tensor:
        return self._rows(self.group.bias)


class FloatView(_View):
    """A table at 16 or 32 bits: `weight` fp16 or fp32 (rows, d)."""

    @property
    def weight(self) -> Tensor:
        return self._rows(self.group.weight)


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
        by_kind: dict[tuple[int, int], list[int]] = {}  # (bits, stored width) -> positions, in feature order
        for f, s in enumerate(specs):
            by_kind.setdefault((self.bits[s.name], s.stored_dim), []).append(f)
        self.qgroups = nn.ModuleList()
        views: dict[str, _View] = {}
        grouped: list[int] = []  # the positions, group after group
        for (b, d), positions in by_kind.items():
            rows = [specs[f].rows for f in positions]
            group_kind, view_kind = (RowwiseGroup, RowwiseView) if b < 16 else (FloatGroup, FloatView)
            group = group_kind(rows, d, b, positions, start=len(grouped), device=device)
            self.qgroups.append(group)
            for f, offset, n in zip(positions, group.row_offsets, rows):
                views[self.feature_names[f]] = view_kind(group, offset, n)
            grouped += positions
        self.tables: dict[str, _View] = {name: views[name] for name in self.feature_names}  # feature order
        self.projections = nn.ModuleDict({
            s.name: Projection(s.stored_dim, s.out_dim, f, bias=projection_bias)
            for f, s in enumerate(specs) if s.stored_dim < s.out_dim
        })
        if device is not None:
            self.projections.to(device)
        # The column of the data's sparse block feeding each table, group after group, so that each group's ids are
        # a contiguous slice of the (F, B) block; derived from the specs, so not in the state dict.
        self.register_buffer("feature_ids", torch.tensor([specs[f].column for f in grouped], dtype=torch.long,
                                                         device=device), persistent=False)
        # No float TableGroups: empty, so that `TablesOfRecord` (holds_tables, sparse_grad, table_keys) still reads
        # this arch without error (it holds its tables; none has a gradient; no float table key).
        self.groups = nn.ModuleList()

    __jit_ignored_attributes__ = ["specs", "bits", "feature_names", "tables"]  # Python-side bookkeeping only

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
        view = self.tables[name]
        if table.bits != view.bits or table.dim != view.dim or table.rows != view.rows:
            raise ValueError(f"table {name}: got {table.rows} rows × {table.dim} columns at {table.bits} bits, stores "
                             f"{view.rows} × {view.dim} at {view.bits}")
        if table.bits < 16:
            view.codes.copy_(table.codes)
            view.scale.copy_(table.scale)
            view.bias.copy_(table.bias)
        else:
            view.weight.copy_(table.codes)

    def table(self, name: str) -> RowwiseTable:
        """Table `name` as a `RowwiseTable` (its rows of its group's buffers, not copies)."""
        view = self.tables[name]
        if view.bits < 16:
            return RowwiseTable(view.codes, view.scale, view.bias, view.bits, view.dim)
        weight = view.weight
        empty = weight.new_empty(0, dtype=torch.float16)
        return RowwiseTable(weight, empty, empty.clone(), view.bits, view.dim)

    @torch.no_grad()
    def dequantized_weights(self) -> dict[str, Tensor]:
        """{name: float32 (rows, stored d)}: every table dequantized whole (what a float SparseArch holding these
        weights computes the same outputs with)."""
        out = {}
        for name in self.feature_names:
            view = self.tables[name]
            if view.bits < 16:
                out[name] = dequantize_codes(view.codes, view.scale, view.bias, view.bits, view.dim)
            else:
                out[name] = view.weight.to(torch.float32, copy=True)
        return out

    def storage_bytes(self) -> int:
        """Stored bytes: each table at its bits (`rowwise.storage_bytes`) plus the projections at fp32."""
        tables = sum(storage_bytes(s.rows, s.stored_dim, self.bits[s.name]) for s in self.specs)
        return tables + 4 * sum(p.numel() for p in self.projections.parameters())

    def fuse_table_keys_(self, state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        """Rewrite, in place, the per-table buffers `<prefix>tables.<name>.codes / .scale / .bias` (8 and 4 bits) or
        `.weight` (16 and 32 bits) that files held before the tables were grouped into their group's
        `<prefix>qgroups.<g>.<part>`, concatenated in the group's table order; a group with any of its keys there,
        or whose tables' keys are not all there, is left as it is. Returns `state_dict`."""
        for g, group in enumerate(self.qgroups):
            names = [self.feature_names[f] for f in group.positions]
            targets = {part: f"{prefix}qgroups.{g}.{part}" for part in group.parts}
            old = {part: [f"{prefix}tables.{name}.{part}" for name in names] for part in group.parts}
            if any(k in state_dict for k in targets.values()):
                continue
            if all(k in state_dict for keys in old.values() for k in keys):
                for part, keys in old.items():
                    state_dict[targets[part]] = torch.cat([state_dict.pop(k) for k in keys])
        return state_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Called before the groups load theirs (from the same dict): old per-table keys load too.
        self.fuse_table_keys_(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, sparse: Tensor) -> list[Tensor]:
        ids = sparse.t().index_select(0, self.feature_ids)  # (F, B), contiguous, group after group
        out = [ids] * self.num_features  # placeholders, each replaced by its table's (B, d_f) below
        for group in self.qgroups:
            vectors = group(ids[group.start: group.stop]).unbind(0)  # T_g of (B, d_g)
            for t, f in enumerate(group.positions):
                out[f] = vectors[t]
        for projection in self.projections.values():  # empty for a model without projections
            out[projection.position] = projection(out[projection.position])
        return out
