"""`compressed.pt`: a compressed DLRM as data, reloadable without the training config.

The file is a plain `torch.save` dict that `torch.load(weights_only=True)` accepts (only str, int, float,
bool, None, lists, dicts and tensors):

  format       "umec-compressed/1"
  structure    DLRMStructure.to_dict() of the model (what to build; `table_ranks` rebuilds projected
               tables with their projections, `projection_bias` their biases, `layer_ranks` and
               `factor_activation` the factored Linear layers; a file written before a key existed loads
               with its default: unprojected, bias-free, unfactored)
  kept         Kept.to_dict(): what was kept, in the dense model's numbering (for reports and replay;
               `ranks` likewise optional)
  state_dict   the model's weights
  sparse_grad  whether the tables give sparse gradients (for fine-tuning the loaded model)
  extra        caller's plain metadata (metrics, data names, ...)
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .compression.kept import Kept
from .io import save_torch
from .models.dlrm import DLRM
from .models.family import family_of_structure

FORMAT = "umec-compressed/1"

__all__ = ["FORMAT", "Compressed", "load_compressed", "read_compressed", "save_compressed"]


@dataclass
class Compressed:
    """What a compressed file holds, rebuilt."""

    model: DLRM
    kept: Kept
    extra: dict


def _plain(value, where: str):
    """`value` as types `torch.load(weights_only=True)` accepts; TypeError naming the offending key."""
    if value is None or isinstance(value, (str, bool, torch.Tensor)):
        return value
    if isinstance(value, numbers.Integral):  # also NumPy integers
        return int(value)
    if isinstance(value, numbers.Real):  # also NumPy floats
        return float(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be a str or int to load with weights_only=True")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{where}: {type(value).__name__} cannot be stored in a compressed file (plain types and tensors only)"
    )


def save_compressed(path: str | os.PathLike, model: DLRM, kept: Kept, extra: dict | None = None) -> Path:
    """Write `model` (normally `extract(...)`'s result) with its structure and `kept`, atomically."""
    payload = {
        "format": FORMAT,
        "structure": _plain(model.structure.to_dict(), "structure"),
        "kept": _plain(kept.to_dict(), "kept"),
        "state_dict": {k: v.detach() for k, v in model.state_dict().items()},
        "sparse_grad": model.sparse_grad,
        "extra": _plain(dict(extra or {}), "extra"),
    }
    storage = stored_widths(model)
    if storage is not None:  # row-wise quantized tables / fp16 Linears: what `read_compressed` rebuilds them as
        payload["quant"] = storage
    # Atomic (temporary file, fsync, rename); a full disk is one line naming the file and the bytes it needs.
    # Compact (`archive.compact_archive`): the bytes a bytes budget is met on are the file's, not only its tensors'.
    return save_torch(Path(path), payload, compact=True)


def stored_widths(model) -> dict | None:
    """{"tables": {name: bits}, "dense": 16 | 32} of a model stored quantized (`quant`), None for a float one."""
    from .quant.apply import HalfStoredLinear
    from .quant.sparse import QuantizedSparseArch

    half = any(isinstance(m, HalfStoredLinear) for m in model.modules())
    if not isinstance(model.sparse, QuantizedSparseArch) and not half:
        return None
    bits = dict(model.sparse.bits) if isinstance(model.sparse, QuantizedSparseArch) else {}
    return {"tables": bits, "dense": 16 if half else 32}


def quantized_skeleton(model, quant: dict):
    """`model` (tables not held) with its storage as `quant` says: an empty `QuantizedSparseArch`, fp16 Linears."""
    from .quant.apply import dense_to_half
    from .quant.sparse import QuantizedSparseArch

    if quant.get("tables"):
        model.sparse = QuantizedSparseArch.empty(model.structure, {k: int(v) for k, v in quant["tables"].items()})
    return dense_to_half(model, torch.float16) if int(quant.get("dense", 32)) == 16 else model


def read_compressed(path: str | os.PathLike, map_location="cpu", hold_tables: bool = True) -> Compressed:
    """Rebuild the model, its `Kept` and the extra metadata from a file written by `save_compressed`.
    `hold_tables=False`: the model's tables stay `meta` (`DLRM.holds_tables`), the file's are mapped, not read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no compressed model at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=not hold_tables)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise ValueError(f"{path} is not a readable compressed model ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a compressed model: expected format {FORMAT!r}, found {found!r}")
    try:
        family = family_of_structure(payload["structure"])  # the model family it was saved from (`models.family`)
        quant = payload.get("quant")
        model = family.build(family.structure_from_dict(payload["structure"]),
                             sparse_grad=bool(payload.get("sparse_grad", True)),
                             hold_tables=hold_tables and quant is None)
        state = payload["state_dict"]
        if quant is not None:
            model = quantized_skeleton(model, quant)
        elif not hold_tables:  # the file's tables (grouped, or per table in older files) left unread
            state = {k: v for k, v in state.items() if not k.startswith(("sparse.groups.", "sparse.tables."))} \
                | model.table_placeholders()
        if "dim_gate" in state:
            model.enable_dim_gate()
        model.load_state_dict(state, strict=True, assign=True)  # assign: no second copy of the tables
        kept = Kept.from_dict(payload["kept"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} holds a damaged compressed model ({type(err).__name__}: {err})") from err
    if hold_tables:  # (meta tables cannot move; assign=True left every loaded tensor where it was read to)
        device = next(iter(state.values())).device if state else torch.device("cpu")
        model = model.to(device)
    return Compressed(model=model, kept=kept, extra=dict(payload.get("extra") or {}))


def load_compressed(path: str | os.PathLike, map_location="cpu") -> DLRM:
    """The compressed DLRM stored at `path`, rebuilt from its structure and weights (no config needed)."""
    return read_compressed(path, map_location).model
