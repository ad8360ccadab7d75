"""The config schema (umec_lightning/schema.py) and its checker and readers (umec_lightning/config.py): every rule
passes a good value and refuses a bad one in a one-line ConfigError naming the key; the readers return typed
values; every shipped config passes."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from umec_lightning.config import (
    ConfigError,
    collapse_threshold,
    early_stopping_config,
    init_scheme,
    lr_decay_config,
    read_section,
    regularization_config,
    validate_config,
)
from umec_lightning.models.dlrm import InitScheme
from umec_lightning.schema import Root

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides or [])


@pytest.fixture(scope="module")
def base():
    return _compose(["loader.cache_root=/tmp/umec-schema-test"])


def _with(cfg, **changes):
    """A copy of `cfg` with dotted keys (`__` for `.`) set; the value `DELETE` removes the key."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key, value in changes.items():
            key = key.replace("__", ".")
            if value is DELETE:
                parent, _, name = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                del node[name]
            else:
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


DELETE = object()


def _refused(cfg, key: str, message: str = "") -> str:
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    text = str(err.value)
    assert text.startswith(f"config key `{key}`"), text
    assert "\n" not in text and message in text, text
    return text


# Good values, at the edges of what a key admits.
GOOD = [
    ("seed", 0), ("seed", 2**32 - 1), ("nan_check_every", 1), ("nan_check_every", None),
    ("loader.batch_size", 1), ("loader.eval_batch_size", 1), ("loader.num_workers", 0),
    ("loader.limit_rows", {"train": 10}),
    ("phases.pretrain_epochs", 0), ("phases.compress_epochs", 0), ("phases.finetune_epochs", 0),
    ("phases.compress_steps", 0), ("phases.compress_steps", None),
    ("phases.early_stopping.patience", 1), ("phases.early_stopping.min_delta", 0), ("phases.early_stopping", None),
    ("phases.lr_decay.factor", 0.5), ("phases.lr_decay.patience", 1), ("phases.lr_decay.min_lr", 0),
    ("phases.lr_decay", None),
    ("eval.auroc_bins", None), ("eval.auroc_bins", 1), ("eval.collapse_threshold", 1), ("eval.monitor", "logloss"),
    ("eval.monitor", "auc_logloss"), ("eval.val_check_interval", 1), ("eval.test_predictions", False),
    ("regularization.embedding_l2", 0.1), ("regularization.dense_l2", 1), ("regularization.embedding_rows", "all"),
    ("regularization.embedding_rows", "touched"), ("regularization.max_grad_norm", 10), ("regularization", None),
    ("budget.flops", 1), ("budget.params", 0.01),
    ("latency.batches", [1]), ("latency.repeats", 1), ("latency.threads", None),
    ("export.onnx", True), ("export", None), ("reference.dir", "/tmp/dense"), ("reference", None),
    ("model.bottom", None), ("model.bottom", []), ("model.top", [1]), ("model.interaction", "cat"),
    ("model.embedding_std", 1e-4), ("model.zero_bias", True), ("model.dropout", {"top": 0.2}),
    ("model.batch_norm", True), ("model.extra_key", 1),  # a model config may carry more keys
    ("optim.lr", 1e-5), ("optim.weight_decay", 0.0), ("optim.momentum", 0.9),  # optim: torch checks its arguments
    ("mode.anything", 1),  # groups outside the schema: their own checks
]


@pytest.mark.parametrize("key, value", GOOD, ids=[f"{k}={v}" for k, v in GOOD])
def test_a_good_value_passes(base, key, value):
    validate_config(_with(base, **{key: value}))


