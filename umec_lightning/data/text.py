"""Vectorised parsing of delimited text in byte blocks, with exact 1-based line numbers for errors.

A file is read in blocks of whole lines. Field counts are checked on the raw bytes with numpy (count
delimiters per line), so every bad line is known by its line number before Arrow parses the rest of
the block; per-column value checks then map a bad row back to its line the same way.

Input files are plain text or gzip (read as a stream: memory stays bounded, nothing is decompressed to
disk); ``DataReader`` tells them apart by their first bytes, whatever the file is called, and refuses
other compressed or binary formats (bzip2, xz, zstd, zip, parquet, NUL bytes...) by name. A UTF-8 byte
order mark is dropped; ``\r\n`` line ends are read as ``\n``. Only the empty field is missing (null)
unless a caller names more tokens (``null_values``): Arrow's default tokens ("NA", "NULL", "nan"...) are
values like any other.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import logging
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from umec_lightning.data.core import DataError

log = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 16 << 20
# Arrow's CSV reader parses in blocks of this size and refuses a line longer than one ("straddling object"):
# the longest line a data file may have; a longer one is a DataError naming the file and the line.
MAX_LINE_BYTES = 1 << 20

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


SNIFF_BYTES = 1 << 16  # how much of a file (after gzip) is looked at to tell text from binary

# (first bytes, format, how to make it readable). gzip is read; the others are refused by name.
_MAGIC: list[tuple[bytes, str, str]] = [
    (b"\x1f\x8b", "gzip", ""),
    (b"\xfd7zXZ\x00", "xz", "unxz -k FILE"),
    (b"\x28\xb5\x2f\xfd", "zstd", "unzstd FILE"),
    (b"PK\x03\x04", "zip", "unzip FILE"),
    (b"PK\x05\x06", "zip", "unzip FILE"),
    (b"PAR1", "parquet", "export it to CSV"),
    (b"7z\xbc\xaf\x27\x1c", "7z", "7z x FILE"),
    (b"\x04\x22\x4d\x18", "lz4", "unlz4 FILE"),
    (b"\x93NUMPY", "numpy .npy", "export it to CSV"),
    (b"\x89HDF\r\n\x1a\n", "HDF5", "export it to CSV"),
    (b"\xff\xfe", "UTF-16 text", "re-encode it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8"),
    (b"\xfe\xff", "UTF-16 text", "re-encode it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8"),
]
_BZIP2 = re.compile(rb"BZh[1-9]1AY&SY")  # the bzip2 stream magic plus its first block's magic
_UTF8_BOM = b"\xef\xbb\xbf"


def detect_format(head: bytes) -> tuple[str, str] | None:
    """(format, how to make it readable) when ``head``, a file's first bytes, is not plain text."""
    if _BZIP2.match(head):
        return "bzip2", "bunzip2 -k FILE"
    for magic, fmt, fix in _MAGIC:
        if head.startswith(magic):
            return fmt, fix
    return None


