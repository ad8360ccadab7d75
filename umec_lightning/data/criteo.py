"""Raw Criteo TSV (Kaggle ``train.txt`` or Terabyte ``day_0..day_23``) to the cache, streaming.

Conventions (method.md §2): empty -> 0; negative dense -> 0; dense -> log(1 + x); categorical hex
parsed as uint32 (never int32), optionally ``% max_ind_range``, then remapped per feature to a
vocabulary. The vocabulary is built on the TRAIN rows only (no peeking at val/test): id 0 is shared
by values seen fewer than ``min_frequency`` times in train and by values never seen in train; the
others get 1.. in increasing raw-value order, so ``table_size = 1 + #frequent train values``.

Two passes: pass 1 parses every file once, writes dense/label and the raw uint32 ids into the
cache and counts train values; pass 2 remaps the raw ids in place (int32, same width). Memory is
bounded by the block size plus the vocabularies, whatever the input size.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umec_lightning.data.cache import (
    SortedCounter,
    SplitWriter,
    count_sorted,
    file_identity,
    make_fingerprint,
    meta_fields,
    remap_sorted,
    retype_npy,
)
from umec_lightning.data.core import NUM_DENSE, NUM_SPARSE, SPLITS, DataError
from umec_lightning.data.text import (
    DEFAULT_BLOCK_BYTES,
    Block,
    check_readable,
    count_lines,
    handle_bad_rows,
    hex_column,
    iter_line_blocks,
    log1p_clamped,
    map_ordered,
    number_column,
    parse_block,
    transpose_into,
    worker_pool,
)

log = logging.getLogger(__name__)

DENSE_NAMES = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
SPARSE_NAMES = [f"C{i}" for i in range(1, NUM_SPARSE + 1)]
COLUMNS = ["label", *DENSE_NAMES, *SPARSE_NAMES]
_TYPES = {
    "label": pa.string(),
    **dict.fromkeys(DENSE_NAMES, pa.string()),
    **dict.fromkeys(SPARSE_NAMES, pa.binary()),
}
_WHAT = {
    "label": "label must be 0 or 1",
    **dict.fromkeys(DENSE_NAMES, "dense value must be an integer"),
    **dict.fromkeys(SPARSE_NAMES, "categorical value must be hex (at most 8 digits)"),
}
_TYPED = {**_TYPES, **dict.fromkeys(["label", *DENSE_NAMES], pa.int64())}
_REMAP_ROWS = 1 << 18
# Off: every block takes the string path (the reference the typed path is tested against).
FAST_INTS = True


def resolve_path(path: str | Path) -> Path:
    """A relative path is taken from the working directory if it exists there, otherwise from the
    project root (the directory holding ``umec_lightning/``), so configs work from tests and Hydra."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    root = Path(__file__).resolve().parents[2]
    return root / p


def kaggle_day_sizes(total_lines: int, days: int = 7) -> list[int]:
    """Lines per "day" when a file is cut by line order: N // days each, the first N % days get +1."""
    base, extra = divmod(total_lines, days)
    return [base + (1 if d < extra else 0) for d in range(days)]


