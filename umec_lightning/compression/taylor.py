"""Taylor pruning (TP; Molchanov et al. 2019): prune the groups whose removal changes the loss least.

The first-order Taylor estimate of the loss change when group g is zeroed is Σ_{w in g} (∂ℓ/∂w)·w; its
square, accumulated over minibatches, is the importance (`importance.Taylor`, fed after every backward)

    I_g = Σ_batches ( Σ_{w in g} grad·w )²

(`after_backward`; a slice shared by several groups, e.g. a `dot` pair column, counts in each). Under `dot`
a dimension group is its dim-gate entry, whose grad·gate is exactly the Taylor term of zeroing that
dimension everywhere. Before selection each set's importances are put in units of their mean
(`normalise_by_set`), which also makes them blind to a constant gradient scale (loss scaling, batch size).

Iterative, as in the paper: every `steps_per_round` optimizer steps, rounds r = 1 .. rounds − 1 prune to
the intermediate budget 1 − (r / rounds)·(1 − budget) of every resource (`select_groups` from the groups
already pruned, which stay pruned, no restoring) and reset the importances; `finish` takes the last step to
the final budget. Pruned groups are zeroed after every optimizer step, so training adapts to their absence
(under `dot` a pruned dim is gate_j = 0). A stage shorter than (rounds − 1)·steps_per_round steps leaves
more of the way to `finish`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .groups import kept_from_masks
from .importance import Taylor as TaylorScore
from .method import Outcome
from .pruning import DEFAULT_GROUPS, GroupPruning, require_budget
from .selection import normalise_by_set, select_groups


class Taylor(GroupPruning):
    """groups: kinds to prune; rounds: pruning rounds (the last at `finish`); steps_per_round: optimizer
    steps between rounds."""

    name = "taylor"

    def __init__(self, groups=DEFAULT_GROUPS, rounds: int = 4, steps_per_round: int = 200,
                 per_resource: bool = False, dim_block: int = 1):
        super().__init__(groups, per_resource, dim_block)
        if rounds < 1 or steps_per_round < 1:
            raise ValueError(f"rounds and steps_per_round must be positive, got {rounds}, {steps_per_round}")
        self.rounds = int(rounds)
        self.steps_per_round = int(steps_per_round)

    def check(self, model, budgets: dict[str, float]) -> None:
        require_budget(budgets, self.name)
        super().check(model, budgets)

    def setup(self, model, budgets: dict[str, float]) -> None:
        super().setup(model, budgets)
        self.score = TaylorScore()  # the importances since the last round
        self.pruned = torch.zeros_like(self.packed.valid)
        self.step = 0
        self._num_pruned = 0  # a host copy of pruned.sum(): re-zeroing is skipped while nothing is pruned

    def _moved(self, device) -> None:
        self.score.to(device)
        self.pruned = self.pruned.to(device)

    @property
    def importance(self) -> Tensor:
        """(S, Gmax) float64: the importances accumulated since the last round (zeros before any)."""
        total = self.score.scores(self.packed)
        if total is None:
            total = torch.zeros(self.packed.num_sets, self.packed.max_groups, dtype=torch.float64,
                                device=self.packed.device)
        return total

    # ---- training hooks --------------------------------------------------------------------------------
    @torch.no_grad()
    def after_backward(self, model) -> None:
        self.score.observe(self.packed)

    @torch.no_grad()
    def after_step(self, model, lr: float) -> None:
        self.step += 1
        if self._num_pruned:
            self.packed.zero_(self.pruned)  # the step moved the zeroed groups: zero them again
        done, at_boundary = divmod(self.step, self.steps_per_round)
        if at_boundary == 0 and done < self.rounds:
            self._prune_round(done)

    def _budgets_at(self, done: int) -> dict[str, float]:
        """The intermediate budgets after `done` of `rounds` rounds: that fraction of the way from 1."""
        return {k: 1.0 - (done / self.rounds) * (1.0 - v) for k, v in self.budgets.items() if v is not None}

    def _scores(self) -> Tensor:
        """Importances in units of their set's mean over the groups still in (the pruned ones are zero)."""
        return normalise_by_set(self.importance, self.packed.valid & ~self.pruned)

    def _prune_round(self, done: int) -> None:
        pruned, _ = select_groups(self.resource, self.packed, self._scores(), self._budgets_at(done),
                                  pruned=self.pruned, restore=False, per_resource=self.per_resource)
        self.pruned = pruned.to(self.packed.device)
        self._num_pruned = int(self.pruned.sum())
        self.packed.zero_(self.pruned)
        self.score.reset()

    # ---- reports and checkpoints -----------------------------------------------------------------------
    def rounds_done(self) -> int:
        return min(self.step // self.steps_per_round, self.rounds - 1)

    def log_values(self) -> dict[str, float]:
        report = self.report(self.pruned)
        return {"resource/flops": report["flops"], "resource/params": report["params"],
                "pruned/groups": float(report["groups_pruned"]), "taylor/rounds_done": float(self.rounds_done())}

    def pruned_features(self) -> list[str]:
        return self.features_of(self.pruned)

    def state_dict(self) -> dict:
        return {"set_names": list(self.packed.names), "importance": self.importance.cpu().clone(),
                "pruned": self.pruned.cpu().clone(), "step": int(self.step)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["set_names"]) != list(self.packed.names):
            raise ValueError(f"Taylor state is for sets {state['set_names']}, this model has {self.packed.names}")
        device = self.packed.device
        self.score.reset()
        self.score.total = state["importance"].to(device=device, dtype=torch.float64).clone()
        self.pruned = state["pruned"].to(device=device, dtype=torch.bool).clone()
        self.step = int(state["step"])
        self._num_pruned = int(self.pruned.sum())

    # ---- the end ---------------------------------------------------------------------------------------
    def finish(self, model) -> Outcome:
        """The last round, to the final budget, with restoring among the groups it prunes only.

        A group zeroed during training is dead (zero weights, so zero importance): bringing it back would
        spend budget on nothing. So its score is −1, below every live group's (scores are ≥ 0): restoring
        reaches one only when no live group fits any more, and re-pruning it afterwards costs no budget.
        """
        self._require_setup(model)
        before = self.pruned.cpu()
        scores = self._scores().masked_fill(self.pruned, -1.0)
        pruned, info = select_groups(self.resource, self.packed, scores, self.budgets, pruned=self.pruned,
                                     per_resource=self.per_resource)
        pruned = pruned.cpu() | before
        kept = kept_from_masks(model, self.sets, self.masks(pruned))
        at_finish = int((pruned & ~before).sum())
        info = {**self.report(pruned), "pruned_in_training": int(before.sum()), "pruned_at_finish": at_finish,
                "restored_under_budget": info["pruned_to_meet_budget"] - at_finish,
                "taylor_steps": int(self.step), "rounds_in_training": self.rounds_done()}
        return Outcome(kept=kept, info=info)