# Bad values: (key, value, what the message says after the key).
BAD = [
    ("seed", -1, "must be an integer in [0, 4294967295], got -1"),
    ("seed", 1.5, "must be an integer"),
    ("nan_check_every", 0, "must be an integer >= 1 or null, got 0"),
    ("loader.batch_size", -5, "must be a positive integer, got -5"),
    ("loader.batch_size", 2.0, "must be a positive integer, got 2.0"),
    ("loader.batch_size", True, "must be a positive integer, got True"),
    ("loader.eval_batch_size", 0, "must be a positive integer"),
    ("loader.num_workers", -1, "must be an integer >= 0, got -1"),
    ("loader.cache_root", " ", "must be a directory path, got ' '"),
    ("phases.pretrain_epochs", -1, "must be an integer >= 0, got -1"),
    ("phases.compress_epochs", "one", "must be an integer >= 0, got 'one'"),
    ("phases.finetune_epochs", 1.5, "must be an integer >= 0"),
    ("phases.compress_steps", -3, "must be an integer >= 0 (optimizer steps) or null, got -3"),
    ("phases.early_stopping.patience", 0,
     "must be null (off) or an integer >= 1 (validation checks without improvement), got 0"),
    ("phases.early_stopping.min_delta", -1, "must be a number >= 0, got -1"),
    ("phases.early_stopping.min_delta", float("nan"), "must be a number >= 0, got nan"),
    ("phases.early_stopping", 5, "must be a group of keys (patience, min_delta), got 5"),
    ("phases.lr_decay.factor", 2, "must be null (off) or in (0, 1), got 2"),
    ("phases.lr_decay.factor", 1, "must be null (off) or in (0, 1), got 1"),
    ("phases.lr_decay.patience", 0, "must be an integer >= 1 (validation checks without improvement), got 0"),
    ("phases.lr_decay.min_lr", -1e-6, "must be a number >= 0"),
    ("eval.auroc_bins", 0, "must be null (exact AUROC) or a positive integer, got 0"),
    ("eval.collapse_threshold", 0, "must be in (0, 1], got 0"),
    ("eval.collapse_threshold", 1.5, "must be in (0, 1], got 1.5"),
    ("eval.monitor", "accuracy", "must be one of auc, logloss, auc_logloss, got 'accuracy'"),
    ("eval.val_check_interval", 0, "must be a number > 0"),
    ("eval.test_predictions", "yes", "must be true or false, got 'yes'"),
    ("regularization.embedding_l2", -0.1, "must be a number >= 0, got -0.1"),
    ("regularization.dense_l2", True, "must be a number >= 0, got True"),
    ("regularization.embedding_rows", "some", "must be one of auto, touched, all, got 'some'"),
    ("regularization.max_grad_norm", 0, "must be null (off) or a number > 0, got 0"),
    ("budget.flops", 1.5, "must be null (unconstrained) or a fraction of the dense model in (0, 1], got 1.5"),
    ("budget.params", 0, "a fraction of the dense model in (0, 1], got 0"),
    ("latency.batches", [], "must be a non-empty list of positive integers, got []"),
    ("latency.batches", 1, "must be a non-empty list of positive integers, got 1"),
    ("latency.repeats", 0, "must be a positive integer"),
    ("latency.threads", 0, "must be null (torch's default) or a positive integer, got 0"),
    ("export.onnx", 1, "must be true or false, got 1"),
    ("reference.dir", "", "must be a directory path or null, got ''"),
    ("reference.dir", 3, "must be a directory path or null, got 3"),
    ("model.name", "", "must be a non-empty string"),
    ("model.interaction", "sum", "must be one of dot, cat, got 'sum'"),
    ("model.embedding_dim", 0, "must be a positive integer, got 0"),
    ("model.bottom", [16, 0], "or a list of positive integers, got [16, 0]"),
    ("model.bottom", "16", "or a list of positive integers, got '16'"),
    ("model.top", [], "must be a non-empty list of positive integers, got []"),
    ("model.top", [16, 1.5], "must be a non-empty list of positive integers, got [16, 1.5]"),
    ("model.self_interaction", "no", "must be true or false"),
    ("model.sparse_grad", 1, "must be true or false"),
    ("model.embedding_std", 0, "must be null (reference init) or a number > 0, got 0"),
    ("model.zero_bias", 3, "must be true or false, got 3"),
    ("optim.lr", 0, "must be a number > 0, got 0"),
    ("optim.lr", float("nan"), "must be a number > 0"),
    ("optim.weight_decay", -1, "must be a number >= 0"),
    ("loader", None, "must be a group of keys (batch_size, eval_batch_size, num_workers, cache_root, limit_rows)"),
]


