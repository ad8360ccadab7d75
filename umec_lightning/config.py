"""Checks on a composed config, run before any work starts, and the typed readers of its sections.

Hydra itself rejects an unknown group choice (listing the available ones) and unknown keys (the composed config is
in struct mode; a `+key=` override adds one, which a section of the schema then refuses). What each key admits is
declared in `schema.py` (dataclasses and their field metadata) and read by one checker, `read_section`;
`validate_config` reads the root config that way, then checks the few rules across keys. The readers
(`early_stopping_config`, `lr_decay_config`, `regularization_config`, `collapse_threshold`, `init_scheme`) return
what their section gives the run, read by the same checker. The mode's stages and method are checked by
`stages.parse_stages` and `run.check_stages` (a method knows what it needs).
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from typing import TYPE_CHECKING, Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from .schema import EarlyStopping, Eval, LrDecay, Optim, Regularization, Root

if TYPE_CHECKING:
    from .models.dlrm import InitScheme

S = TypeVar("S")


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


def validate_config(cfg: DictConfig) -> Root:
    """Every key of `schema.Root` read (its typed values returned), `model` by its family's schema, then the rules
    across keys. One call, before any work: it checks all that the readers below check."""
    root = read_section(cfg, Root)
    family = _family(cfg.model)
    root.model = read_section(cfg.model, family.config_schema, "model")
    family.check_config(root.model)
    _one_weight_decay(root.regularization, root.optim)
    return root


def _family(model_cfg):
    from .models.family import family_of

    try:
        return family_of(model_cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _one_weight_decay(reg: Regularization, optim: Optim) -> None:
    if reg.dense_l2 > 0 and optim.weight_decay > 0:
        raise ConfigError("config keys `regularization.dense_l2` and `optim.weight_decay` are both set: the first "
                          "decays every parameter but the tables, the second every parameter; set one")


# The typed readers of sections that the run's code uses, each checked as validate_config checks it.

def early_stopping_config(cfg: DictConfig) -> dict | None:
    """`phases.early_stopping`: {patience, min_delta}, or None when off (patience null, the default)."""
    node = read_section(cfg.phases.get("early_stopping"), EarlyStopping, "phases.early_stopping")
    return None if node.patience is None else {"patience": node.patience, "min_delta": node.min_delta}


def lr_decay_config(cfg: DictConfig) -> dict | None:
    """`phases.lr_decay`: {factor, patience, min_lr}, or None when off (factor null, the default)."""
    node = read_section(cfg.phases.get("lr_decay"), LrDecay, "phases.lr_decay")
    return None if node.factor is None else {"factor": node.factor, "patience": node.patience, "min_lr": node.min_lr}


def regularization_config(cfg: DictConfig) -> dict:
    """`regularization` and `eval.monitor`: the CTRModule arguments they give (module.py)."""
    reg = read_section(cfg.get("regularization"), Regularization, "regularization")
    _one_weight_decay(reg, read_section(cfg.optim, Optim, "optim"))
    return {"embedding_l2": reg.embedding_l2, "dense_l2": reg.dense_l2, "embedding_rows": reg.embedding_rows,
            "max_grad_norm": reg.max_grad_norm, "monitor": read_section(cfg.get("eval"), Eval, "eval").monitor}


def collapse_threshold(cfg: DictConfig) -> float:
    """`eval.collapse_threshold` (`compression.collapse`)."""
    return read_section(cfg.get("eval"), Eval, "eval").collapse_threshold


def init_scheme(cfg: DictConfig) -> InitScheme:
    """`model.embedding_std` and `model.zero_bias` (`models.dlrm.InitScheme`)."""
    from .models.dlrm import InitScheme

    m = read_section(cfg.model, _family(cfg.model).config_schema, "model")
    return InitScheme(m.embedding_std, m.zero_bias)


# The one checker: a node read against a dataclass of umec_lightning.schema (its module docstring says the rules).

def read_section(node, schema: type[S], key: str = "", nullable: bool = True) -> S:
    """`node` (a config group, a dict, or null where `nullable`: the defaults) read against `schema`, returned as
    that dataclass with typed values. ConfigError naming the key (`key`: the node's own, "" for the root) at the
    first value that the schema refuses, the first required key missing, or keys the schema does not list (unless
    it is OPEN)."""
    node = {} if node is None and nullable else node
    fields = dataclasses.fields(schema)
    if not isinstance(node, (dict, DictConfig)):
        raise ConfigError(f"config key `{key}` must be a group of keys ({', '.join(f.name for f in fields)}), "
                          f"got {plain(node)!r}")
    unknown = set(node) - {f.name for f in fields}
    if unknown and not getattr(schema, "OPEN", False):
        raise ConfigError(f"config key `{key}`: unknown keys {sorted(unknown)}")
    hints = typing.get_type_hints(schema)
    values = {}
    for f in fields:
        where = f"{key}.{f.name}" if key else f.name
        if f.name not in node or (isinstance(node, DictConfig) and OmegaConf.is_missing(node, f.name)):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"config key `{where}` is missing")
            continue
        values[f.name] = _read_value(node[f.name], hints[f.name], f.metadata, where)
    return schema(**values)


def _read_value(value, hint, meta, where: str):
    args = typing.get_args(hint)
    nullable = type(None) in args and typing.get_origin(hint) in (typing.Union, types.UnionType)
    kind = next(a for a in args if a is not type(None)) if nullable else hint
    if dataclasses.is_dataclass(kind):  # a null section: its defaults, where it may be null
        return read_section(value, kind, where, nullable)
    if kind is Any or (value is None and nullable):
        return value
    typed = _typed(value, kind, meta)
    if typed is None:
        raise ConfigError(f"config key `{where}` must be {_expects(kind, meta, nullable)}, got {plain(value)!r}")
    return typed


_BOUNDS = {"ge": (operator.ge, ">=", "["), "gt": (operator.gt, ">", "("),
           "le": (operator.le, "<=", "]"), "lt": (operator.lt, "<", ")")}


def _typed(value, kind, meta):
    """`value` as `kind` when it is one and within `meta`'s bounds and choices, else None."""
    def number(x, cls) -> bool:
        return isinstance(x, cls) and not isinstance(x, bool) and all(
            _BOUNDS[b][0](x, meta[b]) for b in _BOUNDS if b in meta)

    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is int or kind is float:
        return kind(value) if number(value, int if kind is int else (int, float)) else None
    if kind is str:
        choices = meta.get("choices")
        choices = choices() if callable(choices) else choices
        ok = isinstance(value, str) and (not meta.get("nonempty") or value.strip()) and value in (choices or [value])
        return value if ok else None
    if typing.get_origin(kind) is list:  # list[int]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, ListConfig)):
            return None
        items = list(value)
        return items if (items or not meta.get("nonempty")) and all(number(x, int) for x in items) else None
    raise TypeError(f"schema type {kind} of `{value}`: not one that read_section knows")


def _expects(kind, meta, nullable: bool) -> str:
    """What a key admits, in words: `must be {this}`."""
    low = next((b for b in ("ge", "gt") if b in meta), None)
    high = next((b for b in ("le", "lt") if b in meta), None)
    bound = lambda b: f"{_BOUNDS[b][1]} {meta[b]}"  # noqa: E731
    rng = f"in {_BOUNDS[low][2]}{meta[low]}, {meta[high]}{_BOUNDS[high][2]}" if low and high else \
        bound(low) if low else bound(high) if high else ""
    positive = low == "gt" and meta[low] == 0 and not high
    if "choices" in meta:
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        text = f"one of {', '.join(choices)}"
    elif kind is bool:
        text = "true or false"
    elif kind is str:
        text = meta.get("what", "a non-empty string" if meta.get("nonempty") else "a string")
    elif kind is int:
        text = "a positive integer" if positive else f"an integer {rng}".strip()
    elif kind is float:
        text = f"{meta['what']} {rng}" if "what" in meta else rng if low and high else f"a number {rng}".strip()
    else:  # list[int]
        items = "positive integers" if positive else f"integers {rng}".strip()
        text = f"a {'non-empty ' if meta.get('nonempty') else ''}list of {items}"
    text = f"{text} {meta['note']}" if "note" in meta else text
    if not nullable:
        return text
    return f"null ({meta['null']}) or {text}" if "null" in meta else f"{text} or null"


def plain(value):
    """A config value as plain Python (a DictConfig or ListConfig as dict or list, resolved)."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


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
