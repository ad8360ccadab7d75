"""What a run writes beside compressed.pt when `export.<format>` is on, and what it reports of the files.

    EXPORTS          {format: (file name, writer)}: torchscript, onnx, torchrec (`compression.export`)
    export_report    write the asked formats (each checked against the eager model first), their bytes on disk, and
                     the latency of the files read back against the dense model's TorchScript export
    files_report     the bytes of every file the run serves (compressed.pt and the exports) over the dense model's,
                     and `budget.bytes` decided on the largest of them
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from .compression.export import export_onnx, export_torchrec, export_torchscript
from .latency import Loaded, compare_latency

log = logging.getLogger(__name__)

# `export.<format>: true` writes the compressed model as served in that format, next to compressed.pt.
EXPORTS = {"torchscript": ("compressed.torchscript.pt", export_torchscript), "onnx": ("compressed.onnx", export_onnx),
           "torchrec": ("compressed.torchrec.pt", export_torchrec)}


def export_report(cfg: DictConfig, run_dir: Path, model, dense=None) -> dict:
    """The compressed model in the formats `export` asks for (`compression.export`: batch norm folded, no dropout,
    each file checked against the eager model before it is written), their bytes, and the latency of the files read
    back against the dense model's TorchScript export (`export_latency_ms`). A format that fails is named in
    `export_errors` with its error, and the run still writes its summary: an export does not lose the training."""
    wanted = [fmt for fmt in EXPORTS if (cfg.get("export") or {}).get(fmt)]
    if not wanted or not model.holds_tables:
        return {}
    exports, errors = {}, {}
    model.eval()  # as served; the run has no use for training mode after this
    for fmt in wanted:
        name, write = EXPORTS[fmt]
        try:
            with quiet_loggers(*EXPORTER_LOGGERS):
                exports[fmt] = str(write(model, run_dir / name, atol=1e-5))
        except Exception as err:  # noqa: BLE001 - a missing `onnx`, a failed check: reported, the run goes on
            errors[fmt] = f"{type(err).__name__}: {err}"
            log.error("export.%s failed: %s", fmt, errors[fmt])
    sizes = {fmt: file_bytes(Path(path)) for fmt, path in exports.items()}
    out = {"exports": exports, "export_bytes": sizes} if exports else {"exports": exports}
    timed = {fmt: path for fmt, path in exports.items() if fmt in LOADERS}
    if timed and dense is not None and dense.holds_tables:
        out["export_latency_ms"] = export_latency(cfg, dense, model.structure, timed)
    return out | ({"export_errors": errors} if errors else {})


# How a written file is read back to be timed (ONNX runs in onnxruntime, outside torch: not timed here).
LOADERS = {"torchscript": lambda path: torch.jit.load(path),
           "torchrec": lambda path: torch.load(path, weights_only=False)}


def export_latency(cfg: DictConfig, dense, structure, files: dict[str, str]) -> dict:
    """The exported files read back, timed interleaved with the dense model's TorchScript export (written to a
    temporary folder, batch norm folded) at `latency.threads`: medians and per-round ratios to the dense export."""
    gate, dense.dim_gate = dense.dim_gate, None  # the dense model as served, without the training gate
    try:
        with tempfile.TemporaryDirectory() as tmp, quiet_loggers(*EXPORTER_LOGGERS):
            dense_file = export_torchscript(dense.eval(), Path(tmp) / "dense.pt", atol=1e-5)
            models = {"dense": Loaded(torch.jit.load(str(dense_file)), dense.structure)}
            models.update({fmt: Loaded(LOADERS[fmt](path), structure) for fmt, path in files.items()})
            timing = compare_latency(models, cfg.latency.batches, cfg.latency.repeats,
                                     threads=cfg.latency.get("threads", 1), seed=cfg.seed)
    finally:
        dense.dim_gate = gate
    return {"ms": timing["ms"], "ratio": timing["ratio"], "reference": "dense (its TorchScript export)",
            "threads": timing["threads"], "repeats": timing["repeats"], "interleaved": True}


def files_report(run_dir: Path, summary: dict) -> dict:
    """`file_bytes` {"model": compressed.pt, <format>: its export} on disk, `file_bytes_ratio` over the fp32 dense
    model's stored bytes, and under `budget.bytes` whether the largest file is within it (`budget_met_files`);
    `budget_met` then needs it too (the stored tensors alone: `bytes_ratio`). What a server loads is a file."""
    files = {"model": file_bytes(run_dir / "compressed.pt"), **summary.get("export_bytes", {})}
    dense = summary["dense_stored_bytes"]["total"]
    out = {"file_bytes": files, "file_bytes_ratio": {fmt: size / dense for fmt, size in files.items()}}
    budget = (summary.get("budget") or {}).get("bytes")
    if budget is not None:
        out["budget_met_files"] = max(out["file_bytes_ratio"].values()) <= budget + 1e-12
        out["budget_met"] = bool(summary.get("budget_met")) and out["budget_met_files"]
    return out


def file_bytes(path: Path) -> int:
    """Bytes on disk of an exported model: its file and the side files it names (`<name>.data`, ONNX's external
    weights), i.e. every file in its folder whose name starts with its own."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file() and p.name.startswith(path.name))


# The ONNX exporter's passes log every rewrite at INFO (a hundred lines per model) and warn about torchvision ops.
EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


@contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR):
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)