def uniform_from_lines(lines: np.ndarray, day: int, seed: int) -> np.ndarray:
    """Uniform [0, 1) from (seed, day, line) via splitmix64: independent of block boundaries."""
    x = lines.astype(np.uint64) + (np.uint64(day) << np.uint64(40)) + (np.uint64(seed) << np.uint64(48))
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class CriteoTSV:
    """Source for raw Criteo TSV.

    layout ``kaggle``: ``path`` is one file cut into 7 days by line order; train = days 1-6, the last
    day's first half is test and its second half validation. layout ``terabyte``: ``path`` is a
    directory with ``day_0 .. day_{num_days-1}`` (each plain, or gzip as ``day_N.gz``, the way the
    files ship); the last day is halved the same way, the others are train, optionally with label-0
    rows of train kept with probability ``label0_subsample``. Any input file may be gzip, whatever its
    name (detected from its first bytes). Every split must get rows (DataError otherwise).
    ``on_bad_line``: ``error`` (stop with file:line) or ``skip`` (count in ``meta.skipped_lines``).
    ``threads``: blocks decoded at once (None: the available cores); the cache is the same for any.
    """

    def __init__(
        self,
        path: str,
        layout: str = "kaggle",
        name: str | None = None,
        min_frequency: int = 1,
        max_ind_range: int | None = None,
        label0_subsample: float | None = None,
        num_days: int | None = None,
        seed: int = 0,
        on_bad_line: str = "error",
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        progress: bool = True,
        threads: int | None = None,
    ):
        if layout not in ("kaggle", "terabyte"):
            raise DataError(f"layout: expected 'kaggle' or 'terabyte', got {layout!r}")
        if on_bad_line not in ("error", "skip"):
            raise DataError(f"on_bad_line: expected 'error' or 'skip', got {on_bad_line!r}")
        if label0_subsample is not None and not 0.0 < label0_subsample <= 1.0:
            raise DataError(f"label0_subsample: expected a probability in (0, 1], got {label0_subsample}")
        if layout == "kaggle" and label0_subsample is not None:
            raise DataError("label0_subsample: only supported for layout 'terabyte'")
        if max_ind_range is not None and max_ind_range <= 0:
            raise DataError(f"max_ind_range: expected a positive integer, got {max_ind_range}")
        self.path = resolve_path(path)
        self.layout = layout
        self.name = name or f"criteo_{layout}"
        self.min_frequency = int(min_frequency)
        self.max_ind_range = max_ind_range
        self.label0_subsample = label0_subsample
        self.num_days = num_days or (7 if layout == "kaggle" else 24)
        self.seed = seed
        self.on_bad_line = on_bad_line
        self.block_bytes = int(block_bytes)
        self.progress = progress
        self.threads = threads  # None: one per available core; the cache does not depend on it

    def files(self) -> list[Path]:
        if self.layout == "kaggle":
            return [check_readable(self.path)]
        if not self.path.is_dir():
            raise DataError(f"{self.path}: no such directory (terabyte layout expects day_0 .. day_N)")
        return [check_readable(self._day_file(d)) for d in range(self.num_days)]

    def source_files(self) -> list[Path]:
        """The files the cache is built from: their content is digested and checked (cache.py, integrity)."""
        return self.files()

    def _day_file(self, day: int) -> Path:
        """``day_N``, else ``day_N.gz`` (Criteo ships the Terabyte days gzip'd)."""
        plain = self.path / f"day_{day}"
        gz = self.path / f"day_{day}.gz"
        if not plain.exists() and gz.exists():
            return gz
        return plain

    def options(self) -> dict:
        return {
            "layout": self.layout,
            "min_frequency": self.min_frequency,
            "max_ind_range": self.max_ind_range,
            "label0_subsample": self.label0_subsample,
            "num_days": self.num_days,
            "seed": self.seed,
            "on_bad_line": self.on_bad_line,
        }

    def fingerprint(self) -> str:
        return make_fingerprint("CriteoTSV", self.options(), [file_identity(f) for f in self.files()])

    def _check_rows(self, rows: dict[str, int]) -> None:
        empty = [s for s in SPLITS if rows[s] == 0]
        if empty:
            raise DataError(
                f"{self.path}: 0 {'/'.join(empty)} rows ({_rule(self.layout, self.num_days)}; rows {rows}):"
                f" too few lines for data.layout={self.layout} (data.num_days={self.num_days})"
            )

    # --- pass 1 --------------------------------------------------------------------------------

    def _plan(self) -> list[tuple[Path, int, list[tuple[str, int]]]]:
        """Per file: (path, day, [(split, first line of the next split)...]) in line order."""
        files = self.files()
        if self.layout == "kaggle":
            n = count_lines(files[0])
            days = kaggle_day_sizes(n, self.num_days)
            train_end = sum(days[:-1])
            test_end = train_end + (days[-1] + 1) // 2
            return [(files[0], 0, [("train", train_end), ("test", test_end), ("val", n)])]
        plan = [(f, d, [("train", np.iinfo(np.int64).max)]) for d, f in enumerate(files[:-1])]
        n = count_lines(files[-1])
        plan.append((files[-1], len(files) - 1, [("test", (n + 1) // 2), ("val", n)]))
        return plan

    def _encode_item(self, item: tuple[bytes, int], **kw):
        return self.encode_block(*item, **kw)

    def decode_block(self, raw: bytes, line0: int, path: Path, arrow_threads: bool = True):
        """One block of whole lines to (line numbers, label uint8, dense float32 (n, 13), raw ids uint32,
        skipped), the raw ids feature-major, (26, n): each feature's decode and count is then contiguous."""
        block = parse_block_typed(raw, line0, path, arrow_threads) if FAST_INTS else None
        if block is not None:
            label, masks, dense = _typed_label_dense(block.table)
        else:  # the string path: what every block took before the typed one (exact reference)
            block = parse_block(raw, line0, COLUMNS, _TYPES, "\t", path, use_threads=arrow_threads)
            label, masks, dense = _string_label_dense(block.table)
        ids = np.empty((NUM_SPARSE, block.table.num_rows), np.uint32)
        for j, name in enumerate(SPARSE_NAMES):
            ids[j], masks[name] = hex_column(block.table.column(name))
        keep, skipped = handle_bad_rows(block, masks, path, self.on_bad_line, _WHAT)
        lines = block.lines
        label = label.astype(np.uint8)
        if keep is not None:
            lines, label, dense, ids = lines[keep], label[keep], dense[keep], ids[:, keep]
        if self.max_ind_range and self.max_ind_range < (1 << 32):
            ids %= np.uint32(self.max_ind_range)
        return lines, label, dense, ids, skipped

    def encode_block(
        self, raw: bytes, line0: int, path: Path, day: int, bounds: list[tuple[str, int]], arrow_threads: bool = True
    ):
        """Everything pass 1 does to one block that needs no shared state, so that worker threads can
        run it (Arrow and numpy release the GIL): decode, cut into splits, subsample, and count the
        train values. Returns ([(split, label, dense, raw ids, train counts or None)...], skipped)."""
        lines, label, dense, ids, skipped = self.decode_block(raw, line0, path, arrow_threads)
        pieces = []
        start = 0
        for split, end_line in bounds:
            stop = int(np.searchsorted(lines, end_line))
            sl = slice(start, stop)
            lab, den, raw_ids = label[sl], dense[sl], ids[:, sl]
            if split == "train" and self.label0_subsample is not None and len(lab):
                u = uniform_from_lines(lines[sl], day, self.seed)
                keep = (lab == 1) | (u < self.label0_subsample)
                lab, den, raw_ids = lab[keep], den[keep], raw_ids[:, keep]
            counts = [count_sorted(v) for v in raw_ids] if split == "train" else None
            pieces.append((split, lab, den, np.ascontiguousarray(raw_ids.T), counts))  # rows as stored
            start = stop
        return pieces, skipped

    def write(self, out_dir: Path) -> dict:
        writer = SplitWriter(out_dir, NUM_DENSE, NUM_SPARSE, sparse_dtype=np.uint32)
        counters = [SortedCounter(np.uint32) for _ in range(NUM_SPARSE)]
        skipped = 0
        try:
            with worker_pool(self.threads) as pool:
                for path, day, bounds in self._plan():
                    blocks = iter_line_blocks(path, self.block_bytes, progress=self.progress)
                    work = functools.partial(
                        self._encode_item, path=path, day=day, bounds=bounds, arrow_threads=pool is None
                    )
                    # In file order whatever the thread finishing first, so the arrays and the first
                    # error reported are those of a serial run.
                    for pieces, n_skipped in map_ordered(pool, work, blocks):
                        skipped += n_skipped
                        for split, lab, den, spa, counts in pieces:
                            for c, (values, n) in zip(counters, counts or ()):
                                c.add_counts(values, n)
                            writer.append(split, den, spa, lab)
                vocabs = [c.vocabulary(self.min_frequency) for c in counters]
        finally:
            rows, rates = writer.close()
        if sum(rows.values()) == 0:
            raise DataError(f"{self.path}: no valid lines")
        self._check_rows(rows)
        with worker_pool(self.threads) as pool:
            remap_raw_ids(out_dir, vocabs, pool)
        if skipped:
            log.warning("%s: skipped %d bad lines", self.path, skipped)
        return meta_fields(
            dense_names=list(DENSE_NAMES),
            sparse_names=list(SPARSE_NAMES),
            table_sizes=[1 + len(v) for v in vocabs],
            rows=rows,
            source={"kind": "CriteoTSV", "path": str(self.path), **self.options()},
            skipped_lines=skipped,
            label_rate=rates,
        )


def parse_block_typed(raw: bytes, line0: int, path: Path, use_threads: bool = True) -> Block | None:
    """``parse_block`` with label and dense read as int64 by Arrow's CSV reader itself (no string
    columns built and cast afterwards), or None where only the string path gives today's result.

    The reader's int decoder is the one ``pc.cast`` uses (hex "0x1F" included), except that it
    first trims spaces: with no space in the block both accept the same fields with the same values,
    so a typed column equals ``number_column`` of the string column whenever that cast succeeds. When
    it does not (a bad or unusual value: ``number_column`` then falls back to a regex for the whole
    column), the reader raises ArrowInvalid and the block takes the string path, which reproduces
    the fallback and the error message naming the line.
    """
    if b" " in raw:
        return None
    try:
        return parse_block(raw, line0, COLUMNS, _TYPED, "\t", path, use_threads=use_threads)
    except pa.ArrowInvalid:
        return None


def _typed_label_dense(t: pa.Table) -> tuple[np.ndarray, dict, np.ndarray]:
    """(label int64, bad masks by column, dense float32) from int64 label/dense columns."""
    label = _ints(t.column("label"))
    bad_label = t.column("label").is_null().to_numpy(zero_copy_only=False) | ((label != 0) & (label != 1))
    masks: dict = {"label": bad_label}
    dense = np.empty((t.num_rows, NUM_DENSE), np.float32)
    for j, name in enumerate(DENSE_NAMES):
        dense[:, j] = log1p_clamped(_ints(t.column(name)))
        masks[name] = None
    return label, masks, dense


def _ints(col) -> np.ndarray:
    """An int64 column to numpy, null (empty field) -> 0, as ``number_column`` does."""
    return pc.fill_null(col, 0).to_numpy()


def _string_label_dense(t: pa.Table) -> tuple[np.ndarray, dict, np.ndarray]:
    """(label int64, bad masks by column, dense float32) from string label/dense columns."""
    label, bad_label = number_column(t.column("label"))
    label_null = t.column("label").is_null().to_numpy(zero_copy_only=False)
    bad_label = (bad_label if bad_label is not None else False) | label_null | ((label != 0) & (label != 1))
    masks: dict = {"label": bad_label}
    dense = np.empty((t.num_rows, NUM_DENSE), np.float32)
    for j, name in enumerate(DENSE_NAMES):
        v, masks[name] = number_column(t.column(name))
        dense[:, j] = log1p_clamped(v)
    return label, masks, dense


def _rule(layout: str, num_days: int) -> str:
    if layout == "kaggle":
        return f"layout kaggle: {num_days} days by line order, train = the first {num_days - 1}, the last halved"
    return f"layout terabyte: train = day_0..day_{num_days - 2}, day_{num_days - 1} halved into test | val"


def remap_raw_ids(out_dir: Path, vocabs: list[np.ndarray], pool=None) -> None:
    """Pass 2: replace the raw uint32 ids of every split by vocabulary ids, in place, as int32."""
    for split in SPLITS:
        path = Path(out_dir) / f"{split}_sparse.npy"
        with open(path, "r+b") as f:
            _remap_file(f, vocabs, pool)
        retype_npy(path, np.int32)


def _remap_file(f, vocabs: list[np.ndarray], pool) -> None:
    """Remap one ``.npy`` of raw ids ``_REMAP_ROWS`` rows at a time through three reused buffers.

    Plain reads and writes rather than a memory map: every mapped page touched would count in the
    resident memory until the end, which would then grow with the file. Each chunk is transposed
    once, so every feature is looked up as a contiguous array (in the pool's threads, if any)."""
    np.lib.format.read_magic(f)
    (rows, width), _, _ = np.lib.format.read_array_header_1_0(f)
    start = f.tell()
    if rows == 0:
        return
    chunk = min(rows, _REMAP_ROWS)
    buf = np.empty((chunk, width), np.uint32)  # rows as stored: raw ids in, vocabulary ids out
    raw = np.empty((width, chunk), np.uint32)  # the same rows, one feature per row
    ids = np.empty((width, chunk), np.int32)
    for a in range(0, rows, chunk):
        n = min(chunk, rows - a)
        f.seek(start + a * width * 4)
        if f.readinto(memoryview(buf[:n]).cast("B")) != n * width * 4:
            raise DataError(f"{f.name}: truncated while remapping the ids")
        transpose_into(raw[:, :n], buf[:n])

        def lookup(j, n=n):
            remap_sorted(raw[j, :n], vocabs[j].astype(np.uint32, copy=False), out=ids[j, :n])

        list(map_ordered(pool, lookup, range(width)))
        buf[:n] = ids[:, :n].T.view(np.uint32)
        f.seek(start + a * width * 4)
        f.write(memoryview(buf[:n]).cast("B"))
