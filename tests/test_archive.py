"""Compacted torch archives (umec_lightning/archive.py): every loader reads them, tensors as written and 64-byte
aligned, pickles deflated, one short folder, named records dropped; `save_torch(compact=True)` atomic on a full disk."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from umec_lightning.archive import ALIGNMENT, compact_archive
from umec_lightning.io import save_torch

ROOT = Path(__file__).resolve().parents[1]


def _payload() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"name": "x" * 2000, "codes": torch.randint(0, 255, (37, 5), dtype=torch.uint8, generator=gen),
            "scale": torch.rand(37, dtype=torch.float16, generator=gen), "w": torch.randn(13, 7, generator=gen)}


def _data_start(raw: bytes, info: zipfile.ZipInfo) -> int:
    """Where a record's data begins: after its local header's name and extra fields (which may differ from the
    central directory's)."""
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_a_compacted_save_loads_the_same_with_and_without_mmap_and_is_smaller(tmp_path):
    plain, compact = tmp_path / ".a-long-temporary-name-as-an-atomic-write-makes.pt", tmp_path / "compact.pt"
    torch.save(_payload(), plain)
    with open(plain, "rb") as src, open(compact, "wb") as dst:
        compact_archive(src, dst)
    assert _same(torch.load(compact, weights_only=True), _payload())
    assert _same(torch.load(compact, weights_only=True, mmap=True), _payload())
    assert compact.stat().st_size < plain.stat().st_size - 1000  # the pickle's 2 kB string deflates

    raw = compact.read_bytes()
    with zipfile.ZipFile(compact) as z:
        records = z.infolist()
    assert {r.filename.split("/")[0] for r in records} == {"archive"}
    for r in records:
        if r.filename.endswith(".pkl"):
            assert r.compress_type == zipfile.ZIP_DEFLATED, r.filename
        else:
            assert r.compress_type == zipfile.ZIP_STORED, r.filename
            if "/data/" in r.filename:
                assert _data_start(raw, r) % ALIGNMENT == 0, r.filename
            assert not r.extra  # the padding lives in the local header only


def test_a_compacted_torchscript_archive_runs_without_its_dropped_records(tmp_path):
    model = torch.jit.script(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)).eval())
    plain, compact = tmp_path / "m.pt", tmp_path / "compact.pt"
    torch.jit.save(model, str(plain))
    with open(plain, "rb") as src, open(compact, "wb") as dst:
        compact_archive(src, dst, drop=(".debug_pkl",))
    with zipfile.ZipFile(plain) as z:
        assert any(n.endswith(".debug_pkl") for n in z.namelist())  # else the drop below tests nothing
    with zipfile.ZipFile(compact) as z:
        names = z.namelist()
    assert not any(n.endswith(".debug_pkl") for n in names) and any(n.endswith(".py") for n in names)
    x = torch.randn(5, 4)
    assert torch.equal(torch.jit.load(str(compact))(x), model(x))


def test_compacting_into_an_unseekable_stream_still_loads(tmp_path):
    class Stream(io.RawIOBase):  # a pipe, say: write and tell only
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.data += bytes(b)
            return len(b)

        def tell(self):
            return len(self.data)

    plain = tmp_path / "plain.pt"
    torch.save(_payload(), plain)
    stream = Stream()
    with open(plain, "rb") as src:
        compact_archive(src, stream)
    assert _same(torch.load(io.BytesIO(bytes(stream.data)), weights_only=True), _payload())


FULL_DISK = """
import resource, signal, sys, torch
from umec_lightning.io import DiskFullError, save_torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
path = sys.argv[1]
save_torch(path, {"w": torch.zeros(1_000)}, compact=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    save_torch(path, {"w": torch.rand(100_000)}, compact=True)
except DiskFullError as err:
    print(err)
    sys.exit(3)
"""


def test_a_compact_save_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.pt"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    (line,) = proc.stdout.strip().splitlines()
    assert str(path) in line and "needs" in line, line
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(1_000))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_save_torch_compact_round_trips(tmp_path):
    path = save_torch(tmp_path / "m.pt", _payload(), compact=True)
    assert _same(torch.load(path, weights_only=True), _payload())