@pytest.mark.parametrize("key, value, message", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_a_bad_value_is_refused_naming_its_key(base, key, value, message):
    _refused(_with(base, **{key: value}), key, message)


def test_the_message_is_the_one_line_it_was():
    assert _refused(_compose(["phases.lr_decay.factor=2"]), "phases.lr_decay.factor") == \
        "config key `phases.lr_decay.factor` must be null (off) or in (0, 1), got 2"


@pytest.mark.parametrize("section", ["loader", "phases", "phases.early_stopping", "phases.lr_decay", "eval",
                                     "regularization", "budget", "latency", "export", "reference"])
def test_a_closed_section_refuses_unknown_keys(base, section):
    _refused(_with(base, **{f"{section}.typo": 1}), section, "unknown keys ['typo']")


@pytest.mark.parametrize("key", ["loader.batch_size", "loader.eval_batch_size", "phases.pretrain_epochs",
                                 "phases.compress_epochs", "phases.finetune_epochs", "model.top", "model.bottom",
                                 "model.embedding_dim", "model.interaction", "optim.lr", "loader", "model"])
def test_a_required_key_missing_is_named(base, key):
    _refused(_with(base, **{key: DELETE}), key, "is missing")


@pytest.mark.parametrize("key", ["seed", "nan_check_every", "phases.compress_steps", "phases.early_stopping",
                                 "phases.lr_decay.min_lr", "eval", "eval.monitor", "regularization", "budget",
                                 "latency.threads", "export", "reference", "model.embedding_std", "model.zero_bias",
                                 "optim.weight_decay"])
def test_an_optional_key_missing_takes_its_default(base, key):
    validate_config(_with(base, **{key: DELETE}))


def test_the_rules_across_keys(base):
    _refused(_with(base, **{"model.top": [16, 2]}), "model.top", "must end in 1 (the logit), got [16, 2]")
    dot = {"model.interaction": "dot", "model.embedding_dim": 16}
    _refused(_with(base, **dot, **{"model.bottom": [64, 8]}), "model.bottom",
             "under `dot` the bottom MLP must end in model.embedding_dim=16, got [64, 8]")
    validate_config(_with(base, **dot, **{"model.bottom": [64, 16]}))
    validate_config(_with(base, **{"model.interaction": "cat", "model.bottom": [64, 8]}))  # cat: any width
    both = _with(base, **{"regularization.dense_l2": 0.01, "optim.weight_decay": 0.01})
    with pytest.raises(ConfigError, match=re.escape("config keys `regularization.dense_l2` and `optim.weight_decay` "
                                                    "are both set")):
        validate_config(both)
    with pytest.raises(ConfigError, match="set one"):
        regularization_config(both)
    validate_config(_with(base, **{"regularization.dense_l2": 0.01, "optim.weight_decay": 0.0}))


def test_validate_config_returns_the_typed_root(base):
    root = validate_config(_with(base, **{"budget.flops": 1, "phases.early_stopping.min_delta": 0}))
    assert isinstance(root, Root)
    assert root.budget.flops == 1.0 and isinstance(root.budget.flops, float)
    assert root.phases.early_stopping.min_delta == 0.0 and isinstance(root.phases.early_stopping.min_delta, float)
    assert root.model.top == [512, 256, 1] and type(root.model.top) is list
    assert root.loader.batch_size == 128 and root.optim.lr == pytest.approx(0.1)


def test_every_shipped_config_passes():
    options = [[]] + [[f"{group}={path.stem}"] for group in ("experiment", "mode", "model", "optim", "data")
                      for path in sorted((CONF / group).glob("*.yaml"))]
    for overrides in options:
        validate_config(_compose(overrides))


# The readers: typed values, each refusing as validate_config does.

def test_early_stopping_config(base):
    assert early_stopping_config(base) is None  # patience null: off
    assert early_stopping_config(_with(base, **{"phases.early_stopping": None})) is None
    on = early_stopping_config(_with(base, **{"phases.early_stopping": {"patience": 2, "min_delta": 0}}))
    assert on == {"patience": 2, "min_delta": 0.0} and isinstance(on["min_delta"], float)
    assert early_stopping_config(_with(base, **{"phases.early_stopping": {"patience": 3}})) == \
        {"patience": 3, "min_delta": 0.0}
    for change, key in [({"phases.early_stopping.patience": 0}, "phases.early_stopping.patience"),
                        ({"phases.early_stopping.min_delta": -1}, "phases.early_stopping.min_delta"),
                        ({"phases.early_stopping.typo": 1}, "phases.early_stopping")]:
        with pytest.raises(ConfigError, match=re.escape(f"config key `{key}`")):
            early_stopping_config(_with(base, **{"phases.early_stopping.patience": 2, **change}))


def test_lr_decay_config(base):
    assert lr_decay_config(base) is None  # factor null: off
    assert lr_decay_config(_with(base, **{"phases.lr_decay": None})) is None
    on = lr_decay_config(_with(base, **{"phases.lr_decay": {"factor": 0.1, "patience": 2, "min_lr": 0}}))
    assert on == {"factor": 0.1, "patience": 2, "min_lr": 0.0} and isinstance(on["min_lr"], float)
    assert lr_decay_config(_with(base, **{"phases.lr_decay": {"factor": 0.5}})) == \
        {"factor": 0.5, "patience": 1, "min_lr": 0.0}
    for key, value in [("factor", 2), ("patience", 0), ("min_lr", -1)]:
        with pytest.raises(ConfigError, match=re.escape(f"config key `phases.lr_decay.{key}`")):
            lr_decay_config(_with(base, **{f"phases.lr_decay.{key}": value}))
    with pytest.raises(ConfigError, match=re.escape("config key `phases.lr_decay`: unknown keys ['typo']")):
        lr_decay_config(_with(base, **{"phases.lr_decay.typo": 1}))


def test_regularization_config(base):
    default = {"embedding_l2": 0.0, "dense_l2": 0.0, "embedding_rows": "auto", "max_grad_norm": None,
               "monitor": "auc"}
    assert regularization_config(base) == default
    assert regularization_config(_with(base, regularization=None)) == default
    assert regularization_config(_with(base, regularization=DELETE, eval=DELETE)) == default
    out = regularization_config(_with(base, regularization={"embedding_l2": 1, "dense_l2": 0, "embedding_rows": "all",
                                                            "max_grad_norm": 10}, **{"eval.monitor": "logloss"}))
    assert out == {"embedding_l2": 1.0, "dense_l2": 0.0, "embedding_rows": "all", "max_grad_norm": 10.0,
                   "monitor": "logloss"}
    assert all(isinstance(out[k], float) for k in ("embedding_l2", "dense_l2", "max_grad_norm"))
    for key, value in [("regularization.embedding_l2", -1), ("regularization.dense_l2", "x"),
                       ("regularization.embedding_rows", "some"), ("regularization.max_grad_norm", 0),
                       ("eval.monitor", "accuracy")]:
        with pytest.raises(ConfigError, match=re.escape(f"config key `{key}`")):
            regularization_config(_with(base, **{key: value}))
    with pytest.raises(ConfigError, match=re.escape("config key `regularization`: unknown keys ['embedding_l1']")):
        regularization_config(_with(base, **{"regularization.embedding_l1": 0.1}))


def test_collapse_threshold(base):
    assert collapse_threshold(base) == 0.2
    assert collapse_threshold(_with(base, eval=DELETE)) == 0.2
    one = collapse_threshold(_with(base, **{"eval.collapse_threshold": 1}))
    assert one == 1.0 and isinstance(one, float)
    for value in (0, 1.5, True, "0.2"):
        with pytest.raises(ConfigError, match=re.escape("config key `eval.collapse_threshold` must be in (0, 1]")):
            collapse_threshold(_with(base, **{"eval.collapse_threshold": value}))


def test_init_scheme(base):
    assert init_scheme(base) == InitScheme(None, False)
    assert init_scheme(_with(base, **{"model.embedding_std": DELETE, "model.zero_bias": DELETE})) == InitScheme()
    scheme = init_scheme(_with(base, **{"model.embedding_std": 1, "model.zero_bias": True}))
    assert scheme == InitScheme(1.0, True) and isinstance(scheme.embedding_std, float)
    for key, value in [("model.embedding_std", 0), ("model.embedding_std", "big"), ("model.zero_bias", "yes")]:
        with pytest.raises(ConfigError, match=re.escape(f"config key `{key}`")):
            init_scheme(_with(base, **{key: value}))


def test_read_section_names_the_section_it_reads():
    from umec_lightning.schema import Budget

    assert read_section({"flops": 0.5}, Budget, "budget").flops == 0.5
    assert read_section(None, Budget, "budget").params is None
    with pytest.raises(ConfigError, match=re.escape("config key `budget.params` must be")):
        read_section({"params": 2}, Budget, "budget")
    with pytest.raises(ConfigError, match=re.escape("config key `budget` must be a group of keys")):
        read_section(None, Budget, "budget", nullable=False)


def test_the_schema_is_an_omegaconf_structured_config():
    """OmegaConf builds it (its types are ones it knows): required keys `???`, defaults as declared."""
    root = OmegaConf.structured(Root)
    from umec_lightning.schema import Loader

    assert OmegaConf.is_missing(root, "model") and OmegaConf.is_missing(OmegaConf.structured(Loader), "batch_size")
    assert root.eval.monitor == "auc" and root.latency.batches == [1, 2048] and root.regularization.dense_l2 == 0
