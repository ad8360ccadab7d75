"""Checks on a composed config, run before any work starts.

Hydra itself rejects an unknown group choice (listing the available ones) and unknown keys (the
composed config is in struct mode); this module checks values. The mode's stages and method are checked
by `stages.parse_stages` and `run.check_stages` (a method knows what it needs).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


# The config keys (a key, or a group: every key under it) that do not change what a run computes: what it logs and
# where, progress bars, cache paths, latency timing, exports, per-row test predictions. The one list of them: a
# resume may differ from its run in these (`run.result_config`), and the shared dense reference's key leaves them out
# (`reference.reference_material`).
RESULT_NEUTRAL_KEYS = ("resume", "overwrite", "debug", "logger", "run_name", "trainer.enable_progress_bar",
                       "loader.cache_root", "loader.num_workers", "log_every_n_steps", "latency", "export",
                       "eval.test_predictions")


def result_neutral(key: str) -> bool:
    """Whether the flat config key `key` (`group.name`) is one of RESULT_NEUTRAL_KEYS or under one of them."""
    return any(key == neutral or key.startswith(f"{neutral}.") for neutral in RESULT_NEUTRAL_KEYS)


def _positive_int(cfg: DictConfig, key: str) -> None:
    value = _select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config key `{key}` must be a positive integer, got {value!r}")


def _select(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        if part not in node:
            raise ConfigError(f"config key `{key}` is missing")
        node = node[part]
    return node


def validate_config(cfg: DictConfig) -> None:
    for key in ("loader.batch_size", "loader.eval_batch_size"):
        _positive_int(cfg, key)
    workers = cfg.loader.num_workers
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"config key `loader.num_workers` must be an integer >= 0, got {workers!r}")
    for key in ("phases.pretrain_epochs", "phases.compress_epochs", "phases.finetune_epochs"):
        value = _select(cfg, key)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"config key `{key}` must be an integer >= 0, got {value!r}")
    ref = (cfg.get("reference") or {}).get("dir")
    if ref is not None and (not isinstance(ref, str) or not ref.strip()):
        raise ConfigError(f"config key `reference.dir` must be a directory path or null, got {ref!r}")
    every = cfg.get("nan_check_every")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"config key `nan_check_every` must be an integer >= 1 or null, got {every!r}")
    if not float(cfg.optim.lr) > 0:
        raise ConfigError(f"config key `optim.lr` must be > 0, got {cfg.optim.lr}")
    m = cfg.model
    if m.interaction not in ("dot", "cat"):
        raise ConfigError(f"config key `model.interaction` must be 'dot' or 'cat', got {m.interaction!r}")
    _positive_int(cfg, "model.embedding_dim")
    for key in ("model.bottom", "model.top"):
        value = _select(cfg, key)
        if key == "model.bottom" and value is None:
            continue  # no bottom MLP: only for data without dense features (checked against the data)
        if isinstance(value, (str, int, float)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"config key `{key}` must be a list of positive integers, got {value!r}")
        widths = list(value)
        if (not widths and key == "model.top") or any(not isinstance(w, int) or isinstance(w, bool) or w <= 0
                                                      for w in widths):
            raise ConfigError(f"config key `{key}` must be a list of positive integers, got {widths}")
    if m.top[-1] != 1:
        raise ConfigError(f"config key `model.top` must end in 1 (the logit), got {list(m.top)}")
    if m.interaction == "dot" and m.bottom and m.bottom[-1] != m.embedding_dim:
        raise ConfigError(
            f"config key `model.bottom`: under `dot` the bottom MLP must end in model.embedding_dim="
            f"{m.embedding_dim}, got {list(m.bottom)}"
        )
    for name in ("flops", "params"):
        value = cfg.budget[name]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(
                f"config key `budget.{name}` must be a fraction of the dense model in (0, 1], got {value!r}"
            )


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def flat_config(cfg: DictConfig) -> dict:
    """The resolved config as flat `dotted.key: value` (an empty group stays as `key: {}`)."""
    return _flat(OmegaConf.to_container(cfg, resolve=True))
