"""The interface every compression method implements (plain PyTorch: no Lightning import).

A method is one object per compress stage of a run. The LightningModule calls its hooks during training;
the extraction callback calls `finish` when the stage's fit ends and turns the `Outcome` into a physically
smaller model with the one shared surgery (`extract.extract`). The orchestrator never asks which method it
is running: a new method is one module (a subclass below) and one YAML file naming it by `_target_`.

Life cycle of a method in a compress stage:

    check(model, budgets)     before any training, on a shapes-only (meta-device) copy of the stage's input
                              model: raise ValueError for a budget or group set it cannot serve.
    setup(model, budgets)     once, on the real model, before the optimizer is created (a method may add
                              parameters here, e.g. UMEC's dimension gate). `budgets` are fractions of
                              *this* model's resources ({"flops": 0.5}); every budget set is to be met.
    to(device)                whenever the model may have moved (the module calls it at fit start, the
                              extraction at fit end): the method's tensors follow the model's device/dtype.
    loss(model) -> Tensor     an extra term added to the training loss (group lasso), or None.
    after_backward(model)     gradients are populated, the optimizer has not stepped (Taylor importance).
    after_step(model, lr)     after the optimizer step (ADMM's prox and s/y/z updates, re-applying masks).
    set_optimizer(optimizer)  at the start of training (again on resume): the stage's torch optimizer (UMEC's
                              adaptive prox reads its per-weight step sizes).
    set_holdout(batches)      at the start of training: a callable returning held-out (dense, sparse, label)
                              batches of this process (UMEC's held-out feature scores).
    log_values() -> dict      named floats for the loggers; called every `log_every_n_steps`, may sync.
    pruned_features() -> list names of the input features the method would remove right now (reports).
    state_dict()/load_state_dict(d)   what a checkpoint must hold so a resumed stage ends bit-exactly.
    observe(model, batch)     `calibration_batches` > 0: right before `finish`, the method sees that many
                              training batches (no gradients, model in eval mode) — calibration statistics
                              such as the output covariances of low-rank feature compression.
    state_vector() -> list    the method's whole state as floats, or None: recorded per rank at extraction
                              (`kept_rank<r>.json`), so tests can check that DDP ranks stayed identical.
    largest_layout(model)     the Kept of the structure with the most modules it may end with (served-file bytes).
    layout_budgets            set by a compress stage under a bytes budget: (model, kept) -> (budgets, reserve),
                              the budgets left once the served files' own bytes of `kept`'s layout (`reserve`)
                              are held back. A method that can choose its structure again cheaply (low rank)
                              fits it to its own layout (`LowRankSVD.finish`); `budgets` held back the bytes of
                              `largest_layout`, an upper bound.
    finish(model) -> Outcome  the structure it ends with. Called on every rank; rank 0's `kept` (and its
                              bases) is the one every rank extracts (DDP consistency by construction).

Methods that train from scratch (`handcrafted`) decide their structure before any training: a `scratch`
stage calls `finish` on the dense model first and trains a fresh model of the resulting structure.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .kept import Kept


@dataclass
class Outcome:
    """What a method ends with: the structure to extract (dense numbering of the stage's input model) and
    the method's own figures for summary.json (e.g. groups restored under the budget, the CR reached)."""

    kept: Kept
    info: dict = field(default_factory=dict)
    bases: dict | None = None  # name -> extract.Basis: the factorisation of a unit in `kept.ranks` (else SVD)
    factor_activation: bool | None = None  # a ReLU between the factors of every factored layer (None: the model's)


class CompressionMethod:
    """Base class: every hook is optional except `finish`. `name` labels the method in reports;
    `targets_budget` False (group lasso) lets a run go without a budget: it reports what it reached."""

    name = "method"
    kinds: frozenset[str] | set[str] | list[str] = frozenset()  # the group kinds it prunes (groups.KINDS), if any
    targets_budget = True
    needs: frozenset[str] = frozenset({"groups"})  # what the model family must offer (`models.family`)
    calibration_batches = 0
    requires_finetune = False  # the extracted model is not a drop-in: a finetune stage must follow
    layout_budgets = None  # (model, kept) -> (budgets, reserve bytes): see the module docstring

    def check(self, model, budgets: dict[str, float]) -> None:
        """Reject budgets or settings this method cannot serve on `model` (shapes only; may be on meta)."""

    def setup(self, model, budgets: dict[str, float]) -> None:
        self.model = model
        self.budgets = dict(budgets)

    def to(self, device: torch.device | str) -> None:
        """Move every tensor the method holds to `device` (the model's)."""

    def begin(self, total_steps: int) -> None:
        """Before the stage's first step (again on resume): the optimizer steps the stage will take."""

    def loss(self, model) -> Tensor | None:
        return None

    def after_backward(self, model) -> None:
        pass

    def after_step(self, model, lr: float) -> None:
        pass

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def set_holdout(self, batches) -> None:
        pass

    def log_values(self) -> dict[str, float]:
        return {}

    def pruned_features(self) -> list[str]:
        return []

    def observe(self, model, batch) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def state_vector(self) -> list[float] | None:
        return None

    def finish(self, model) -> Outcome:
        raise NotImplementedError

    def largest_layout(self, model) -> Kept:
        """The structure with the most modules and tensors this method may end with, as a `Kept` of `model`: what
        the served files' own bytes are measured on before it runs (`quant.served`). Pruning only removes: `model`
        itself (every unit kept)."""
        return Kept.everything(model)


_ALONE = [False]  # inside `alone()`


@contextmanager
def alone():
    """Within it, a method's own cross-rank reductions (`ranks_reduced`) see one process: rank 0 finishing a
    stage by itself (`finish_on_rank_zero`) while the other ranks wait, on what it has seen of all of them."""
    _ALONE[0] = True
    try:
        yield
    finally:
        _ALONE[0] = False


def ranks_reduced() -> int:
    """How many processes a method's cross-rank reduction spans now: the world size under DDP, 1 in a single
    process or inside `alone()` (a collective there would wait forever for the others)."""
    dist = torch.distributed
    if _ALONE[0] or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def model_device(model) -> torch.device:
    """The device of a model's parameters (CPU for a model without any); `meta` tables (a rank that does not
    hold the tables of record: `DLRM.holds_tables`) do not count."""
    param = next((p for p in model.parameters() if not p.is_meta), None)
    return param.device if param is not None else torch.device("cpu")


@dataclass
class Extracted:
    """A finished compress stage: the physically smaller model, the structure it keeps (numbering of the
    stage's input model), the method's figures, and this process's own decision before ranks agreed."""

    model: object
    kept: Kept
    info: dict
    local_kept: Kept


def calibrate(method: CompressionMethod, model, batches) -> int:
    """Show the method its `calibration_batches` batches of `batches` (no gradients, eval mode, on the
    model's device); returns how many it saw. ValueError when it asks for some and none come."""
    wanted = int(method.calibration_batches)
    if wanted <= 0:
        return 0
    device, seen = model_device(model), 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            if seen == wanted:
                break
            method.observe(model, batch.to(device))
            seen += 1
    model.train(was_training)
    if seen == 0:
        raise ValueError(f"{method.name} needs {wanted} calibration batches, the data gave none")
    return seen


def finish_and_extract(method: CompressionMethod, model, agree=None, calibration=None) -> Extracted:
    """End a compress stage: calibration (if the method asks for it, from the iterable `calibration`), the
    method's `Outcome` on `model`, then the shared surgery (`extract`).

    `agree(obj) -> obj` makes every process use one decision (under DDP: a broadcast from rank 0), so all
    ranks build the same model even if their own arithmetic drifted. Plain function: no trainer needed.
    """
    from .extract import extract

    method.to(model_device(model))
    if method.calibration_batches:
        if calibration is None:
            raise ValueError(f"{method.name} needs calibration batches and none were given")
        calibrate(method, model, calibration)
    outcome = method.finish(model)
    kept, info, bases = outcome.kept, dict(outcome.info), outcome.bases
    if agree is not None:
        kept_dict, info, bases = agree((kept.to_dict(), info, bases))
        kept = Kept.from_dict(kept_dict)
    slim = extract(model, kept, bases=bases or None, factor_activation=outcome.factor_activation)
    return Extracted(model=slim, kept=kept, info=info, local_kept=outcome.kept)


def finish_on_rank_zero(method: CompressionMethod, model, rank: int, broadcast, calibration=None) -> Extracted:
    """End a compress stage where only rank 0 holds the tables of record (trainer=torchrec: the other ranks'
    `model` has meta tables, `DLRM.holds_tables`). Rank 0 calibrates (on `calibration`, which should be the
    batches of every rank: `CTRDataModule.global_train_batches`), finishes and extracts alone; every rank
    then gets its structure, `Kept`, figures and every weight but the tables (`broadcast(obj) -> obj`, from
    rank 0; a collective), and the other ranks build that model with meta tables. The structure is rank 0's
    by construction, as under `finish_and_extract`'s `agree`."""
    from ..models.family import family_of_structure

    result = None
    payload = None
    if rank == 0:
        try:
            with alone():
                result = finish_and_extract(method, model, calibration=calibration)
        except Exception as err:
            broadcast({"error": f"{type(err).__name__}: {err}"})  # the others stop too, instead of waiting
            raise
        slim = result.model
        tables = set(slim.table_keys())
        payload = {"structure": slim.structure.to_dict(), "kept": result.kept.to_dict(), "info": result.info,
                   "sparse_grad": slim.sparse_grad,
                   "state": {k: v.detach().cpu() for k, v in slim.state_dict().items() if k not in tables}}
    payload = broadcast(payload)
    if rank == 0:
        return result
    if "error" in payload:
        raise RuntimeError(f"rank 0 failed to finish the compress stage ({method.name}): {payload['error']}")
    family = family_of_structure(payload["structure"])  # the model's family (`models.family`)
    slim = family.build(family.structure_from_dict(payload["structure"]), sparse_grad=payload["sparse_grad"],
                        hold_tables=False)
    if "dim_gate" in payload["state"]:
        slim.enable_dim_gate()
    # assign: rank 0's tensors as they are, strides too (DDP checks that every rank's parameters match).
    slim.load_state_dict(payload["state"] | slim.table_placeholders(), assign=True)
    slim.train(model.training)
    kept = Kept.from_dict(payload["kept"])
    return Extracted(model=slim, kept=kept, info=payload["info"], local_kept=kept)
