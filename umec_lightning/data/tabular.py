"""Any delimited text file (CSV/TSV) described by a small schema, to the cache.

Columns are named by header name or by 0-based index. Dense columns are numbers (empty -> 0),
transformed by ``log1p`` (log(1 + max(x, 0)), the DLRM convention) or left as they are (``none``);
categorical columns are arbitrary strings (empty is a value of its own) mapped to a per-feature
vocabulary built on the train rows (id 0: rare or unseen). Fields are split on the delimiter only:
quoting is not supported. Two passes over the text: counting (train rows), then writing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umec_lightning.data.cache import SplitWriter, VocabCounter, file_identity, make_fingerprint, meta_fields
from umec_lightning.data.core import SPLITS, DataError
from umec_lightning.data.criteo import resolve_path
from umec_lightning.data.text import (
    DEFAULT_BLOCK_BYTES,
    check_readable,
    count_lines,
    handle_bad_rows,
    iter_line_blocks,
    log1p_clamped,
    number_column,
    parse_block,
)

log = logging.getLogger(__name__)


class TabularCSV:
    """Source for a CSV/TSV described in config.

    ``path``: one file, cut by line order into train/val/test by the fractions ``split``, or a
    mapping ``{train: ..., val: ..., test: ...}`` of separate files (val/test may be omitted).
    ``label``, ``dense``, ``categorical``: column names (with ``header: true`` or ``columns``) or
    0-based indices.
    """

    def __init__(
        self,
        path,
        label,
        dense=(),
        categorical=(),
        delimiter: str = ",",
        header: bool = True,
        columns: list[str] | None = None,
        split=(0.8, 0.1, 0.1),
        dense_transform: str = "log1p",
        min_frequency: int = 1,
        on_bad_line: str = "error",
        name: str = "tabular",
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        progress: bool = True,
    ):
        if isinstance(path, (str, Path)):
            self.paths = {"all": resolve_path(path)}
        else:
            unknown = set(path) - set(SPLITS)
            if unknown or "train" not in path:
                raise DataError(
                    f"path: expected a file or a mapping with train[/val/test], got keys {sorted(path)}"
                )
            self.paths = {s: resolve_path(p) for s, p in path.items()}
        split = [float(x) for x in split]
        if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
            raise DataError(f"split: expected three fractions train/val/test summing to 1, got {split}")
        if dense_transform not in ("log1p", "none"):
            raise DataError(f"dense_transform: expected 'log1p' or 'none', got {dense_transform!r}")
        if on_bad_line not in ("error", "skip"):
            raise DataError(f"on_bad_line: expected 'error' or 'skip', got {on_bad_line!r}")
        if len(delimiter) != 1:
            raise DataError(f"delimiter: expected one character, got {delimiter!r}")
        if not categorical and not dense:
            raise DataError("dense / categorical: at least one feature column is needed")
        self.label, self.dense, self.categorical = label, list(dense), list(categorical)
        self.delimiter, self.header = delimiter, bool(header)
        self.columns = list(columns) if columns is not None else None
        self.split = split
        self.dense_transform = dense_transform
        self.min_frequency = int(min_frequency)
        self.on_bad_line = on_bad_line
        self.name = name
        self.block_bytes = int(block_bytes)
        self.progress = progress

    def options(self) -> dict:
        return {
            "label": self.label,
            "dense": self.dense,
            "categorical": self.categorical,
            "delimiter": self.delimiter,
            "header": self.header,
            "columns": self.columns,
            "split": self.split if "all" in self.paths else None,
            "dense_transform": self.dense_transform,
            "min_frequency": self.min_frequency,
            "on_bad_line": self.on_bad_line,
        }

    def fingerprint(self) -> str:
        files = {s: file_identity(check_readable(p)) for s, p in self.paths.items()}
        return make_fingerprint("TabularCSV", self.options(), [files])

    # --- schema --------------------------------------------------------------------------------

    def _column_names(self) -> list[str]:
        first = next(iter(self.paths.values()))
        check_readable(first)
        with open(first, "rb") as f:
            line = f.readline().rstrip(b"\r\n").decode("utf-8", "replace")
        n = len(line.split(self.delimiter))
        if self.header:
            names = line.split(self.delimiter)
            if len(set(names)) != len(names):
                raise DataError(f"{first}:1: duplicate column names in header")
            return names
        if self.columns is not None:
            if len(self.columns) != n:
                raise DataError(f"columns: {len(self.columns)} names but {first}:1 has {n} fields")
            return list(self.columns)
        return [f"col{i}" for i in range(n)]

    def _resolve(self, names: list[str], ref, key: str) -> str:
        if isinstance(ref, int) and not isinstance(ref, bool):
            if not 0 <= ref < len(names):
                raise DataError(f"{key}: column index {ref} out of range (file has {len(names)} columns)")
            return names[ref]
        if ref not in names:
            raise DataError(f"{key}: no column named {ref!r} (columns: {names})")
        return ref

    def _schema(self) -> tuple[list[str], str, list[str], list[str]]:
        names = self._column_names()
        label = self._resolve(names, self.label, "label")
        dense = [self._resolve(names, c, "dense") for c in self.dense]
        cat = [self._resolve(names, c, "categorical") for c in self.categorical]
        return names, label, dense, cat

    # --- passes --------------------------------------------------------------------------------

    def _plan(self) -> list[tuple[Path, list[tuple[str, int]]]]:
        """Per file: [(split, first 0-based line of the next split)...] in line order."""
        skip = 1 if self.header else 0
        if "all" in self.paths:
            path = check_readable(self.paths["all"])
            n = count_lines(path) - skip
            if n <= 0:
                raise DataError(f"{path}: no data lines")
            train_end = int(n * self.split[0])
            val_end = train_end + int(n * self.split[1])
            return [(path, [("train", skip + train_end), ("val", skip + val_end), ("test", skip + n)])]
        big = np.iinfo(np.int64).max
        return [(check_readable(p), [(s, big)]) for s, p in self.paths.items()]

    def _parse(self, path: Path, schema, want_values: bool):
        names, label_col, dense_cols, cat_cols = schema
        types = dict.fromkeys(names, pa.string())
        what = {
            label_col: "label must be 0 or 1",
            **dict.fromkeys(dense_cols, "dense value must be a number"),
        }
        skip = 1 if self.header else 0
        for raw, line0 in iter_line_blocks(path, self.block_bytes, skip_lines=skip, progress=self.progress):
            block = parse_block(raw, line0, names, types, self.delimiter, path)
            t = block.table
            label, bad = number_column(t.column(label_col), "float")
            null = t.column(label_col).is_null().to_numpy(zero_copy_only=False)
            masks = {label_col: (bad if bad is not None else False) | null | ((label != 0) & (label != 1))}
            dense = np.empty((t.num_rows, len(dense_cols)), np.float32)
            for j, c in enumerate(dense_cols):
                v, masks[c] = number_column(t.column(c), "float")
                dense[:, j] = log1p_clamped(v) if self.dense_transform == "log1p" else v
            keep, skipped = handle_bad_rows(block, masks, path, self.on_bad_line, what)
            lines = block.lines
            if keep is not None:
                t, lines, label, dense = t.filter(pa.array(keep)), lines[keep], label[keep], dense[keep]
            cats = [pc.fill_null(t.column(c).combine_chunks(), "") for c in cat_cols]
            yield lines, label.astype(np.uint8), dense, cats, skipped

    def write(self, out_dir: Path) -> dict:
        schema = self._schema()
        _, _, dense_cols, cat_cols = schema
        plan = self._plan()
        counters = [VocabCounter() for _ in cat_cols]
        for path, bounds in plan:  # pass 1: vocabulary counts on the train rows
            for lines, _, _, cats, _ in self._parse(path, schema, False):
                start = 0
                for split, end in bounds:
                    stop = int(np.searchsorted(lines, end))
                    if split == "train":
                        for c, col in zip(counters, cats):
                            c.add(col.slice(start, stop - start))
                    start = stop
        vocabs = [c.vocabulary(self.min_frequency).cast(pa.string()) for c in counters]
        writer = SplitWriter(out_dir, len(dense_cols), len(cat_cols))
        skipped = 0
        try:
            for path, bounds in plan:  # pass 2: write
                for lines, label, dense, cats, n_skipped in self._parse(path, schema, True):
                    skipped += n_skipped
                    sparse = np.empty((len(label), len(cats)), np.int32)
                    for j, (col, vocab) in enumerate(zip(cats, vocabs)):
                        idx = pc.index_in(col, value_set=vocab)
                        sparse[:, j] = pc.fill_null(idx, -1).to_numpy(zero_copy_only=False) + 1
                    start = 0
                    for split, end in bounds:
                        stop = int(np.searchsorted(lines, end))
                        writer.append(split, dense[start:stop], sparse[start:stop], label[start:stop])
                        start = stop
        finally:
            rows, rates = writer.close()
        if rows["train"] == 0:
            raise DataError(f"{plan[0][0]}: no valid training rows")
        if skipped:
            log.warning("%s: skipped %d bad lines", self.name, skipped)
        return meta_fields(
            dense_names=dense_cols,
            sparse_names=cat_cols,
            table_sizes=[1 + len(v) for v in vocabs],
            rows=rows,
            source={
                "kind": "TabularCSV",
                "paths": {s: str(p) for s, p in self.paths.items()},
                **self.options(),
            },
            skipped_lines=skipped,
            label_rate=rates,
        )