class DataReader:
    """A data file as a stream of text bytes: plain, or gzip decompressed on the fly (bounded memory).

    ``read(n)`` returns up to ``n`` bytes (``b""`` at the end); ``stored_pos()`` is the offset reached
    in the file as stored (compressed bytes for gzip), for progress bars. Construction raises DataError
    naming the file and the format for anything that is not text: other compressed formats, and NUL
    bytes in the first ``SNIFF_BYTES`` bytes of text.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._raw = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        try:
            self._stream, self.compression = self._open_stream()
            head = self._read_stream(SNIFF_BYTES)
            self._check_text(head)
            self._head = head[len(_UTF8_BOM) :] if head.startswith(_UTF8_BOM) else head
        except BaseException:
            self._raw.close()
            raise

    def _open_stream(self):
        magic = self._raw.read(16)
        self._raw.seek(0)
        found = detect_format(magic)
        if found is None:
            return self._raw, None
        fmt, fix = found
        if fmt != "gzip":
            hint = f"; {fix.replace('FILE', self.path.name)}" if fix else ""
            raise DataError(
                f"{self.path}: {fmt} file (detected from its first bytes), not delimited text; only plain"
                f" text and gzip are read{hint}"
            )
        return gzip.GzipFile(fileobj=self._raw, mode="rb"), "gzip"

    def _check_text(self, head: bytes) -> None:
        inner = " inside the gzip data" if self.compression else ""
        found = detect_format(head) if self.compression else None
        if found is not None:
            raise DataError(f"{self.path}: {found[0]} data{inner}, not delimited text")
        nul = head.find(b"\0")
        if nul >= 0:
            raise DataError(
                f"{self.path}: binary data (a NUL byte at offset {nul}{inner}), not delimited text"
            )

    def _read_stream(self, n: int) -> bytes:
        if self.compression is None:
            return self._raw.read(n)
        try:
            return self._stream.read(n)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a truncated download, a corrupt member
            raise DataError(f"{self.path}: corrupt or truncated gzip data ({e})") from None

    def read(self, n: int) -> bytes:
        if not self._head:
            return self._read_stream(n)
        out, self._head = self._head[:n], self._head[n:]
        if len(out) < n and not self._head:
            out += self._read_stream(n - len(out))
        return out

    def stored_pos(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        if self._stream is not self._raw:
            self._stream.close()
        self._raw.close()

    def __enter__(self) -> DataReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_readable(path: str | Path) -> Path:
    """DataError (one line) for a missing, unreadable, empty or non-text file (see DataReader)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: empty file")
    try:
        DataReader(p).close()
    except PermissionError:
        raise DataError(f"{p}: permission denied") from None
    return p


def first_line(path: str | Path, limit: int = 16 << 20) -> str:
    """The first line of a data file (decompressed, without its line end), as text."""
    buf = b""
    with DataReader(path) as f:
        while b"\n" not in buf and len(buf) < limit:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            buf += chunk
    return buf.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")


def count_byte(buf: bytes, byte: int, step: int = 1 << 18) -> int:
    """How often ``byte`` occurs in ``buf``: numpy's vectorised compare is faster than
    ``bytes.count`` for one character (a scalar loop in CPython), and it releases the GIL. Taken
    ``step`` bytes at a time so that the compare's temporary stays in cache."""
    arr = np.frombuffer(buf, np.uint8)
    return sum(int(np.count_nonzero(arr[i : i + step] == byte)) for i in range(0, len(arr), step))


def count_lines(path: str | Path, block_bytes: int = 8 << 20) -> int:
    """Number of lines (a last line without a newline counts); gzip files are counted decompressed."""
    n, last = 0, b"\n"
    with DataReader(path) as f:
        while chunk := f.read(block_bytes):
            n += count_byte(chunk, 10)
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
    line0, done = 0, 0
    carry = b""
    with DataReader(path) as f, _progress(path.stat().st_size, path.name, progress) as bar:
        while True:
            chunk = f.read(block_bytes)
            bar.update(f.stored_pos() - done)  # bytes of the file as stored (compressed for gzip)
            done = f.stored_pos()
            if not chunk:
                if carry:
                    yield from _drop_head(carry + b"\n", line0, skip_lines)
                return
            cut = chunk.rfind(b"\n")
            if cut < 0:
                carry += chunk
                continue
            # One copy at most: the carried partial line joined to the chunk's whole lines.
            block = chunk if not carry and cut == len(chunk) - 1 else b"".join((carry, memoryview(chunk)[: cut + 1]))
            carry = chunk[cut + 1 :]
            n = count_byte(block, 10)
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


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def worker_pool(threads: int | None):
    """A thread pool of ``threads`` workers (None: the available cores), or None for one: then
    ``map_ordered`` runs inline, with no thread at all."""
    n = available_cores() if threads is None else int(threads)
    if n <= 1:
        yield None
        return
    with ThreadPoolExecutor(n, thread_name_prefix="umec-data") as pool:
        yield pool


def map_ordered(pool: ThreadPoolExecutor | None, fn: Callable, items: Iterable, ahead: int | None = None):
    """``map(fn, items)`` on the pool's threads, results in input order, with at most ``ahead``
    (default: the pool's workers) items in flight, so memory stays bounded by a few blocks. An
    exception is raised when its item's turn comes, as in a serial loop; the items still queued
    are then cancelled."""
    if pool is None:
        yield from map(fn, items)
        return
    ahead = ahead or pool._max_workers  # ThreadPoolExecutor keeps its size there (CPython 3.8+)
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


