"""UMEC as a compression method: the ADMM of `admm.py` behind the `CompressionMethod` interface.

During training, after every optimizer step: the prox on the weights and the s, y, z updates
(`UMEC.step`). At the end: the ceil(s_l) smallest groups of every set, completed to the budget (or
un-pruned where ADMM overshot) by `selection.select_groups`, as a `Kept`.

What the completion ranks by (`enforce_score`, an `importance` part) matters whenever ADMM has not met the
budget by itself (a short stage, small data). Group norms say little about usefulness across sets: on the
real Criteo sample the dense block's top-MLP columns have a small norm per FLOP saved, so norm ranking
dropped the whole bottom MLP (docs/methods.md, "How a UMEC stage ends"). The default, Taylor, measures on
`calibration_batches` training batches after ADMM each group's first-order loss change estimate
(Σ_batches (Σ_{w in g} ∂ℓ/∂w · w)², Molchanov et al. 2019): one unit (loss) for every set, so "least loss
per unit of resource saved" compares a feature with a neuron. Norm keeps ADMM's own ranking, each set's
(weighted) norms in units of its scale c_l (the behaviour before; the paper has no completion step). Both
are given like `admm.group_score`: by `_target_` (`{_target_: umec_lightning.compression.importance.Taylor}`)
or by short name (`taylor`, `norm`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .admm import UMEC, ADMMConfig
from .importance import GRADIENTS, HOLDOUT, Importance, global_batch_scores, resolve  # noqa: F401 (re-export)
from .method import CompressionMethod, Outcome, model_device
from .resource import check_group_budgets

log = logging.getLogger(__name__)

ENFORCE_SCORES = ("taylor", "norm")  # the `importance` parts the completion can rank by (their short names)
# Extraction doing more than this share of a budget's reduction is reported as a warning: ADMM did not
# converge to the budget (too few steps, too small η4) and the structure is mostly the completion's.
FORCED_SHARE_WARNING = 0.1


class UMECMethod(CompressionMethod):
    """groups: the group kinds to prune jointly (subset of feature, neuron, dim, pair); admm: the keyword
    arguments of `ADMMConfig` (η2..η4, s optimizer, normalisation; η1 is the SGD lr of each step);
    enforce_budget: complete ADMM's masks to the budget at the end; enforce_score: what that completion
    ranks groups by (an `importance` part, Taylor or Norm, or its short name; module docstring);
    calibration_batches: training batches the Taylor scores are measured on."""

    name = "umec"

    def __init__(self, groups, admm: dict | None = None, enforce_budget: bool = True,
                 enforce_score: str | Importance = "taylor", calibration_batches: int = 20):
        self.kinds = set(groups)
        self.admm_args = dict(admm or {})
        self.enforce_budget = enforce_budget
        self.completion_score = resolve(enforce_score, "mode.method.enforce_score", ENFORCE_SCORES).fresh()
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) \
                or calibration_batches < 1:
            raise ValueError(f"config key `mode.method.calibration_batches` must be a positive integer, "
                             f"got {calibration_batches!r}")
        self.enforce_score = self.completion_score.name  # the short name, for reports
        measured = GRADIENTS in self.completion_score.feeds
        self.calibration_batches = calibration_batches if enforce_budget and measured else 0
        self.umec: UMEC | None = None
        self._stats = None
        self._holdout = None  # callable -> held-out batches (`set_holdout`), for group_score=holdout
        ADMMConfig(budgets={"flops": 1.0}, **self.admm_args)  # unknown or bad keys fail before any work

    def _config(self, budgets: dict[str, float]) -> ADMMConfig:
        return ADMMConfig(budgets={"flops": budgets.get("flops"), "params": budgets.get("params")},
                          **self.admm_args)

    def check(self, model, budgets: dict[str, float]) -> None:
        config = self._config(budgets)
        check_group_budgets(model, self.kinds, budgets, dim_block=config.dim_block)

    def setup(self, model, budgets: dict[str, float]) -> None:
        super().setup(model, budgets)
        self.umec = UMEC(model, self.kinds, self._config(budgets))
        self.completion_score.reset()

    def to(self, device) -> None:
        self.umec.to(device)
        self.completion_score.to(self.umec.packed.device)

    def begin(self, total_steps: int) -> None:
        self.umec.begin(total_steps)

    def after_backward(self, model) -> None:
        self.umec.observe_gradients()

    def set_optimizer(self, optimizer) -> None:
        """The torch optimizer of the stage (admm.prox_step=adaptive reads its per-weight step sizes)."""
        self.umec.set_optimizer(optimizer)

    def set_holdout(self, batches) -> None:
        """A callable returning held-out (dense, sparse, label) batches, for group_score=holdout."""
        self._holdout = batches

    def after_step(self, model, lr: float) -> None:
        umec = self.umec
        if HOLDOUT in umec.importance.feeds and umec.warming_up and umec.warm == umec.warmup - 1:
            # The feature set's held-out loss increase when held at the mean, before the warm-up's last step.
            batches = self._holdout() if self._holdout is not None else None
            umec.importance.observe_holdout(model, umec.packed, batches)
        # Tensors only: read (host sync) every n steps by `log_values`.
        self._stats = umec.step(lr)

    def log_values(self) -> dict[str, float]:
        if self._stats is None:
            return {}
        values = self.umec.log_values(self._stats)
        values.update(self.feature_scores())
        return values

    def feature_scores(self) -> dict[str, float]:
        """`feature_score/<feature>`: each feature group's score as ADMM ranks it now (its norm, weighted
        under group_score=taylor, in units of the set's scale c_l); the lowest go first."""
        umec = self.umec
        row = umec.feature_row
        if row is None:
            return {}
        gs = umec.sets[row]
        scores = (umec.packed.norms()[row, : gs.num_groups] / umec._norm_scale[row]).tolist()
        return {f"feature_score/{label}": float(v) for label, v in zip(gs.labels, scores)}

    def pruned_features(self) -> list[str]:
        return self._feature_labels(self.umec.pruned_masks())

    def _feature_labels(self, masks) -> list[str]:
        row = self.umec.feature_row
        if row is None:
            return []
        features = self.umec.sets[row]
        return [label for label, gone in zip(features.labels, masks[features.name].tolist()) if gone]

    def state_dict(self) -> dict:
        return self.umec.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.umec.load_state_dict(state)

    def state_vector(self) -> list[float]:
        """s, y, z, the step and Adam's moments as one list (per-rank records under DDP)."""
        return [float(v) for v in self.umec.state.flat().tolist()]

    # ---- the completion's scores ---------------------------------------------------------------------
    def observe(self, model, batch) -> None:
        """Feed the completion's part (Taylor) one batch: every group's unsquared sum Σ_{w in g} ∂ℓ/∂w·w
        (gradients of the plain loss, the weights' own `.grad` untouched); its scores square and add them over
        the batches, averaged over DDP ranks first (`importance.global_batch_scores`)."""
        sources = self.umec.packed.slice_sources
        params = list({id(p): p for p, _ in sources}.values())
        with torch.enable_grad():
            loss = F.binary_cross_entropy_with_logits(model(batch.dense, batch.sparse), batch.label)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        by_param = {id(p): g for p, g in zip(params, grads)}
        self.completion_score.observe(self.umec.packed, lambda param: by_param.get(id(param)), rank_local=True)

    def finish(self, model) -> Outcome:
        self.to(model_device(model))
        scores = self.completion_score.scores(self.umec.packed) if self.enforce_budget else None
        if scores is not None and not self.completion_score.measured:
            scores = self.umec.in_set_units(scores)  # norms: each set in units of its scale c_l, as ADMM ranks
        masks, done = self.umec.final_pruned_masks(enforce_budget=self.enforce_budget, scores=scores)
        info = {"admm_steps": int(self.umec.state.step)}
        info.update(self._completion_report(done))
        return Outcome(kept=self.umec.kept(masks), info=info)

    def _completion_report(self, done: dict) -> dict:
        """What ADMM reached by itself and what the completion changed, in figures for summary.json."""
        packed = self.umec.packed
        admm, final = done["admm_pruned"], done["pruned"]
        after_admm = self.umec.resource_of(packed.to_dict(admm))
        after = self.umec.resource_of(packed.to_dict(final))
        forced, restored = packed.to_dict(final & ~admm), packed.to_dict(admm & ~final)
        budgets = {b: v for b, v in self.umec.budgets.items() if v is not None}
        # The share of each budget's reduction (1 → final) that the completion, not ADMM, made.
        share = max([max(0.0, after_admm[b] - after[b]) / max(1e-12, 1.0 - after[b]) for b in budgets] or [0.0])
        reached = all(after_admm[b] <= v + 1e-9 for b, v in budgets.items())
        # Without the completion the budget is ADMM's target only (cascaded's first stage): nothing met it else.
        report = {
            "budget_met_by": "admm" if reached else ("extraction" if self.enforce_budget else None),
            "resource_after_admm": {b: round(float(after_admm[b]), 6) for b in ("flops", "params")},
            "extra_groups_pruned_at_extraction": int(done["pruned_to_meet_budget"]),
            "groups_restored_at_extraction": int(done["restored_under_budget"]),
            "features_forced_at_extraction": self._feature_labels(forced),
            "features_restored_at_extraction": self._feature_labels(restored),
            "forced_share_of_reduction": round(share, 4),
            "enforce_score": self.enforce_score if self.enforce_budget else None,
        }
        log.info("ADMM ended at %s (budgets %s): the extraction pruned %d more groups%s and restored %d",
                 ", ".join(f"{b} {after_admm[b]:.3f}" for b in budgets), budgets,
                 report["extra_groups_pruned_at_extraction"],
                 f" (features {', '.join(report['features_forced_at_extraction'])})"
                 if report["features_forced_at_extraction"] else "", report["groups_restored_at_extraction"])
        if share > FORCED_SHARE_WARNING:
            report["warning"] = (f"ADMM did not reach the budget: {share:.0%} of the reduction was forced at "
                                 f"extraction (ranked by {self.enforce_score}); run the compress stage longer "
                                 "(phases.compress_epochs / phases.compress_steps) or raise admm.eta_z")
            log.warning(report["warning"])
        return report
