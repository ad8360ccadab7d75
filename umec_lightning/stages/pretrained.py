"""`pretrained=`: dense weights from a checkpoint of an earlier run, refused when made for another model config."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from ..models import DLRM
from ..models.family import structure_from_dict
from ..sharded.checkpoint import read_checkpoint, read_checkpoint_into


def load_pretrained(model: DLRM, path: str, model_name: str, data_name: str) -> None:
    """Dense weights from a checkpoint of an earlier run; refuses one made for another model config."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config key `pretrained`: no such checkpoint {path}")
    try:
        head = read_checkpoint(p, tables=False)  # the main file, memory-mapped, without its tables
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ConfigError(f"config key `pretrained`: {path} is not a Lightning checkpoint ({err})") from None
    saved = head.get("dlrm_structure")
    if saved is not None:
        # Through the dataclass, so a checkpoint written before a field existed compares by its defaults.
        saved = structure_from_dict(saved).to_dict()
    if saved is not None and saved != model.structure.to_dict():
        ours = model.structure.to_dict()
        diff = [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
        raise ConfigError(
            f"config key `pretrained`: {path} was trained with another model/data config "
            f"(differs in {', '.join(diff)}); this run uses model={model_name}, data={data_name}"
        )
    try:
        # A sharded run's tables are assembled straight into the model's own; a model without its tables
        # (a rank but 0 under trainer=torchrec) reads none and gets placeholders.
        ckpt = read_checkpoint_into(model, p)
    except ValueError as err:  # a table's shards do not have the model's shape
        raise ConfigError(f"config key `pretrained`: {path} does not fit model={model_name}: {err}") from None
    except Exception as err:  # noqa: BLE001 - as above
        raise ConfigError(f"config key `pretrained`: {path} is not a Lightning checkpoint ({err})") from None
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model.sparse.fuse_table_keys_(state, "sparse.")  # a checkpoint from before the tables were grouped
    ours = model.state_dict()
    bad = [k for k in ours if k not in state or state[k].shape != ours[k].shape]
    if bad:
        raise ConfigError(
            f"config key `pretrained`: {path} does not fit model={model_name}: "
            f"{len(bad)} mismatched tensors, e.g. {bad[0]}"
        )
    model.load_state_dict({k: state[k] for k in ours})
