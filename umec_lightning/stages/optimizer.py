"""The optimizer every stage uses, from `optim` (a Hydra `_partial_` config of a `torch.optim` class), tried on a
probe parameter so a bad argument fails before any work."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ..config import ConfigError
from ..module import OptimizerFactory


def optimizer_factory(cfg: DictConfig) -> OptimizerFactory:
    """The optimizer every stage uses, from `optim`: `factory(params, lr=...)`. ConfigError naming the key
    when it does not build a usable `torch.optim.Optimizer` (tried on a probe parameter: bad arguments fail
    here, before any work)."""
    node = cfg.optim
    if "_target_" not in node:  # `optim: {lr: ...}` alone: the reference SGD
        return torch.optim.SGD
    target = node._target_
    try:
        factory = instantiate(node, _partial_=True, _convert_="all")
    except Exception as err:  # noqa: BLE001 - Hydra wraps every lookup error the same way
        raise ConfigError(f"config key `optim._target_`: {_one_line(err)}") from None
    cls = getattr(factory, "func", None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"config key `optim._target_`: {target} is not a torch.optim.Optimizer")
    if issubclass(cls, torch.optim.SparseAdam):
        raise ConfigError("config key `optim._target_`: SparseAdam takes only sparse gradients and the MLPs' are "
                          "dense; use optim=adam (tables then get dense gradients) or optim=adagrad (sparse)")
    try:
        factory([torch.nn.Parameter(torch.zeros(1))], lr=float(node.lr))
    except Exception as err:  # noqa: BLE001 - any constructor error is a bad argument of the config
        raise ConfigError(f"config key `optim` ({target}): {_one_line(err)}") from None
    return factory


def _one_line(err: BaseException) -> str:
    cause = err.__cause__ or err
    return " ".join(str(cause).split()) or type(cause).__name__