def transpose_into(dst: np.ndarray, src: np.ndarray, step: int = 1 << 13) -> None:
    """``dst[...] = src.T`` for a tall (rows, features) ``src``, ``step`` rows at a time: numpy's
    plain strided transpose misses the cache on every element, the blocked one does not
    (docs/performance.md, "Preprocessing")."""
    for a in range(0, src.shape[0], step):
        dst[:, a : a + step] = src[a : a + step].T


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
    null_values: tuple[str, ...] = ("",),
    use_threads: bool = True,
) -> Block:
    """Check field counts on the raw bytes and drop the bad lines (the caller reports or counts them),
    then let Arrow parse the rest into string/binary columns. A field equal to one of ``null_values``
    (by default only the empty field) is null; nothing else is. ``use_threads``: Arrow's own threads
    (off when the caller already parses several blocks at once)."""
    if b"\r" in block:
        block = block.replace(b"\r\n", b"\n")  # CRLF files: the \r is no part of the last field
    n_lines = count_byte(block, 10)
    delim = delimiter.encode()
    n_delims = count_byte(block, delim[0]) if len(delim) == 1 else block.count(delim)
    if n_delims == (len(names) - 1) * n_lines:
        # Fast path: the delimiter total is right, so a bad line can only hide behind another bad
        # line with too many fields, which Arrow reports; then the block takes the exact path.
        hit = []
        table = _read(
            block, names, types, delimiter, quote_char, lambda row: hit.append(1) or "skip", null_values, use_threads,
            path, line0,
        )
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
    table = _read(block, names, types, delimiter, quote_char, None, null_values, use_threads, path, lines)
    if table.num_rows != len(lines):  # e.g. a quoted field spanning lines: the line map would be wrong
        raise DataError(f"{path}:{line0 + 1}: could not split the block into lines (quoted newlines?)")
    return Block(table, lines, bad_lines, field_error)


def _read(
    block: bytes, names, types, delimiter, quote_char, handler, null_values, use_threads=True, path=None, lines=0
) -> pa.Table:
    """Arrow's CSV reader on a block of whole lines. ``lines``: the block's first 0-based file line, or the file
    line of each of its lines, to name a line longer than the reader takes (``MAX_LINE_BYTES``)."""
    try:
        return _read_csv(block, names, types, delimiter, quote_char, handler, null_values, use_threads)
    except pa.ArrowInvalid as e:
        if "straddling" not in str(e):
            raise
        raise DataError(_long_line(block, path, lines)) from None


def _long_line(block: bytes, path, lines) -> str:
    """The message for the first line of ``block`` longer than ``MAX_LINE_BYTES`` (Arrow's "straddling object")."""
    ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
    lengths = np.diff(ends, prepend=-1)  # bytes per line, its newline included
    long = np.flatnonzero(lengths > MAX_LINE_BYTES)
    i = int(long[0]) if len(long) else int(np.argmax(lengths))
    line = (lines + i if isinstance(lines, int) else int(lines[i])) + 1
    return (
        f"{path}:{line}: a line of {int(lengths[i]) - 1} bytes; lines are read up to {MAX_LINE_BYTES} bytes (1 MiB,"
        f" the CSV reader's block): a field this long is not a feature (a missing line end or a stray quote?)"
    )


def _read_csv(block: bytes, names, types, delimiter, quote_char, handler, null_values, use_threads) -> pa.Table:
    return pacsv.read_csv(
        pa.BufferReader(block),  # zero copy, and Arrow reads it without calling back into Python
        read_options=pacsv.ReadOptions(column_names=names, block_size=MAX_LINE_BYTES, use_threads=use_threads),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter, quote_char=quote_char, ignore_empty_lines=False, invalid_row_handler=handler
        ),
        convert_options=pacsv.ConvertOptions(
            column_types=types, null_values=list(null_values), strings_can_be_null=True, check_utf8=False
        ),
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
    cleaned = pc.replace_substring_regex(cleaned, r"^\+", "")  # the patterns allow "+5"; Arrow's cast does not
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
