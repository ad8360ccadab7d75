"""Any delimited text file (CSV/TSV, plain or gzip) described by a small schema, to the cache.

Columns are named by header name or by 0-based index. Dense columns are numbers, transformed by
``log1p`` (log(1 + max(x, 0)), the DLRM convention) or left as they are (``none``); a missing dense
value is 0. Categorical columns are arbitrary strings mapped to a per-feature vocabulary built on the
train rows (id 0: rare or unseen); a missing categorical value is the empty string, a value of its own.

Missing means the empty field, plus the tokens the config lists in ``null_values`` (default none):
"NA" is a country code, not a gap, unless the config says so. A dense field that is neither missing
nor a finite number ("NA" not in ``null_values``, "abc", "nan", "inf") is a bad line (``on_bad_line``).
Fields are split on the delimiter only: quoting is not supported. Two passes over the text: counting
(train rows), then writing.

Splits. ``path`` is one file cut by line order into train/val/test by the fractions ``split``, or a
mapping ``{train: ..., val: ..., test: ...}`` of files. Without ``val`` the validation rows are carved
from the train file: the last ``val_fraction`` of its lines (``val_split: order``) or each line with
probability ``val_fraction``, from a seeded hash of its line number (``val_split: shuffle``; the
count is then val_fraction * n give or take sqrt(n)). Every split must end up with rows: a split with
none is a DataError naming the config key, raised while the cache is built (before any training).

Headers. ``header`` is one bool for every file or a mapping per file (``{train: true, test: false}``).
Column names come from the train file (the single file): its header line, else ``columns``, else
``col0, col1, ...``. Every other file must agree: a file said to have a header must start with the same
header line, and a file said to have none must not start with it (nor with the label column's name).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umec_lightning.data.cache import SplitWriter, VocabCounter, file_identity, make_fingerprint, meta_fields
from umec_lightning.data.core import SPLITS, DataError
from umec_lightning.data.criteo import resolve_path, uniform_from_lines
from umec_lightning.data.text import (
    DEFAULT_BLOCK_BYTES,
    check_readable,
    count_lines,
    first_line,
    handle_bad_rows,
    iter_line_blocks,
    log1p_clamped,
    number_column,
    parse_block,
)

log = logging.getLogger(__name__)

_BIG = int(np.iinfo(np.int64).max)
VAL_SPLITS = ("order", "shuffle")


@dataclass
class FilePlan:
    """How one file's lines go to the splits.

    ``bounds``: [(split, first 0-based line of the next split), ...] in line order. ``shuffle``: when
    set, (fraction, seed): each train line (after ``bounds``) moves to val with that probability.
    """

    key: str
    path: Path
    skip: int
    bounds: list[tuple[str, int]]
    shuffle: tuple[float, int] | None = None


class TabularCSV:
    """Source for a CSV/TSV described in config (see the module docstring for the rules).

    ``label``, ``dense``, ``categorical``: column names (with a header or ``columns``) or 0-based
    indices. ``null_values``: tokens read as missing besides the empty field.
    """

    def __init__(
        self,
        path,
        label,
        dense=(),
        categorical=(),
        delimiter: str = ",",
        header: bool | Mapping = True,
        columns: list[str] | None = None,
        split=(0.8, 0.1, 0.1),
        dense_transform: str = "log1p",
        min_frequency: int = 1,
        on_bad_line: str = "error",
        name: str = "tabular",
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        progress: bool = True,
        val_fraction: float = 0.1,
        val_split: str = "order",
        seed: int = 0,
        null_values=(),
    ):
        self.paths = _split_paths(path)
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
        if val_split not in VAL_SPLITS:
            raise DataError(f"data.val_split: expected 'order' or 'shuffle', got {val_split!r}")
        self.carve = "all" not in self.paths and "val" not in self.paths
        try:
            val_fraction = float(val_fraction)
        except (TypeError, ValueError):
            raise DataError(f"data.val_fraction: expected a number, got {val_fraction!r}") from None
        if self.carve and not 0.0 < val_fraction < 1.0:
            raise DataError(
                f"data.val_fraction: expected a fraction in (0, 1) of the train file to carve as validation"
                f" (data.path has no val file), got {val_fraction!r}"
            )
        self.label, self.dense, self.categorical = label, list(dense), list(categorical)
        self.delimiter = delimiter
        self.header = _per_file_header(header, self.paths)
        self.columns = list(columns) if columns is not None else None
        self.split = split
        self.val_fraction, self.val_split, self.seed = val_fraction, val_split, int(seed)
        self.null_values = _null_values(null_values)
        self.dense_transform = dense_transform
        self.min_frequency = int(min_frequency)
        self.on_bad_line = on_bad_line
        self.name = name
        self.block_bytes = int(block_bytes)
        self.progress = progress

    def options(self) -> dict:
        """Everything that changes the cached arrays (part of the fingerprint)."""
        carve = None
        if self.carve:
            carve = {"val_fraction": self.val_fraction, "val_split": self.val_split}
            if self.val_split == "shuffle":
                carve["seed"] = self.seed
        return {
            "label": self.label,
            "dense": self.dense,
            "categorical": self.categorical,
            "delimiter": self.delimiter,
            "header": self.header,
            "columns": self.columns,
            "split": self.split if "all" in self.paths else None,
            "carve_val": carve,
            "null_values": sorted(self.null_values),
            "dense_transform": self.dense_transform,
            "min_frequency": self.min_frequency,
            "on_bad_line": self.on_bad_line,
        }

    def fingerprint(self) -> str:
        files = {s: file_identity(check_readable(p)) for s, p in self.paths.items()}
        return make_fingerprint("TabularCSV", self.options(), [files])

    def source_files(self) -> list[Path]:
        """The files the cache is built from: their content is digested and checked (cache.py, integrity)."""
        return [check_readable(p) for p in self.paths.values()]

    # --- schema --------------------------------------------------------------------------------

    def _schema_key(self) -> str:
        return "all" if "all" in self.paths else "train"

    def _column_names(self) -> tuple[list[str], bool]:
        """(column names, whether they are real names: from a header line or ``columns``)."""
        key = self._schema_key()
        path = check_readable(self.paths[key])
        fields = first_line(path).split(self.delimiter)
        if self.header[key]:
            if len(set(fields)) != len(fields):
                raise DataError(f"{path}:1: duplicate column names in header {_short(fields)}{_data_hint(fields)}")
            return fields, True
        if self.columns is not None:
            if len(self.columns) != len(fields):
                raise DataError(f"columns: {len(self.columns)} names but {path}:1 has {len(fields)} fields")
            if fields == self.columns:
                raise DataError(
                    f"{path}:1: this line is the column names {fields[:4]}..., a header line, but"
                    f" data.header is false for this file ({key}); set data.header for it to true"
                )
            return list(self.columns), True
        return [f"col{i}" for i in range(len(fields))], False

    def _resolve(self, names: list[str], ref, key: str) -> str:
        if isinstance(ref, int) and not isinstance(ref, bool):
            if not 0 <= ref < len(names):
                raise DataError(f"{key}: column index {ref} out of range (file has {len(names)} columns)")
            return names[ref]
        if ref not in names:
            hint = _data_hint(names) if self.header[self._schema_key()] else ""
            raise DataError(f"{key}: no column named {ref!r} (columns: {names}){hint}")
        return ref

    def _check_headers(self, names: list[str], real_names: bool, label_col: str) -> None:
        """Refuse a file whose line 1 contradicts its ``header`` setting (see the module docstring)."""
        schema_key = self._schema_key()
        schema_path = self.paths[schema_key]
        for key, path in self.paths.items():
            if key == schema_key:
                continue
            fields = first_line(check_readable(path)).split(self.delimiter)
            if self.header[key]:
                if fields == names or (not real_names and len(fields) == len(names)):
                    continue
                missing = "" if label_col in fields or not real_names else f", no column {label_col!r}"
                raise DataError(
                    f"{path}:1: data.header says this file ({key}) starts with a header line, but line 1 is"
                    f" not the header of {schema_path} (expected {_short(names)}, got {_short(fields)}"
                    f"{missing}); if it has no header line, set data.header.{key}: false"
                )
            elif real_names and (fields == names or _field(fields, names.index(label_col)) == label_col):
                raise DataError(
                    f"{path}:1: line 1 looks like a header ({_short(fields)}) but data.header is false for"
                    f" this file ({key}); set data.header.{key}: true (or delete the line)"
                )

    def _schema(self) -> tuple[list[str], str, list[str], list[str]]:
        names, real_names = self._column_names()
        label = self._resolve(names, self.label, "label")
        dense = [self._resolve(names, c, "dense") for c in self.dense]
        cat = [self._resolve(names, c, "categorical") for c in self.categorical]
        self._check_headers(names, real_names, label)
        return names, label, dense, cat

    # --- passes --------------------------------------------------------------------------------

    def _plan(self) -> list[FilePlan]:
        if "all" in self.paths:
            path = check_readable(self.paths["all"])
            skip = int(self.header["all"])
            n = count_lines(path) - skip
            if n <= 0:
                raise DataError(f"{path}: no data lines")
            train_end = int(n * self.split[0])
            val_end = train_end + int(n * self.split[1])
            bounds = [("train", skip + train_end), ("val", skip + val_end), ("test", skip + n)]
            return [FilePlan("all", path, skip, bounds)]
        plans = []
        for key, p in self.paths.items():
            path, skip = check_readable(p), int(self.header[key])
            if key == "train" and self.carve and self.val_split == "order":
                n = max(count_lines(path) - skip, 0)
                n_val = int(n * self.val_fraction + 0.5)
                plans.append(FilePlan(key, path, skip, [("train", skip + n - n_val), ("val", _BIG)]))
            elif key == "train" and self.carve:
                plans.append(FilePlan(key, path, skip, [("train", _BIG)], (self.val_fraction, self.seed)))
            else:
                plans.append(FilePlan(key, path, skip, [(key, _BIG)]))
        return plans

    def _parse(self, plan: FilePlan, schema):
        """Yield (lines, label uint8, dense float32, categorical string arrays, skipped) per block."""
        names, label_col, dense_cols, cat_cols = schema
        types = dict.fromkeys(names, pa.string())
        what = {
            label_col: "label must be 0 or 1",
            **dict.fromkeys(
                dense_cols, "dense value must be a finite number (tokens for missing: data.null_values)"
            ),
        }
        path = plan.path
        blocks = iter_line_blocks(path, self.block_bytes, skip_lines=plan.skip, progress=self.progress)
        for raw, line0 in blocks:
            block = parse_block(raw, line0, names, types, self.delimiter, path, null_values=self.null_values)
            t = block.table
            label, bad = number_column(t.column(label_col), "float")
            null = t.column(label_col).is_null().to_numpy(zero_copy_only=False)
            masks = {label_col: (bad if bad is not None else False) | null | ((label != 0) & (label != 1))}
            dense = np.empty((t.num_rows, len(dense_cols)), np.float32)
            for j, c in enumerate(dense_cols):
                v, bad = number_column(t.column(c), "float")
                masks[c] = (bad if bad is not None else False) | ~np.isfinite(v)
                dense[:, j] = log1p_clamped(v) if self.dense_transform == "log1p" else v
            keep, skipped = handle_bad_rows(block, masks, path, self.on_bad_line, what)
            lines = block.lines
            if keep is not None:
                t, lines, label, dense = t.filter(pa.array(keep)), lines[keep], label[keep], dense[keep]
            cats = [pc.fill_null(t.column(c).combine_chunks(), "") for c in cat_cols]
            yield lines, label.astype(np.uint8), dense, cats, skipped

    def _pieces(self, plan: FilePlan, schema):
        """Yield (split, label, dense, cats, skipped) pieces of one file, in line order per split."""
        for lines, label, dense, cats, skipped in self._parse(plan, schema):
            start = 0
            for split, end in plan.bounds:
                stop = int(np.searchsorted(lines, end))
                lab, den = label[start:stop], dense[start:stop]
                cat = [c.slice(start, stop - start) for c in cats]
                if split == "train" and plan.shuffle is not None:
                    fraction, seed = plan.shuffle
                    to_val = uniform_from_lines(lines[start:stop], 0, seed) < fraction
                    yield "val", lab[to_val], den[to_val], [c.filter(pa.array(to_val)) for c in cat], 0
                    keep = ~to_val
                    lab, den, cat = lab[keep], den[keep], [c.filter(pa.array(keep)) for c in cat]
                yield split, lab, den, cat, skipped
                skipped = 0
                start = stop

    def write(self, out_dir: Path) -> dict:
        schema = self._schema()
        _, _, dense_cols, cat_cols = schema
        plans = self._plan()
        counters = [VocabCounter() for _ in cat_cols]
        for plan in plans:  # pass 1: vocabulary counts on the train rows
            if not any(split == "train" for split, _ in plan.bounds):
                continue
            for split, _, _, cats, _ in self._pieces(plan, schema):
                if split == "train":
                    for c, col in zip(counters, cats):
                        c.add(col)
        vocabs = [c.vocabulary(self.min_frequency).cast(pa.string()) for c in counters]
        writer = SplitWriter(out_dir, len(dense_cols), len(cat_cols))
        skipped = 0
        try:
            for plan in plans:  # pass 2: write
                for split, label, dense, cats, n_skipped in self._pieces(plan, schema):
                    skipped += n_skipped
                    sparse = np.empty((len(label), len(cats)), np.int32)
                    for j, (col, vocab) in enumerate(zip(cats, vocabs)):
                        idx = pc.index_in(col, value_set=vocab)
                        sparse[:, j] = pc.fill_null(idx, -1).to_numpy(zero_copy_only=False) + 1
                    writer.append(split, dense, sparse, label)
        finally:
            rows, rates = writer.close()
        self._check_rows(rows)
        if self.carve:
            log.warning(
                "%s: no validation file (data.path.val): carved %d of the %d rows of %s as validation"
                " (data.val_fraction=%g, data.val_split=%s)",
                self.name, rows["val"], rows["train"] + rows["val"], self.paths["train"],
                self.val_fraction, self.val_split,
            )
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

    def _check_rows(self, rows: dict[str, int]) -> None:
        """A split without rows is an error naming the key that decides it."""
        for split in SPLITS:
            if rows[split] == 0:
                raise DataError(self._empty_split_message(split, rows))

    def _empty_split_message(self, split: str, rows: dict[str, int]) -> str:
        if "all" in self.paths:
            return (
                f"{self.paths['all']}: 0 {split} rows of {sum(rows.values())} valid rows with"
                f" data.split={self.split}; give {split} a larger fraction (or use more lines)"
            )
        carving = f"data.val_fraction={self.val_fraction} (data.val_split={self.val_split})"
        if split == "train" and self.carve:
            return (
                f"{self.paths['train']}: no training rows left after {carving} carved {rows['val']} rows for"
                f" validation (data.path.train); lower data.val_fraction or give data.path.val"
            )
        if split in self.paths:
            return f"{self.paths[split]}: no valid {split} rows (data.path.{split})"
        if split == "val":
            return (
                f"{carving} carved 0 validation rows from {self.paths['train']} ({rows['train']} rows);"
                f" raise data.val_fraction or give data.path.val"
            )
        return (
            f"data.path: no {split} file (data.path.{split}); every split needs rows (train to fit, val to"
            f" select checkpoints, test for the final report)"
        )


def _split_paths(path) -> dict[str, Path]:
    if isinstance(path, (str, Path)):
        return {"all": resolve_path(path)}
    if not isinstance(path, Mapping):
        raise DataError(f"path: expected a file or a mapping with train[/val/test], got {path!r}")
    unknown = set(path) - set(SPLITS)
    if unknown or "train" not in path:
        raise DataError(f"path: expected a file or a mapping with train[/val/test], got keys {sorted(path)}")
    return {str(s): resolve_path(p) for s, p in path.items()}


def _per_file_header(header, paths: dict[str, Path]) -> dict[str, bool]:
    """``header`` as one bool per file key (``all`` or the split names of ``path``)."""
    if isinstance(header, bool):
        return dict.fromkeys(paths, header)
    if not isinstance(header, Mapping):
        raise DataError(f"data.header: expected true, false or a mapping like {{train: true, test: false}}"
                        f", got {header!r}")
    if "all" in paths:
        raise DataError("data.header: a per-file mapping needs data.path to be a mapping of files too")
    header = {str(k): v for k, v in header.items()}
    unknown, missing = set(header) - set(paths), set(paths) - set(header)
    if unknown or missing:
        raise DataError(
            f"data.header: expected one entry per file of data.path ({sorted(paths)}), got {sorted(header)}"
        )
    bad = {k: v for k, v in header.items() if not isinstance(v, bool)}
    if bad:
        raise DataError(f"data.header: expected true or false per file, got {bad}")
    return {k: header[k] for k in paths}


def _null_values(tokens) -> tuple[str, ...]:
    if isinstance(tokens, str):
        raise DataError(f"data.null_values: expected a list of tokens, got the string {tokens!r}")
    tokens = [str(t) for t in tokens]
    return ("", *dict.fromkeys(t for t in tokens if t != ""))


def _field(fields: list[str], i: int) -> str | None:
    return fields[i] if i < len(fields) else None


def _data_hint(header: list[str]) -> str:
    """A hint when a "header" line holds numbers: the file probably has no header line."""
    if any(_is_number(f) for f in header):
        return "; line 1 holds numbers, so it looks like data: does the file have a header (data.header)?"
    return ""


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _short(fields: list[str], n: int = 4) -> str:
    more = f", ... ({len(fields)} fields)" if len(fields) > n else ""
    return "[" + ", ".join(repr(f) for f in fields[:n]) + more + "]"
