"""Which bit width each table is stored at, and what that leaves to pruning under one bytes budget.

A `BitsPlan` says the stored width of every table (32, 16, 8, 4; `quant.rowwise`) and of the dense layers' weights
(32, or 16: fp16 storage, fp32 arithmetic). It is decided once, on the pretrained dense model (the `bits` stage):

  fixed   `tables: 8` (or 4, 16, 32, or {feature: width}): what the user wrote.
  auto    per table: first the lowest uniform width w ∈ {16, 8, 4} whose post-training quantization costs at most
          `tolerance` of held-out logloss (the mean over the first validation batches), Δ_w = logloss(PTQ_w) −
          logloss(fp32); 32 when none is free. Then, where that is above 4 bits, table by table lower: each
          table's next width is measured alone, and the steps are taken in order of bytes saved per logloss cost,
          each kept only while the whole plan's Δ stays within `tolerance` (`_lower_per_table`). So bits are spent
          first where they are free, a sensitive table keeps its width without holding the others back, and pruning
          pays for the rest. The dense Linears go to fp16 storage on the same test.

Under `budget.bytes = B` (a fraction of the fp32 dense model's stored bytes) the pruning stages then get a params
budget: the fraction p of the model's parameters that, stored at the plan's widths, fits B,

    p = B · bytes_fp32(dense) / bytes_plan(dense)    (int4 rows: plus half a byte each, `params_budget`),

in parameters priced by their storage: a table parameter counts its bytes over a dense-layer parameter's
(`param_weights`), and a live table its rows' scale and bias (`row_weights`: a cost only removing the feature
saves), so the pruning removes what is cheapest in bytes to lose. Where the stored model is still over B (the
parameters outside Linears and tables), the `quantize` stage completes: while the quantized model is over B it
lowers one table's width (16 → 8 → 4) at a time, the one that saves the most bytes per unit of held-out
logloss it costs, and reports each such step as forced (`complete_to_budget`). A plan that cannot meet B even at
int4 everywhere is reported unmet, never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .apply import dense_to_half, model_bytes, quantize_tables
from .rowwise import META_BYTES, check_bits, storage_bytes

AUTO_WIDTHS = (16, 8, 4)
LOWER = {32: 16, 16: 8, 8: 4}  # a table's next width down
DENSE = "(dense Linears)"  # a completion step that stores the Linears at fp16
DENSE_WIDTHS = (32, 16)


@dataclass
class BitsPlan:
    """tables {feature name: width}; dense 32 or 16; how "fixed" or "auto"; probe {width: held-out Δlogloss} of the
    auto choice (empty when fixed)."""

    tables: dict[str, int]
    dense: int = 32
    how: str = "fixed"
    probe: dict = field(default_factory=dict)  # {width: Δ} and "dense16": Δ of fp16 Linears

    def on(self, model: nn.Module) -> BitsPlan:
        """The plan restricted to the tables `model` still has (pruning may have removed features)."""
        names = set(model.sparse.feature_names)
        return BitsPlan({n: w for n, w in self.tables.items() if n in names}, self.dense, self.how, dict(self.probe))

    def to_dict(self) -> dict:
        return {"tables": dict(self.tables), "dense": self.dense, "how": self.how,
                "probe": {str(k): v for k, v in self.probe.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> BitsPlan:
        return cls({k: int(v) for k, v in d["tables"].items()}, int(d.get("dense", 32)), d.get("how", "fixed"),
                   {int(k) if k.isdigit() else k: float(v) for k, v in (d.get("probe") or {}).items()})


def check_widths(tables, dense, where: str) -> None:
    """ValueError naming `where` for a width outside the allowed ones ("auto" allowed for tables)."""
    values = list(tables.values()) if isinstance(tables, dict) else [tables]
    for value in values:
        if value == "auto" and not isinstance(tables, dict):
            continue
        try:
            check_bits(int(value)) if not isinstance(value, bool) else check_bits(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key `{where}.tables` must be 32, 16, 8, 4, auto or {{feature: width}}, "
                             f"got {value!r}") from None
    if dense not in DENSE_WIDTHS:
        raise ValueError(f"config key `{where}.dense` must be 32 or 16, got {dense!r}")


def apply_plan(model: nn.Module, plan: BitsPlan) -> nn.Module:
    """A copy of `model` stored as `plan` says (tables quantized, dense Linears fp16 when plan.dense is 16)."""
    out = quantize_tables(model, plan.tables)
    return dense_to_half(out, torch.float16) if plan.dense == 16 else out


def planned_bytes(model: nn.Module, plan: BitsPlan) -> int:
    """Stored bytes of `model` under `plan`, without quantizing it: each table at its width (`storage_bytes`), the
    rest as `model_bytes` counts it, Linear weights and biases at 2 bytes when plan.dense is 16."""
    sparse = model.sparse
    tables = sum(storage_bytes(t.num_embeddings, t.embedding_dim, plan.tables.get(name, 32))
                 for name, t in sparse.tables.items())
    rest = model_bytes(model)["dense"]
    if plan.dense == 16:
        linear = sum(p.numel() for name, m in model.named_modules() if type(m) is nn.Linear
                     and not name.startswith("sparse.") for p in m.parameters())
        rest -= 2 * linear
    return tables + rest


@torch.no_grad()
def holdout_logloss(model: nn.Module, batches: list[tuple]) -> float:
    """Mean logloss of `model` (eval mode for the call) over `batches` of (dense, sparse, labels)."""
    was = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for dense, sparse, labels in batches:
            logits = model(dense, sparse)
            total += float(F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum"))
            count += labels.numel()
    finally:
        model.train(was)
    return total / max(count, 1)


def choose_plan(model: nn.Module, tables, dense: int, batches: list[tuple], tolerance: float) -> BitsPlan:
    """The plan of a `bits` stage (module docstring): fixed widths as given, or "auto" by the held-out probe."""
    names = list(model.sparse.feature_names)
    if tables != "auto":
        widths = {n: int(tables.get(n, 32)) for n in names} if isinstance(tables, dict) \
            else {n: int(tables) for n in names}
        return BitsPlan(widths, dense, "fixed")
    base = holdout_logloss(model, batches)
    probe = {w: holdout_logloss(quantize_tables(model, w), batches) - base for w in AUTO_WIDTHS}
    free = [w for w in AUTO_WIDTHS if probe[w] <= tolerance]
    width = min(free) if free else 32
    widths = _lower_per_table(model, {n: width for n in names}, batches, base, tolerance)
    if widths != {n: width for n in names}:
        probe["per_table"] = holdout_logloss(quantize_tables(model, widths), batches) - base
    if dense == 32:  # fp16 storage of the Linears too, where that is free on the same held-out rows
        half = holdout_logloss(dense_to_half(model, torch.float16), batches) - base
        probe["dense16"] = half
        dense = 16 if half <= tolerance else 32
    return BitsPlan(widths, dense, "auto", probe)


def _lower_per_table(model: nn.Module, widths: dict[str, int], batches: list[tuple], base: float, tolerance: float
                     ) -> dict[str, int]:
    """`widths` with tables lowered one step at a time (32 → 16 → 8 → 4) while the plan's held-out Δlogloss against
    the float model (`base`) stays within `tolerance`. In rounds: each table's next step is measured alone against
    the round's plan, then the steps are tried in order of bytes saved per logloss cost, each kept only if the
    whole plan's measured Δ is still within `tolerance`; a round that keeps none ends it. At most 2 quantized
    models a table a round, a round a width level, about."""
    while True:
        movable = [n for n, w in widths.items() if w in LOWER]
        if not movable:
            return widths
        steps = {name: BitsPlan({**widths, name: LOWER[widths[name]]}) for name in movable}
        kept = False
        for _, name, _, _ in _ranked_steps(model, BitsPlan(dict(widths)), steps, batches, planned_bytes):
            step = {**widths, name: LOWER[widths[name]]}
            if holdout_logloss(quantize_tables(model, step), batches) - base <= tolerance:
                widths, kept = step, True
        if not kept:
            return widths


def _ranked_steps(model: nn.Module, now: BitsPlan, trials: dict[str, BitsPlan], batches: list[tuple], bytes_of
                  ) -> list[tuple[float, str, int, float]]:
    """[(bytes saved per held-out logloss cost, key, bytes saved, cost)] of each one-step plan of `trials` against
    `now`, the best first (a free step first); a step that saves nothing is left out. One stored model a candidate."""
    size, base = bytes_of(model, now), holdout_logloss(apply_plan(model, now), batches)
    ranked = []
    for key, trial in trials.items():
        saved = size - bytes_of(model, trial)
        cost = holdout_logloss(apply_plan(model, trial), batches) - base
        if saved > 0:
            ranked.append((saved / max(cost, 1e-12), key, saved, cost))
    return sorted(ranked, key=lambda r: r[0], reverse=True)


def loosest_plan(model: nn.Module, tables, dense: int) -> BitsPlan:
    """The plan a `bits` stage with these options stores `model` at, or for `tables: auto` the lowest it could choose
    (every table at 4 bits, the Linears at fp16): what a config check before the data assumes."""
    if tables == "auto":
        return BitsPlan({n: AUTO_WIDTHS[-1] for n in model.sparse.feature_names}, DENSE_WIDTHS[-1], "auto")
    return choose_plan(model, tables, dense, [], 0.0)


def param_weights(plan: BitsPlan) -> dict[str, float]:
    """{table: the bytes of one of its values over one dense-layer parameter's} under `plan` (int8 beside fp32
    Linears: 0.25): how a bytes budget prices the pruning (`compression.resource.table_param_weights`)."""
    dense = 4.0 if plan.dense == 32 else 2.0
    return {name: (bits / 8.0) / dense for name, bits in plan.tables.items()}


def row_weights(plan: BitsPlan) -> dict[str, float]:
    """{table: a live table's bytes per row beyond its columns, over one dense-layer parameter's}: the fp16 scale
    and bias of an integer width (4 bytes), and at 4 bits up to half a byte of padding (a pruned table's width may be
    odd) (`compression.resource.table_row_weights`); 0 at 16 and 32 bits."""
    dense = 4.0 if plan.dense == 32 else 2.0
    return {name: (META_BYTES + (0.5 if bits == 4 else 0.0)) / dense if bits < 16 else 0.0
            for name, bits in plan.tables.items()}


def params_budget(dense_model: nn.Module, plan: BitsPlan, budget_bytes: float, reserve: int = 0) -> float:
    """p = (B · bytes_fp32(dense) − reserve) / priced(dense), capped at 1 (the widths alone meet B): the share of the
    dense model's priced parameters that fits B. priced = its stored bytes at the plan's widths plus the half byte a
    row `row_weights` reserves for int4 padding, so that a pruned model within p is within B; `reserve` the served
    files' own bytes (`quant.served.reserve_bytes`), held back from B."""
    padding = sum(0.5 * t.num_embeddings for name, t in dense_model.sparse.tables.items()
                  if plan.tables.get(name, 32) == 4)
    room = budget_bytes * model_bytes(dense_model)["total"] - reserve
    return min(1.0, max(room, 0.0) / (planned_bytes(dense_model, plan) + padding))


