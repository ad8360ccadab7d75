"""The root config's schema: each checked section as a dataclass, what a key admits as its type and field metadata.
`config.read_section` reads a config node against one (the one checker: a one-line ConfigError naming the key) and
returns the typed dataclass; `config.validate_config` reads the whole `Root`, then checks the rules across keys.

A field's annotation is its type: bool, int, float (an int is accepted, read as a float), str, list[int], Any (not
checked here), or a section (another dataclass of this module); `| None` admits null (a section given null reads as
its defaults). A field without a default is a required key. Metadata (`spec`): ge / gt / le / lt (bounds; of a
list's items), choices (a tuple, or a function that gives it: module.py's names are read when a config is checked),
null (what null means: "null (off) or ..."), what (the noun of the message, e.g. "a directory path"), note (said
after it), nonempty (a non-blank string, a non-empty list). A section refuses keys it does not list unless it sets
OPEN (the model and optimizer configs carry keys that their own code checks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


def spec(default: Any = dataclasses.MISSING, **meta) -> Any:
    """A schema field: its default (none: a required key) and what it admits (the module docstring's metadata)."""
    if isinstance(default, (list, dict)) or (isinstance(default, type) and dataclasses.is_dataclass(default)):
        factory = default if isinstance(default, type) else (lambda: type(default)(default))
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _module_names(name: str):
    """module.py's names `name` (a tuple or dict), read when checked: module.py imports torch and Lightning."""
    def names() -> tuple:
        from . import module

        return tuple(getattr(module, name))
    return names


@dataclass(kw_only=True)
class Loader:
    batch_size: int = spec(gt=0)
    eval_batch_size: int = spec(gt=0)
    num_workers: int = spec(0, ge=0)
    cache_root: str = spec(".cache/umec", what="a directory path", nonempty=True)
    limit_rows: Any = spec(None)  # {train: rows, val: .., test: ..}: the data module checks it


@dataclass(kw_only=True)
class EarlyStopping:
    patience: int | None = spec(None, ge=1, null="off", note="(validation checks without improvement)")
    min_delta: float = spec(0.0, ge=0)


@dataclass(kw_only=True)
class LrDecay:
    factor: float | None = spec(None, gt=0, lt=1, null="off")
    patience: int = spec(1, ge=1, note="(validation checks without improvement)")
    min_lr: float = spec(0.0, ge=0)


@dataclass(kw_only=True)
class Phases:
    pretrain_epochs: int = spec(ge=0)
    compress_epochs: int = spec(ge=0)
    finetune_epochs: int = spec(ge=0)
    compress_steps: int | None = spec(None, ge=0, note="(optimizer steps)")
    early_stopping: EarlyStopping | None = spec(EarlyStopping)
    lr_decay: LrDecay | None = spec(LrDecay)


@dataclass(kw_only=True)
class Eval:
    auroc_bins: int | None = spec(1 << 16, gt=0, null="exact AUROC")
    collapse_threshold: float = spec(0.2, gt=0, le=1)
    monitor: str = spec("auc", choices=_module_names("MONITORS"))
    val_check_interval: float = spec(1.0, gt=0, note="(a share of an epoch, or an integer number of batches)")
    test_predictions: bool = spec(True)


@dataclass(kw_only=True)
class Regularization:
    embedding_l2: float = spec(0.0, ge=0)
    embedding_rows: str = spec("auto", choices=_module_names("EMBEDDING_ROWS"))
    dense_l2: float = spec(0.0, ge=0)
    max_grad_norm: float | None = spec(None, gt=0, null="off")


@dataclass(kw_only=True)
class Budget:
    flops: float | None = spec(None, gt=0, le=1, null="unconstrained", what="a fraction of the dense model")
    params: float | None = spec(None, gt=0, le=1, null="unconstrained", what="a fraction of the dense model")
    bytes: float | None = spec(None, gt=0, le=1, null="unconstrained",
                               what="a fraction of the fp32 dense model's stored bytes")


@dataclass(kw_only=True)
class Latency:
    batches: list[int] = spec([1, 2048], gt=0, nonempty=True)
    repeats: int = spec(30, gt=0)
    threads: int | None = spec(1, gt=0, null="torch's default")


@dataclass(kw_only=True)
class Export:
    torchscript: bool = spec(False)
    onnx: bool = spec(False)
    torchrec: bool = spec(False)


@dataclass(kw_only=True)
class Reference:
    dir: str | None = spec(None, what="a directory path", nonempty=True)


@dataclass(kw_only=True)
class ModelConfig:
    """The `model` keys of every model family (`models.family`); a family's schema extends it with its own."""

    name: str = spec(nonempty=True)
    embedding_dim: int = spec(gt=0)
    sparse_grad: bool = spec(True)
    batch_norm: Any = spec(False)  # one value, one per MLP or per layer: models.structure checks them
    dropout: Any = spec(0.0)
    embedding_std: float | None = spec(None, gt=0, null="reference init")
    zero_bias: bool = spec(False)


@dataclass(kw_only=True)
class Model(ModelConfig):
    """DLRM's `model` keys."""

    OPEN: ClassVar[bool] = True  # a model config may carry more keys (its code checks them)
    bottom: list[int] | None = spec(gt=0, null="no bottom MLP: data without dense features")
    top: list[int] = spec(gt=0, nonempty=True)
    interaction: str = spec(choices=("dot", "cat"))
    self_interaction: bool = spec(False)


@dataclass(kw_only=True)
class Optim:
    OPEN: ClassVar[bool] = True  # a `_partial_` torch.optim config: `stages.optimizer_factory` tries its arguments
    lr: float = spec(gt=0)
    weight_decay: float = spec(0.0, ge=0)


@dataclass(kw_only=True)
class Root:
    OPEN: ClassVar[bool] = True  # data, mode, trainer, logger, ...: their groups check them
    seed: int = spec(0, ge=0, le=2**32 - 1)
    nan_check_every: int | None = spec(None, ge=1)
    loader: Loader = spec()
    phases: Phases = spec()
    eval: Eval = spec(Eval)
    regularization: Regularization | None = spec(Regularization)
    budget: Budget = spec(Budget)
    latency: Latency = spec(Latency)
    export: Export | None = spec(Export)
    reference: Reference | None = spec(Reference)
    model: Any = spec()  # read by its family's schema (`models.family`; DLRM's: `Model` above)
    optim: Optim = spec()
