"""UMEC as a compression method: the ADMM of `admm.py` behind the `CompressionMethod` interface.

During training, after every optimizer step: the prox on the weights and the s, y, z updates
(`UMEC.step`). At the end: the ceil(s_l) smallest groups of every set, completed to the budget (or
un-pruned where ADMM overshot) by `selection.select_groups`, as a `Kept`.
"""

from __future__ import annotations

from .admm import UMEC, ADMMConfig
from .method import CompressionMethod, Outcome, model_device
from .resource import check_group_budgets


class UMECMethod(CompressionMethod):
    """groups: the group kinds to prune jointly (subset of feature, neuron, dim, pair); admm: the keyword
    arguments of `ADMMConfig` (η2..η4, s optimizer, normalisation; η1 is the SGD lr of each step)."""

    name = "umec"

    def __init__(self, groups, admm: dict | None = None, enforce_budget: bool = True):
        self.kinds = set(groups)
        self.admm_args = dict(admm or {})
        self.enforce_budget = enforce_budget
        self.umec: UMEC | None = None
        self._stats = None
        ADMMConfig(budgets={"flops": 1.0}, **self.admm_args)  # unknown or bad keys fail before any work

    def _config(self, budgets: dict[str, float]) -> ADMMConfig:
        return ADMMConfig(budgets={"flops": budgets.get("flops"), "params": budgets.get("params")},
                          **self.admm_args)

    def check(self, model, budgets: dict[str, float]) -> None:
        self._config(budgets)
        check_group_budgets(model, self.kinds, budgets)

    def setup(self, model, budgets: dict[str, float]) -> None:
        super().setup(model, budgets)
        self.umec = UMEC(model, self.kinds, self._config(budgets))

    def to(self, device) -> None:
        self.umec.to(device)

    def after_step(self, model, lr: float) -> None:
        # Tensors only: read (host sync) every n steps by `log_values`.
        self._stats = self.umec.step(lr)

    def log_values(self) -> dict[str, float]:
        return {} if self._stats is None else self.umec.log_values(self._stats)

    def pruned_features(self) -> list[str]:
        features = next((gs for gs in self.umec.sets if gs.kind == "feature"), None)
        if features is None:
            return []
        mask = self.umec.pruned_masks()[features.name].tolist()
        return [label for label, gone in zip(features.labels, mask) if gone]

    def state_dict(self) -> dict:
        return self.umec.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.umec.load_state_dict(state)

    def state_vector(self) -> list[float]:
        """s, y, z, the step and Adam's moments as one list (per-rank records under DDP)."""
        return [float(v) for v in self.umec.state.flat().tolist()]

    def finish(self, model) -> Outcome:
        self.umec.to(model_device(model))
        masks, extra = self.umec.final_pruned_masks(enforce_budget=self.enforce_budget)
        info = {"admm_steps": int(self.umec.state.step),
                "extra_groups_pruned_at_extraction": extra,
                "groups_restored_at_extraction": self.umec.restored_groups}
        return Outcome(kept=self.umec.kept(masks), info=info)
