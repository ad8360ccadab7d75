"""Vectorised parsing of delimited text in byte blocks, with exact 1-based line numbers for errors.

A file is read in blocks of whole lines. Field counts are checked on the raw bytes with numpy (count
delimiters per line), so every bad line is known by its line number before Arrow parses the rest of
the block; per-column value checks then map a bad row back to its line the same way.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from umec_lightning.data.core import DataError

log = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 16 << 20

_HEX_LUT = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i
# Two ASCII characters (read as one little-endian uint16) -> their byte value, or 0xFFFF if not hex.
_pair = np.arange(1 << 16)
_lo, _hi = _HEX_LUT[_pair & 0xFF].astype(np.uint16), _HEX_LUT[_pair >> 8].astype(np.uint16)
_HEX_PAIR_LUT = np.where((_lo == 255) | (_hi == 255), 0xFFFF, (_lo << 4) | _hi).astype(np.uint16)
del _pair, _lo, _hi


def check_readable(path: str | Path) -> Path:
    """DataError (one line) for a missing, unreadable or empty file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: empty file")
    return p


def count_lines(path: str | Path, block_bytes: int = 8 << 20) -> int:
    """Number of lines (a last line without a newline counts)."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(block_bytes):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, disable=not (enabled and sys.stderr.isatty())
    )


def iter_line_blocks(
    path: str | Path, block_bytes: int = DEFAULT_BLOCK_BYTES, skip_lines: int = 0, progress: bool = True
) -> Iterator[tuple[bytes, int]]:
    """Yield (block of whole lines ending in a newline, 0-based index of its first line)."""
    path = Path(path)
    line0 = 0
    carry = b""
    with open(path, "rb") as f, _progress(path.stat().st_size, path.name, progress) as bar:
        while True:
            chunk = f.read(block_bytes)
            bar.update(len(chunk))
            if not chunk:
                if carry:
                    yield from _drop_head(carry + b"\n", line0, skip_lines)
                return
            buf = carry + chunk if carry else chunk
            cut = buf.rfind(b"\n")
            if cut < 0:
                carry = buf
                continue
            block, carry = buf[: cut + 1], buf[cut + 1 :]
            n = block.count(b"\n")
            yield from _drop_head(block, line0, skip_lines)
            line0 += n


def _drop_head(block: bytes, line0: int, skip_lines: int):
    """Remove the first ``skip_lines`` lines of the file (a header) from the block(s) holding them."""
    while line0 < skip_lines and block:
        cut = block.find(b"\n")
        block = block[cut + 1 :]
        line0 += 1
    if block:
        yield block, line0


@dataclass
class Block:
    """The parsed good rows of one block: ``table`` (all columns as strings/binary) and ``lines``
    (0-based file line of each row)."""

    table: pa.Table
    lines: np.ndarray
    bad_lines: np.ndarray  # 0-based lines whose field count was wrong (dropped from the table)
    field_error: str | None = None  # message for the first of them


def parse_block(
    block: bytes,
    line0: int,
    names: list[str],
    types: dict[str, pa.DataType],
    delimiter: str,
    path: Path,
    quote_char: str | bool = False,
) -> Block:
    """Check field counts on the raw bytes and drop the bad lines (the caller reports or counts them),
    then let Arrow parse the rest into string/binary columns (empty field -> null)."""
    n_lines = block.count(b"\n")
    if block.count(delimiter.encode()) == (len(names) - 1) * n_lines:
        # Fast path: the delimiter total is right, so a bad line can only hide behind another bad
        # line with too many fields, which Arrow reports; then the block takes the exact path.
        hit = []
        table = _read(block, names, types, delimiter, quote_char, lambda row: hit.append(1) or "skip")
        if not hit and table.num_rows == n_lines:
            return Block(table, line0 + np.arange(n_lines), np.zeros(0, np.int64))
    arr = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(arr == 10)
    delims = np.flatnonzero(arr == ord(delimiter))
    per_line = np.diff(np.searchsorted(delims, ends), prepend=0)
    line_idx = line0 + np.arange(len(ends))
    bad = per_line != len(names) - 1
    bad_lines = line_idx[bad]
    field_error = None
    if len(bad_lines):
        i = int(np.flatnonzero(bad)[0])
        start = 0 if i == 0 else ends[i - 1] + 1
        got = f"{per_line[i] + 1}" if ends[i] > start else "0 (empty line)"
        field_error = f"{path}:{bad_lines[0] + 1}: expected {len(names)} fields, got {got}"
        starts = np.concatenate([[0], ends[:-1] + 1])
        block = b"".join(block[s : e + 1] for s, e in zip(starts[~bad], ends[~bad]))
    lines = line_idx[~bad]
    if not block:
        return Block(pa.table({n: pa.array([], types[n]) for n in names}), lines, bad_lines, field_error)
    table = _read(block, names, types, delimiter, quote_char, None)
    if table.num_rows != len(lines):  # e.g. a quoted field spanning lines: the line map would be wrong
        raise DataError(f"{path}:{line0 + 1}: could not split the block into lines (quoted newlines?)")
    return Block(table, lines, bad_lines, field_error)


def _read(block: bytes, names, types, delimiter, quote_char, handler) -> pa.Table:
    return pacsv.read_csv(
        io.BytesIO(block),
        read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 20),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter, quote_char=quote_char, ignore_empty_lines=False, invalid_row_handler=handler
        ),
        convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True, check_utf8=False),
    )


def _as_array(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def hex_column(col) -> tuple[np.ndarray, np.ndarray | None]:
    """Hex strings (1..8 digits; empty/null -> 0) to uint32 without overflow. Returns (values, bad
    row mask or None)."""
    arr = _as_array(col)
    n = len(arr)
    out = np.zeros(n, np.uint32)
    if n == 0:
        return out, None
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, np.int32, count=n + 1, offset=arr.offset * 4)
    lengths = np.diff(offsets)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    nonempty = lengths != 0
    bad = None
    if np.all(lengths[nonempty] == 8):  # the Criteo case: the non-empty values lie back to back
        m = int(np.count_nonzero(nonempty))
        raw = data[offsets[0] : offsets[0] + 8 * m].reshape(m, 8)
        rows = nonempty
    else:
        bad = nonempty & (lengths > 8)
        rows = nonempty & ~bad
        j = np.arange(8)
        ln, st = lengths[rows], offsets[:-1][rows]
        pad = 8 - ln
        src = st[:, None] + j[None, :] - pad[:, None]
        raw = np.where(j[None, :] >= pad[:, None], data[np.clip(src, 0, max(len(data) - 1, 0))], ord("0"))
        raw = raw.astype(np.uint8)
    pairs = _HEX_PAIR_LUT[np.ascontiguousarray(raw).view("<u2")]  # (m, 4): byte values or 0xFFFF
    if (pairs > 255).any():
        bad_digit = (pairs > 255).any(axis=1)
        b = np.zeros(n, bool)
        b[np.flatnonzero(rows)[bad_digit]] = True
        bad = b if bad is None else bad | b
        pairs[bad_digit] = 0
    packed = pairs.astype(np.uint8)
    out[rows] = packed.view(">u4").ravel()
    return out, bad


_INT_RE = r"^[+-]?[0-9]{1,18}$"
_FLOAT_RE = r"^[+-]?(([0-9]+\.?[0-9]*)|(\.[0-9]+))([eE][+-]?[0-9]+)?$|^[+-]?(inf|nan)$"


def number_column(col, kind: str = "int") -> tuple[np.ndarray, np.ndarray | None]:
    """Integer (``kind='int'``) or float strings to int64 / float64 (null -> 0). Returns (values, bad
    row mask or None)."""
    arr = _as_array(col)
    target = pa.int64() if kind == "int" else pa.float64()
    try:
        return pc.cast(arr, target).fill_null(0).to_numpy(zero_copy_only=False), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    ok = pc.match_substring_regex(pc.utf8_trim_whitespace(arr), _INT_RE if kind == "int" else _FLOAT_RE)
    ok = pc.or_kleene(ok, pc.is_null(arr)).fill_null(True)
    bad = ~ok.to_numpy(zero_copy_only=False)
    cleaned = pc.if_else(ok, pc.utf8_trim_whitespace(arr), pa.scalar(None, arr.type))
    values = pc.cast(cleaned, target).fill_null(0).to_numpy(zero_copy_only=False)
    return values, bad


def first_bad(masks: dict[str, np.ndarray | None]) -> tuple[int, str] | None:
    """(row, column name) of the first bad row over all columns, or None."""
    best = None
    for name, m in masks.items():
        if m is None or not m.any():
            continue
        r = int(np.argmax(m))
        if best is None or r < best[0]:
            best = (r, name)
    return best


def combine_bad(masks: dict[str, np.ndarray | None], n: int) -> np.ndarray | None:
    out = None
    for m in masks.values():
        if m is not None and m.any():
            out = m.copy() if out is None else out | m
    return out


def log1p_clamped(values: np.ndarray) -> np.ndarray:
    """The DLRM dense transform: log(1 + max(x, 0)), as float32."""
    return np.log1p(np.maximum(values, 0).astype(np.float32))


def handle_bad_rows(
    block: Block, masks: dict[str, np.ndarray | None], path: Path, on_bad_line: str, what: dict[str, str]
) -> tuple[np.ndarray | None, int]:
    """Raise for the first bad line of the block (error mode), or return (row keep mask or None,
    number of lines skipped in this block, field-count ones included)."""
    first = first_bad(masks)
    if on_bad_line == "error":
        value_line = int(block.lines[first[0]]) if first is not None else None
        field_line = int(block.bad_lines[0]) if len(block.bad_lines) else None
        if field_line is not None and (value_line is None or field_line < value_line):
            raise DataError(block.field_error)
        if value_line is not None:
            row, name = first
            value = block.table.column(name)[row].as_py()
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            raise DataError(f"{path}:{value_line + 1}: {name}: {what.get(name, 'bad value')}, got {value!r}")
        return None, 0
    if on_bad_line != "skip":
        raise DataError(f"on_bad_line: expected 'error' or 'skip', got {on_bad_line!r}")
    bad = combine_bad(masks, block.table.num_rows)
    skipped = len(block.bad_lines) + (int(bad.sum()) if bad is not None else 0)
    return (None if bad is None else ~bad), skipped
