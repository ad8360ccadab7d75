"""The stage list of a mode, as data: parsing `mode.stages` with every default filled in, and each stage's budget.

A mode says e.g. `stages: [pretrain, compress, finetune]`, or with per-stage keys
`{kind: compress, name: select, epochs: 0, method: {...}, reduction_share: 0.2}` (cascaded). Defaults:
`name` = kind, `epochs` = `phases.<kind>_epochs` (scratch, or `epochs: total`: the sum of all three),
`method` = `mode.method`, `reduction_share` = 1 (the stage meets the final budget; 0.2 = it makes 20 % of the
reduction, i.e. budget 1 − 0.2·(1 − b)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..compression.method import CompressionMethod
from ..config import ConfigError, early_stopping_config
from ..models import DLRM, measure
from .optimizer import optimizer_factory

STAGE_KINDS = ("pretrain", "compress", "finetune", "scratch", "bits", "quantize")
EARLY_STOPPING_KINDS = ("pretrain", "finetune")  # compress: the method's schedule; scratch: equal epochs
_EPOCH_KEYS = {"pretrain": "pretrain_epochs", "compress": "compress_epochs", "finetune": "finetune_epochs"}


@dataclass
class Stage:
    kind: str
    name: str
    epochs: int
    method: DictConfig | None = None  # compress / scratch: the method's config (`_target_` + arguments)
    reduction_share: float = 1.0
    early_stopping: dict | None = None  # {patience, min_delta} (pretrain / finetune with it on), else None
    steps: int | None = None  # compress: optimizer steps instead of `epochs` (None: epochs decide)
    # bits: {tables, dense, tolerance} (`stages.quantize`); finetune: {qat: bool}
    options: dict = field(default_factory=dict)

    def make_method(self) -> CompressionMethod:
        try:
            method = instantiate(self.method)
        except Exception as err:  # noqa: BLE001 - Hydra wraps every constructor error the same way
            cause = err.__cause__ or err
            raise ConfigError(f"config key `mode.method` (stage {self.name}): {cause}") from None
        if not isinstance(method, CompressionMethod):
            raise ConfigError(f"config key `mode.method._target_` (stage {self.name}): "
                              f"{type(method).__name__} is not a CompressionMethod")
        return method


def parse_stages(cfg: DictConfig) -> list[Stage]:
    """The mode's stage list with every default filled in; ConfigError naming the key on a bad entry. Also builds
    the optimizer once (`optim`: a bad argument fails here, before any work)."""
    raw = cfg.mode.get("stages")
    if not raw:
        raise ConfigError("config key `mode.stages` must list the stages of the mode, e.g. [pretrain]")
    optimizer_factory(cfg)  # what `config.validate_config` cannot say: that torch builds it
    early_stopping = early_stopping_config(cfg)
    phases = cfg.phases
    stages: list[Stage] = []
    for i, item in enumerate(raw):
        where = f"mode.stages[{i}]"
        item = {"kind": item} if isinstance(item, str) else OmegaConf.to_container(item, resolve=True)
        kind = item.get("kind")
        if kind not in STAGE_KINDS:
            raise ConfigError(f"config key `{where}.kind` must be one of {', '.join(STAGE_KINDS)}, got {kind!r}")
        unknown = set(item) - {"kind", "name", "epochs", "steps", "method", "reduction_share"} - set(_OPTIONS[kind])
        if unknown:
            raise ConfigError(f"config key `{where}`: unknown keys {sorted(unknown)}")
        options = _stage_options(kind, item, where)
        total = sum(int(phases[k]) for k in _EPOCH_KEYS.values())
        default_epochs = 0 if kind in ("bits", "quantize") else total if kind == "scratch" \
            else int(phases[_EPOCH_KEYS[kind]])
        epochs = item.get("epochs", default_epochs)
        if epochs == "total":  # as many epochs as a compressed run trains in all (equal-epochs controls)
            epochs = total
        if not isinstance(epochs, int) or epochs < 0:
            raise ConfigError(f"config key `{where}.epochs` must be an integer >= 0, got {epochs!r}")
        method = None
        if kind in ("compress", "scratch"):
            method = OmegaConf.create(item["method"]) if "method" in item else cfg.mode.get("method")
            if method is None or "_target_" not in method:
                raise ConfigError(f"config key `mode.method`: stage {where} ({kind}) needs a method with a `_target_`")
        steps = item.get("steps", phases.get("compress_steps") if kind == "compress" else None)
        if steps is not None and kind != "compress":
            raise ConfigError(f"config key `{where}.steps`: only a compress stage runs for a number of steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            key = f"{where}.steps" if "steps" in item else "phases.compress_steps"
            raise ConfigError(f"config key `{key}` must be an integer >= 0 (optimizer steps) or null, got {steps!r}")
        share = item.get("reduction_share", 1.0)
        if not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(f"config key `{where}.reduction_share` must be in (0, 1], got {share!r}")
        stages.append(Stage(kind, item.get("name", kind), epochs, method, float(share),
                            early_stopping if kind in EARLY_STOPPING_KINDS else None, steps, options))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key `mode.stages`: stage names must be distinct, got {names}")
    if stages[0].kind != "pretrain":
        raise ConfigError("config key `mode.stages`: the first stage must be `pretrain` (the dense reference)")
    _check_quant_order(stages, cfg)
    return stages


# Per-kind stage keys beyond the shared ones, with their defaults.
_OPTIONS = {"bits": {"tables": 8, "dense": 32, "tolerance": 0.001}, "finetune": {"qat": False}}
_OPTIONS.update({k: {} for k in STAGE_KINDS if k not in _OPTIONS})


def _stage_options(kind: str, item: dict, where: str) -> dict:
    from ..quant.plan import check_widths

    options = {k: item.get(k, default) for k, default in _OPTIONS[kind].items()}
    if kind == "bits":
        try:
            check_widths(options["tables"], options["dense"], where)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        tol = options["tolerance"]
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
            raise ConfigError(f"config key `{where}.tolerance` must be a held-out logloss >= 0, got {tol!r}")
    if kind == "finetune" and not isinstance(options["qat"], bool):
        raise ConfigError(f"config key `{where}.qat` must be true or false, got {options['qat']!r}")
    return options


def _check_quant_order(stages: list[Stage], cfg: DictConfig) -> None:
    """A `quantize` stage is last and has a `bits` stage before it; a `qat` finetune has one too; `tables: auto`
    and `budget.bytes` go together with a `bits` stage."""
    kinds = [s.kind for s in stages]
    first_bits = kinds.index("bits") if "bits" in kinds else None
    for i, stage in enumerate(stages):
        needs_bits = stage.kind == "quantize" or stage.options.get("qat")
        if needs_bits and (first_bits is None or first_bits > i):
            raise ConfigError(f"config key `mode.stages[{i}]`: stage {stage.name} needs a `bits` stage before it "
                              "(the widths it stores or trains at)")
        if stage.kind == "quantize" and i != len(stages) - 1:
            raise ConfigError(f"config key `mode.stages[{i}]`: a quantize stage must be the last (its weights are "
                              "codes: nothing trains after it)")



def stage_budget(cfg: DictConfig, stage: Stage, bytes_as_params: float | None = None) -> dict[str, float]:
    """The stage's budgets as fractions of the *dense* model: 1 − share·(1 − b) for every budget b set.

    `budget.bytes` prunes as a params budget: `bytes_as_params` (the fraction of params that fits it at the planned
    widths, `quant.plan.params_budget`), or the bytes fraction itself for a float model (4 bytes a param); the
    tighter of it and `budget.params` where both are set."""
    raw = {k: float(cfg.budget[k]) for k in ("flops", "params") if cfg.budget.get(k) is not None}
    if cfg.budget.get("bytes") is not None:
        as_params = float(cfg.budget.bytes) if bytes_as_params is None else bytes_as_params
        raw["params"] = min(raw.get("params", 1.0), as_params)
    return {k: 1 - stage.reduction_share * (1 - b) for k, b in raw.items()}


def relative_budget(budget: dict[str, float], dense_cost, model: DLRM) -> dict[str, float]:
    """Budgets as fractions of `model` (a method sees its input model as "dense")."""
    cost = measure(model)
    now = {"flops": cost.flops / dense_cost.flops, "params": cost.params / dense_cost.params}
    return {k: b / now[k] for k, b in budget.items()}