def complete_to_budget(model: nn.Module, plan: BitsPlan, limit_bytes: float, batches: list[tuple],
                       bytes_of=planned_bytes) -> tuple[BitsPlan, list[dict]]:
    """Lower table widths one step at a time (32 → 16 → 8 → 4), or the dense Linears' 32 → 16, until `model`
    stored under the plan is at most `limit_bytes`. In rounds: each round measures, for every table that can go
    lower (and the Linears), the held-out logloss its one step costs against the round's plan (one quantized model
    per candidate), then takes the steps in order of bytes
    saved per logloss cost (a free step first) until the limit is met. Returns the new plan and the steps taken
    ({table, from, to, bytes_saved, delta_logloss}); the plan may still be over the limit when every table is at 4
    bits (the caller reports it unmet). `bytes_of(model, plan)`: the bytes held to the limit (the stored model's by
    default; the largest served file's, `quant.served.largest_served`, under a run's exports)."""
    tables = dict(plan.tables)
    dense = plan.dense
    steps: list[dict] = []

    def plan_of(widths: dict[str, int]) -> BitsPlan:
        return BitsPlan(dict(widths), dense, plan.how, dict(plan.probe))

    while bytes_of(model, plan_of(tables)) > limit_bytes:
        lowerable = [n for n, w in tables.items() if w in LOWER]
        if not lowerable and dense == 16:
            break
        trials = {DENSE: BitsPlan(dict(tables), 16, plan.how, dict(plan.probe))} if dense == 32 else {}
        trials.update({name: plan_of({**tables, name: LOWER[tables[name]]}) for name in lowerable})
        ranked = _ranked_steps(model, plan_of(tables), trials, batches, bytes_of)
        if not ranked:
            break
        for _, name, saved, cost in ranked:
            if name == DENSE:
                steps.append({"table": DENSE, "from": 32, "to": 16, "bytes_saved": int(saved), "delta_logloss": cost})
                dense = 16
            else:
                steps.append({"table": name, "from": tables[name], "to": LOWER[tables[name]],
                              "bytes_saved": int(saved), "delta_logloss": cost})
                tables[name] = LOWER[tables[name]]
            if bytes_of(model, plan_of(tables)) <= limit_bytes:
                break
    return plan_of(tables), steps
