"""Torch's zip archives (torch.save, torch.jit.save) rewritten to hold only what a loader reads, compactly.

torch writes every record stored (uncompressed), each on a 64-byte boundary, under a folder named after the file it
was first written to (a temporary `.compressed.torchscript.pt.<32 hex>` for an atomic write, repeated in two headers
of every record). For a compressed model those bytes are not small beside its tensors: a 26-table factored DLRM's
TorchScript file held 69 kB beyond its 356 kB of tensors, its torchrec file 60 kB. `compact_archive` copies an
archive with

- every record under `archive/` (the name `torch.save` gives an in-memory archive; loaders take the folder from the
  first record, so any one name serves);
- pickles and code (`*.pkl`, `*.py`) deflated: `torch.load`, `torch.jit.load` and `torch.load(mmap=True)` read
  deflated records (tests/test_archive.py);
- every other record (tensor storages and torch's small markers) stored as written, a storage still starting on a
  64-byte boundary (`ALIGNMENT`, as torch writes it, for `mmap=True`), the padding in its local header only;
- the records named by `drop` left out (TorchScript's `.debug_pkl` source ranges, which only error messages read).

The same archive in half the own bytes: 34 of TorchScript's 69 kB, 26 of torchrec's 60, 13 of compressed.pt's 27.
"""

from __future__ import annotations

import shutil
import struct
import zipfile
from typing import BinaryIO

ARCHIVE = "archive"
ALIGNMENT = 64  # torch's record alignment (its `.storage_alignment`)
_PAD_FIELD = 0xD935  # the extra-field id zip aligners use for padding: readers skip an id they do not know
_DEFLATED = (".pkl", ".py")


def compact_archive(src: BinaryIO, dst: BinaryIO, drop: tuple[str, ...] = ()) -> None:
    """Copy the torch zip archive read from `src` into `dst` compactly (module docstring); records whose names end
    in one of `drop` are left out. `dst` is written from its current position; seekable or not (a zip reader finds
    the sizes of a non-seekable copy in its central directory)."""
    with zipfile.ZipFile(src) as source, zipfile.ZipFile(dst, "w") as out:
        for info in source.infolist():
            if info.filename.endswith(drop):
                continue
            name = f"{ARCHIVE}/{info.filename.split('/', 1)[-1]}"
            record = zipfile.ZipInfo(name, info.date_time)
            record.file_size = info.file_size  # zipfile decides zip64 headers from it before the data
            zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule (ZipFile._open_to_write)
            deflate = name.endswith(_DEFLATED)
            if deflate:
                record.compress_type = zipfile.ZIP_DEFLATED
            else:
                record.extra = _padding(out.fp.tell(), record, zip64)
            with source.open(info) as reader, out.open(record, "w", force_zip64=zip64) as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)
            record.extra = b""  # the padding places the data; the central directory needs none


def _padding(offset: int, record: zipfile.ZipInfo, zip64: bool) -> bytes:
    """An extra field that makes `record`'s data, its local header written at `offset`, start on ALIGNMENT."""
    # A local header: 30 bytes, the name, the extra fields (zipfile adds a 20-byte zip64 one), then the data.
    header = 30 + len(record.filename.encode()) + (20 if zip64 else 0) + 4  # + the padding field's id and length
    pad = -(offset + header) % ALIGNMENT
    return struct.pack("<HH", _PAD_FIELD, pad) + b"\0" * pad
