"""The bytes of the files a server loads, known before they are written: what `budget.bytes` is met on.

A served file holds the stored tensors (`quant.plan.planned_bytes`) and its format's own bytes: compressed.pt's
pickled structure and zip records, TorchScript's code records, ONNX's graph, torchrec's pickled modules (its rows
are ours byte for byte: fbgemm's CPU row alignment, `quant.fbgemm.CPU_ROW_ALIGNMENT`, pads none). A format's own
bytes follow the model's layout (its modules, tensors and ops), not its tables' rows, so they are measured by writing
a miniature: the model's structure with every table cut to `MINI_ROWS` rows, stored as the plan says, written in
each format to a temporary folder (the writers of the run: `compressed.save_compressed`, `export_report.EXPORTS`):

    overhead_f = file_f(miniature) − stored(miniature)
    served_f(model, plan) = planned_bytes(model, plan) + overhead_f + SLACK_f

SLACK_f covers what the miniature cannot see, by format (`slack_bytes`): a torch archive's records start on 64-byte
boundaries and torchrec's fbgemm tables each on a 128-byte one, which vary with the tensors' sizes; ONNX's tensors
are length-prefixed (a few bytes more for a larger one). The run measures the written files afterwards
(summary.json `file_bytes`), and `budget_met` is decided on those, not on this estimate.

    served_formats(cfg)                 the formats a run writes: "model" (compressed.pt) and each export.<format>
    format_overheads(model, plan, formats, kept)   {format: overhead_f} of `model`'s layout at `plan`
    served_bytes(model, plan, overheads)           {format: served_f}; `largest_served` the largest of them
    reserve_bytes(model, plan, formats)            the largest format's bytes beyond the stored tensors: what a
                                                   bytes budget holds back from the pruning before it runs
    method_reserve(cfg, method, model, plan)       `reserve_bytes` on the largest layout a compression method
                                                   may end with (`layout`: the structure a Kept extracts), its
                                                   tables spread over ranks (a factored layout, `miniature`) or
                                                   widths (a pruned one where they may differ, `spread_widths`)
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..archive import ALIGNMENT
from .plan import BitsPlan, apply_plan, planned_bytes

log = logging.getLogger(__name__)

MINI_ROWS = 2
MODEL = "model"  # compressed.pt: what `load_compressed` reads
TABLE_ALIGNMENT = 128  # fbgemm starts each table of its TBE on a 128-byte boundary
ONNX_PREFIX = 16  # an ONNX tensor's varints (its row count, its data's and its own length): up to 4 bytes longer each


def served_formats(cfg) -> list[str]:
    """"model" (compressed.pt, always written) and each format `export` asks for, in `export_report.EXPORTS` order."""
    from ..export_report import EXPORTS

    export = cfg.get("export") or {}
    return [MODEL] + [fmt for fmt in EXPORTS if export.get(fmt)]


def miniature(model: nn.Module, spread: bool = False) -> nn.Module:
    """A float model of `model`'s family and structure (the same modules, widths and ranks) with every table cut to
    MINI_ROWS rows, its weights a fresh seeded initialisation, batch norm folded (as the quantize stage stores it).
    `spread`: a model whose tables are projected (factored: `table_ranks`) gets them stored at as many different
    ranks as they allow (1, 2, .., d − 1, 1, ..): the most fused groups (one per bits and width, `quant.sparse`)
    a factored model of this structure can have. (Widths a pruning may spread are `spread_widths`'s.)"""
    from ..models.family import family_of_model
    from ..models.serve import fold_batch_norm

    s = model.structure
    changes = {"table_sizes": [min(MINI_ROWS, int(n)) for n in s.table_sizes]}
    if spread and s.table_ranks is not None:
        full = getattr(s, "lookup_dims", None) or s.table_dims  # the widths a table may be projected from
        changes["table_ranks"] = [1 + f % (d - 1) if d > 1 else d for f, d in enumerate(full)]
    mini = family_of_model(model).build(dataclasses.replace(s, **changes), seed=0).eval()
    return fold_batch_norm(mini)  # as served and stored: batch norm folded before the widths apply (`quantize`)


def slack_bytes(model: nn.Module, fmt: str) -> int:
    """What format `fmt`'s file of the miniature may differ by from the model's beyond the rows: per tensor a torch
    archive record's alignment (`archive.ALIGNMENT`; ONNX: a longer length prefix), per table an fbgemm table's
    start alignment (torchrec's file), and 1 kB for numbers written as text (shapes)."""
    tensors = len(model.state_dict()) * (ONNX_PREFIX if fmt == "onnx" else ALIGNMENT)
    tables = TABLE_ALIGNMENT * len(model.structure.table_sizes) if fmt == "torchrec" else 0
    return tensors + tables + 1024


def format_overheads(model: nn.Module, plan: BitsPlan, formats: list[str], kept=None, spread: bool = False
                     ) -> dict[str, int]:
    """{format: its own bytes beyond the stored tensors} for `model`'s layout stored at `plan`,
    measured on the miniature's files (module docstring; `spread` as `miniature`'s). `model` as served (batch norm
    folded); `kept` the Kept compressed.pt holds (its size follows the model's features and neurons, not its
    rows)."""
    from ..compressed import save_compressed
    from ..compression.kept import Kept
    from ..export_report import EXPORTER_LOGGERS, EXPORTS, file_bytes, quiet_loggers

    mini = miniature(model, spread)
    stored = apply_plan(mini, plan.on(mini))
    base = planned_bytes(mini, plan.on(mini))
    out = {}
    with tempfile.TemporaryDirectory() as tmp, quiet_loggers(*EXPORTER_LOGGERS), torch.no_grad():
        for fmt in formats:
            if fmt == MODEL:
                path = save_compressed(Path(tmp) / "compressed.pt", stored, kept or Kept.everything(mini),
                                       {"mode": "x" * 32, "model": "x" * 32, "data": "x" * 32})
            else:
                name, write = EXPORTS[fmt]
                try:
                    path = write(stored, Path(tmp) / name, atol=1e-4)
                except Exception as err:  # noqa: BLE001 - e.g. torchrec not installed: the run's export of it
                    # fails too and is reported there (`export_errors`), with no file to count
                    log.warning("the served bytes of export.%s cannot be measured (%s: %s); not counted", fmt,
                                type(err).__name__, err)
                    continue
            out[fmt] = file_bytes(Path(path)) - base
    return out


def served_bytes(model: nn.Module, plan: BitsPlan, overheads: dict[str, int]) -> dict[str, int]:
    """{format: the bytes of its file} for `model` stored at `plan`, estimated from `format_overheads`."""
    stored = planned_bytes(model, plan.on(model))
    return {fmt: stored + overhead + slack_bytes(model, fmt) for fmt, overhead in overheads.items()}


def largest_served(model: nn.Module, plan: BitsPlan, overheads: dict[str, int]) -> int:
    """The largest file's estimated bytes (`served_bytes`); the stored bytes when no format is counted."""
    sizes = served_bytes(model, plan, overheads)
    return max(sizes.values()) if sizes else planned_bytes(model, plan.on(model))


def reserve_bytes(model: nn.Module, plan: BitsPlan, formats: list[str], kept=None, spread: bool = True) -> int:
    """max_f (overhead_f + SLACK_f) for `model`'s layout at `plan`: the bytes of the largest served file
    beyond its stored tensors. Measured before the pruning, on the largest layout it may end with (`layout`) with
    its factored tables spread over ranks (`miniature`), so that the params share it gets leaves room for them
    (`spread` False: `model`'s own layout, as a method that chooses its layout again measures it). An estimate:
    the `quantize` stage measures again on the model it stores, and completes or reports unmet."""
    overheads = format_overheads(model, plan.on(model), formats, kept, spread=spread)
    return max(overhead + slack_bytes(model, fmt) for fmt, overhead in overheads.items())


def method_reserve(cfg, method, model: nn.Module, plan: BitsPlan) -> int:
    """`reserve_bytes` of the files the run serves (`served_formats`) on the largest layout `method` may end with
    from `model` (`CompressionMethod.largest_layout`): what the compress stage, and the config check before it,
    hold back from the pruning's share of `budget.bytes`."""
    return reserve_bytes(layout(model, spread_widths(model, method.largest_layout(model))), plan,
                         served_formats(cfg))


def spread_widths(model: nn.Module, kept):
    """`kept` with each unprojected table keeping a different number of its columns (1, 2, .., d, 1, ..) where
    `model`'s structure lets tables differ in width (not `dot`'s one width for all): the most fused groups a pruning
    that narrows tables one by one can leave. `kept` itself where none can differ (and for a factored layout,
    whose ranks `miniature` spreads)."""
    from ..models.family import family_of_model

    if any(name in kept.ranks for name in kept.dims):
        return kept
    dims = {name: cols[:1 + f % len(cols)] for f, (name, cols) in enumerate(kept.dims.items()) if cols}
    wider = dataclasses.replace(kept, dims={**kept.dims, **dims})
    try:
        family_of_model(model).extracted_structure(model, wider)
    except ValueError:  # e.g. `dot`: every table and the bottom output one width
        return kept
    return wider


def layout(model: nn.Module, kept) -> nn.Module:
    """The model `kept` extracts from `model` (`models.family.extracted_structure`), shapes only (meta tensors)."""
    from ..models.family import family_of_model

    family = family_of_model(model)
    structure = family.extracted_structure(model, kept)
    with torch.device("meta"):
        return family.build(structure)
