"""libFM / svmlight text of one-hot CTR fields (plain or gzip), to the cache.

The public releases of Frappe and MovieLens-tag used by NFM, AFM and AFN (github.com/hexiangnan/
neural_factorization_machine, data/frappe: ``frappe.train.libfm``, ``frappe.validation.libfm``,
``frappe.test.libfm``) are lines of blank-separated tokens::

    <label> <index>:<value> <index>:<value> ...        e.g.  -1 266:1 1244:1 5042:1 ... 5149:1

The label is libFM's -1/1 or 0/1: -1 and 0 are no click, 1 a click, anything else is a bad line. In these
CTR releases every field contributes exactly one one-hot index, the fields in a fixed order and the indices
global across fields (the second field's indices follow the first's). So a line holds one ``index:1`` pair
per field: the pair's position is the field (``fields`` names them in file order), its index the category.
A line with another number of pairs, a value other than 1, or an index that is not a non-negative integer
is a bad line (``on_bad_line``: ``error`` names the file and line, ``skip`` drops and counts it).

Each field's indices get their own vocabulary built on the train rows (id 0: seen fewer than
``min_frequency`` times, or unseen), as for TabularCSV's categorical columns. Splits, validation carved
from train, gzip and the cache are TabularCSV's: this source is a TabularCSV with a libFM line parser.
``path`` is a mapping ``{train, val, test}`` of files (without ``val``: ``val_fraction`` of train) or one
file cut by ``split``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umec_lightning.data.cache import file_identity, make_fingerprint
from umec_lightning.data.core import DataError
from umec_lightning.data.tabular import FilePlan, TabularCSV
from umec_lightning.data.text import (
    DEFAULT_BLOCK_BYTES,
    check_readable,
    handle_bad_rows,
    iter_line_blocks,
    number_column,
    parse_block,
)

LABEL = "label"
LABELS = (-1.0, 0.0, 1.0)
_PAIR = r"^(?P<index>[0-9]{1,18}):(?P<value>\S+)$"
_BLANKS = re.compile(rb"[ \t]+")


class LibFMText(TabularCSV):
    """Source for libFM files of one-hot fields (see the module docstring).

    ``fields``: the field names, in the order their pairs appear on a line.
    """

    def __init__(
        self,
        path,
        fields,
        split=(0.7, 0.2, 0.1),
        min_frequency: int = 1,
        on_bad_line: str = "error",
        name: str = "libfm",
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        progress: bool = True,
        val_fraction: float = 0.1,
        val_split: str = "order",
        seed: int = 0,
    ):
        if isinstance(fields, str) or not fields:
            raise DataError(f"data.fields: expected the list of field names in file order, got {fields!r}")
        fields = [str(f) for f in fields]
        if len(set(fields)) != len(fields) or LABEL in fields:
            raise DataError(f"data.fields: names must be distinct and not {LABEL!r}, got {fields}")
        super().__init__(
            path, label=LABEL, categorical=fields, delimiter=" ", header=False, columns=[LABEL, *fields],
            split=split, dense_transform="none", min_frequency=min_frequency, on_bad_line=on_bad_line, name=name,
            block_bytes=block_bytes, progress=progress, val_fraction=val_fraction, val_split=val_split, seed=seed,
        )

    def options(self) -> dict:
        return {**super().options(), "format": "libfm"}

    def fingerprint(self) -> str:
        files = {s: file_identity(check_readable(p)) for s, p in self.paths.items()}
        return make_fingerprint("LibFMText", self.options(), [files])

    def write(self, out_dir: Path) -> dict:
        fields = super().write(out_dir)
        fields["source"]["kind"] = "LibFMText"
        return fields

    def _schema(self) -> tuple[list[str], str, list[str], list[str]]:
        for p in self.paths.values():
            check_readable(p)
        return [LABEL, *self.categorical], LABEL, [], list(self.categorical)

    def _parse(self, plan: FilePlan, schema):
        """Yield (lines, label uint8, dense (N, 0), index strings per field, skipped) per block."""
        names, _, _, fields = schema
        types = dict.fromkeys(names, pa.string())
        what = {
            LABEL: "expected -1, 0 or 1 (libFM's -1/1, or 0/1)",
            **dict.fromkeys(fields, "expected <index>:1, one one-hot index per field"),
        }
        path = plan.path
        for raw, line0 in iter_line_blocks(path, self.block_bytes, skip_lines=plan.skip, progress=self.progress):
            raw = single_spaces(raw)
            block = parse_block(raw, line0, names, types, " ", path)
            if len(block.bad_lines) and self.on_bad_line == "error":
                block.field_error = _count_error(raw, line0, int(block.bad_lines[0]), path, len(fields))
            t = block.table
            value, bad = number_column(t.column(LABEL), "float")
            bad_label = ~np.isin(value, LABELS) | t.column(LABEL).is_null().to_numpy(zero_copy_only=False)
            masks = {LABEL: bad_label if bad is None else bad | bad_label}
            cats = []
            for f in fields:
                index, masks[f] = one_hot_index(t.column(f))
                cats.append(index)
            keep, skipped = handle_bad_rows(block, masks, path, self.on_bad_line, what)
            lines, label = block.lines, (value > 0).astype(np.uint8)
            if keep is not None:
                lines, label, cats = lines[keep], label[keep], [c.filter(pa.array(keep)) for c in cats]
            yield lines, label, np.zeros((len(label), 0), np.float32), cats, skipped


def one_hot_index(col) -> tuple[pa.Array, np.ndarray]:
    """(index strings, bad row mask) of one field's ``index:value`` tokens; a good token has a non-negative
    integer index and the value 1."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    parts = pc.extract_regex(arr, _PAIR)  # null where a token does not match
    matched = parts.is_valid().to_numpy(zero_copy_only=False)
    value, bad = number_column(pc.struct_field(parts, "value"), "float")
    bad_pair = ~matched | (value != 1.0)
    index = pc.fill_null(pc.struct_field(parts, "index"), "")
    return index, bad_pair if bad is None else bad | bad_pair


def single_spaces(block: bytes) -> bytes:
    """One space between tokens and none at a line's ends (svmlight allows any run of blanks), ``\\n`` line
    ends: the form ``parse_block`` splits on. A block already in that form is returned as it is."""
    if b"\r" in block:
        block = block.replace(b"\r\n", b"\n")
    if b"\t" in block or b"  " in block or b" \n" in block or b"\n " in block or block.startswith(b" "):
        block = _BLANKS.sub(b" ", block).replace(b" \n", b"\n").replace(b"\n ", b"\n").removeprefix(b" ")
    return block


def _count_error(block: bytes, line0: int, line: int, path: Path, n_fields: int) -> str:
    """The message for a line (0-based ``line``, in ``block`` from ``line0``) with the wrong number of tokens."""
    tokens = block.split(b"\n")[line - line0].split()
    got = "an empty line" if not tokens else f"{len(tokens) - 1} pairs after the label"
    return (
        f"{path}:{line + 1}: expected a label and {n_fields} index:value pairs (one per field of data.fields),"
        f" got {got}"
    )
