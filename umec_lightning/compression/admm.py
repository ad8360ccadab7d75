"""UMEC's ADMM (paper eq. 5, Algorithm 1, appendix A.1) as plain PyTorch: no Lightning, no loops over sets.

    min_{W,s} max_{y,z ≥ 0}  ℓ(W) + Σ_l y_l ||W_l||²_{ceil(s_l),2} + Σ_b z_b (R_b(ceil s) − budget_b)

Per training step, right after the optimizer's SGD step on ℓ (`UMEC.step(lr)`):
  1. W: prox of η·y_l·||W_l||²_{k,2}: the k_l = ceil(s_l) groups of smallest norm are divided by
     (1 + 2·η·y_l), the others unchanged (A.1, closed form).
  2. s: g_l = y_l·v_(k_l+1) + Σ_b z_b·(R_b(k_l+1) − R_b(k_l)) (STE: the forward difference of the bottom-k
     norm is the (k+1)-th smallest norm; ∂ceil(s)/∂s = 1, so ∂R/∂s_l is R's finite slope in k_l, with R
     normalised by the dense model); s_l ← clamp(s_l − η2·g_l, 0, G_l − 1), or an Adam step on s.
  3. y_l ← max(0, y_l + η3·||W_l||²_{k_l,2}), the bottom-k norm *after* the prox (Algorithm 1 uses
     W^{t+1}); computed in closed form as the pre-prox bottom-k norm / (1 + 2ηy_l)², exact for the set's
     own prox (shrinking the k smallest keeps them the k smallest); shrinkage by *other* sets sharing a
     slice (a `dot` pair column is in a feature group and a pair group) shows at the next step.
  4. z_b ← max(0, z_b + η4·(R_b(ceil s) − budget_b)), with the masks the prox of this step used
     (budget_b on a ramp from 1 over the first `budget_ramp` ADMM steps, if set; see ADMMConfig).

With `every_n_steps` n > 1 the iteration runs every n-th step only, with η1..η4 times n (see ADMMConfig).

One padded (num_sets, max_groups) grid (`PackedGroups`) and one batched resource call make the step a fixed
number of tensor ops; it returns tensors (no host sync) and the caller decides when to read them.

On CPU, where reading a value costs nothing, the step takes a faster path with the same maths: the group
norms, sort and prox stay torch ops on the weights, while the per-set arithmetic (k, the resource model and
its slopes, the s/y/z updates: a few hundred numbers) runs in NumPy on views of the same memory, and the
prox multiplies only the parameters of sets that it actually shrinks (k_l > 0 and y_l > 0). Both paths agree
up to float rounding (tests/compression/test_admm.py checks it); each is deterministic, so a checkpoint
resumes bit-exactly on the same device type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .groups import GroupSet, PackedGroups, build_group_sets, kept_from_masks
from .importance import HOLDOUT, Importance, resolve
from .kept import Kept
from .prox_step import Preconditioner, group_gain, preconditioner
from .resource import RESOURCES, resource_model
from .selection import select_groups

S_OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("paper", "relative")
PROX_STEPS = ("nominal", "adaptive")
GROUP_SCORES = ("norm", "taylor", "holdout")  # the `importance` parts ADMM can rank by (their short names)


@dataclass
class ADMMConfig:
    """η1..η4 as in the paper (η1 is the prox's step; `UMEC.step(lr)` overrides it with the SGD lr).

    budgets: fraction of the dense model per resource ("flops", "params"); None = unconstrained. Every
    budget that is set gets its own dual z_b.
    """

    eta_w: float = 0.1
    eta_s: float = 0.05
    eta_y: float = 0.1
    eta_z: float = 2.0
    s_optimizer: str = "adam"
    budgets: dict[str, float | None] = field(default_factory=lambda: {"flops": None, "params": None})
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # Measure each set's group norms in units of its mean group norm at the start of ADMM. The paper's
    # penalty y_l·||W_l||²_{k,2} then becomes (y_l / c_l)·||W_l||²_{k,2}: the same problem with rescaled
    # duals, but y·v_(k+1) no longer depends on how many weights a group holds (a `dot` feature group spans
    # dozens of columns, a neuron one row), so the STE gradients of all sets are on one scale against z·∂R/∂s.
    normalize_norms: bool = False
    # Scale set l's s-step by G_l / max_l G_l, so every set moves the same *fraction* of its groups per step
    # (with Adam, otherwise every set moves ≈ eta_s groups per step: a 27-group feature set then loses its
    # groups 19× faster, as a fraction, than a 512-neuron layer).
    s_step_by_set_size: bool = False
    # What ranks groups within a set (which k_l the prox shrinks): an `importance` part, by `_target_` or short
    # name (resolved to the part here). Norm: the group norms (paper). Taylor: the norms weighted per group so
    # that at the end of the warm-up they equal each group's Taylor score (Σ_steps (Σ_{w in g} ∂ℓ/∂w·w)²,
    # Molchanov et al. 2019) scaled to the set's mean norm; the weight is then fixed, so a group's score still
    # shrinks with its weights under the prox. Needs `warmup_steps` > 0. Holdout: as Taylor, but the feature
    # set's scores are each feature's held-out loss increase when held at its mean (measured by the caller,
    # `UMECMethod`, before the warm-up's last step; Taylor where none was). Taylor counts gradient noise as
    # importance.
    group_score: str | Importance = "norm"
    # With a measured group_score and a params budget: rank the input features by score per unit of the params
    # each one frees (1 − R_params with that feature alone removed), as the completion ranks them. Within one
    # set ADMM prunes the k lowest-ranked groups, and tables differ in params by orders of magnitude: ranked by
    # worth alone, input selection cut every small weak table, stalled before the one large table a params
    # budget cannot keep, and left it to the completion (docs/admm_schedule.md measures it).
    # Params only: under FLOPs every sparse feature of a `dot` model costs the same but the dense block, and per
    # FLOP a dense block that a short pretraining has barely learned looks cheapest, so input selection at flops
    # 0.9 cut it though it carries planted signal (tests/pipeline/test_input_selection.py).
    feature_cost: bool = False
    # Optimizer steps at the start of the stage without ADMM (no prox, no s/y/z update): training goes on and,
    # with group_score=taylor, the scores are measured. An int counts steps; a float in (0, 1) is a fraction
    # of the stage's steps (`UMEC.begin(total_steps)` resolves it; until then it counts as 1 step).
    warmup_steps: int | float = 0
    # ADMM steps over which the budget the dual z_b ascends on moves linearly from 1 (the input model) to
    # budget_b; after it, budget_b. 0 = the paper (the final budget from the first step). An int counts the
    # optimizer steps after the warm-up (the ADMM steps at every_n_steps 1), a float in (0, 1) is a fraction
    # of the ADMM steps of the stage. Why: with Adam on s every set moves
    # at its own fixed speed whatever z is, so on the way down from 1 to a distant budget z integrates the
    # violation to hundreds and keeps every set pruning long after the budget is met (ADMM ends far below the
    # budget). On a ramp the violation stays small, z stays on the scale of y·v, and a set stops when
    # its next group is worth more than what it saves (usefulness, not set size, decides who gives).
    budget_ramp: int | float = 0
    # One ADMM iteration every n optimizer steps, with its step sizes (η1 of the prox, η2, η3, η4) times n:
    # the prox is then the exact prox of the penalty the n steps accumulated (1 / (1 + 2nηy) on the k smallest
    # groups, a lazy proximal step), and s, y, z move as far per epoch as at n = 1. 1 = the paper (every step).
    # Why: on CPU an iteration is a fixed cost of small ops (norms of every group, a sort, the prox), a sizeable
    # share of a small-batch step; at n = 4 it is a quarter of that (bench/admm_step.py --every-n-steps measures it).
    every_n_steps: int = 1
    # Embedding dims pruned this many at a time (one dim group = `dim_block` consecutive dims; it must divide
    # every table width). 1 = the paper. 4 under trainer=torchrec: fbgemm stores a table in a width divisible
    # by 4, so a table narrowed to 13 of 16 dims still takes 16 columns of shard memory, to 12 only 12.
    dim_block: int = 1
    # How far s may move per ADMM iteration. "paper": η2 = `eta_s` per iteration, whatever the stage's length
    # (the paper's, tuned where a stage is 11 k steps: a 100-step stage then moves s by ~5 groups and the
    # extraction does the compression). "relative": sized from the stage, so that the compression happens in
    # ADMM on data and schedules of every size: set l's step is `travel`·G_l / T (T the stage's ADMM
    # iterations: at full speed s crosses `travel` times the set within the stage), Adam on s without momentum
    # (β1 = 0: momentum carried s far past the budget once z had turned), and after the budget ramp the step
    # falls linearly to `settle` times itself at the stage's end, so that s comes to rest where z holds it.
    schedule: str = "paper"
    travel: float = 1.0
    settle: float = 0.1
    # Relative schedule: the prox's step η1 is at least `prox_horizon` / T. η1 is the optimizer's lr, which
    # is 100x smaller under Adam (1e-3) than under the paper's SGD (0.1): the pruned groups then barely shrink
    # (1 / (1 + 2·η1·y) per step), their bottom-k norm keeps y growing, and y·v holds s back while z climbs
    # (docs/admm_schedule.md).
    prox_horizon: float = 10.0
    # Relative schedule: η4 (the resource dual's ascent) is `eta_z`·max(1, dual_horizon / T). z has to climb to
    # y·v / |∂R/∂s| before s moves at all, at η4·violation per step: a few tens of steps at the paper's η4, nothing
    # in a stage of thousands, a large share of a stage of tens (docs/admm_schedule.md). Longer than dual_horizon
    # steps, the paper's η4.
    dual_horizon: float = 1000.0
    # The prox's step η1 per group. "nominal": the optimizer's lr for every group (the paper: SGD). "adaptive":
    # the step the optimizer actually took on the group per unit of its gradient (`prox_step.py`): lr under
    # SGD; under Adam/Adagrad/RMSprop lr·sqrt(Σ(P·g)²/Σg²), P the optimizer's preconditioner. Under Adam a
    # pruned group otherwise moves ~lr per weight per step whatever its gradient, the nominal prox cannot hold
    # it at zero, and y climbs with z until ADMM stalls short of the budget (docs/admm_schedule.md). input_selection's
    # default, not joint's: with pruned groups held at zero y stays small in every set and stops pricing the sets'
    # useful groups against each other (joint lost accuracy at tight budgets; docs/admm_schedule.md).
    prox_step: str = "nominal"

    def __post_init__(self) -> None:
        for key in ("eta_w", "eta_s", "eta_y", "eta_z"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"config key `mode.method.admm.{key}` must be a finite number > 0, got {value!r}")
        self.group_score = resolve(self.group_score, "mode.method.admm.group_score", GROUP_SCORES)
        score = self.group_score
        for key, unit in (("warmup_steps", "stage's steps"), ("budget_ramp", "ADMM steps")):
            w = getattr(self, key)
            if isinstance(w, bool) or not ((isinstance(w, int) and w >= 0) or (isinstance(w, float) and 0 < w < 1)):
                raise ValueError(f"config key `mode.method.admm.{key}` must be an integer >= 0 (steps) or a "
                                 f"fraction in (0, 1) of the {unit}, got {w!r}")
        n = self.every_n_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"config key `mode.method.admm.every_n_steps` must be an integer >= 1, got {n!r}")
        if self.feature_cost and not score.measured:
            raise ValueError(f"config key `mode.method.admm.feature_cost` needs a measured group_score "
                             f"(taylor or holdout), got group_score={score.name}")
        if score.measured and self.warmup_steps == 0:
            raise ValueError(f"config key `mode.method.admm.warmup_steps` must be > 0 with group_score="
                             f"{score.name} (the scores are measured during the warm-up)")
        b = self.dim_block
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"config key `mode.method.admm.dim_block` must be an integer >= 1, got {b!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"config key `mode.method.admm.schedule` must be one of {SCHEDULES}, "
                             f"got {self.schedule!r}")
        for key, low, high in (("travel", 0.0, None), ("settle", 0.0, 1.0), ("prox_horizon", 0.0, None),
                               ("dual_horizon", 0.0, None)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > low or (high and v > high):
                raise ValueError(f"config key `mode.method.admm.{key}` must be a number in ({low}, {high or 'inf'}], "
                                 f"got {v!r}")
        if self.prox_step not in PROX_STEPS:
            raise ValueError(f"config key `mode.method.admm.prox_step` must be one of {PROX_STEPS}, "
                             f"got {self.prox_step!r}")
        if self.s_optimizer not in S_OPTIMIZERS:
            raise ValueError(f"s_optimizer must be one of {S_OPTIMIZERS}, got {self.s_optimizer!r}")
        self.budgets = dict(self.budgets)
        unknown = set(self.budgets) - set(RESOURCES)
        if unknown:
            raise ValueError(f"unknown budget resources {sorted(unknown)}; choose from {RESOURCES}")
        if not any(b is not None for b in self.budgets.values()):
            raise ValueError("set at least one budget (flops or params)")

    @property
    def active_budgets(self) -> dict[str, float]:
        return {name: float(b) for name, b in self.budgets.items() if b is not None}


_STATE_FIELDS = ("s", "y", "z", "step", "adam_m", "adam_v")


@dataclass
class ADMMState:
    """Everything that evolves besides W: s, y (per set), z (per budget), the step count, Adam's moments
    of s. float64 tensors, so a checkpoint resumes bit-exactly."""

    set_names: list[str]
    budget_names: list[str]
    s: Tensor
    y: Tensor
    z: Tensor
    step: Tensor
    adam_m: Tensor
    adam_v: Tensor

    @classmethod
    def initial(cls, set_names: list[str], budget_names: list[str], device=None) -> ADMMState:
        def zeros(n):
            return torch.zeros(n, dtype=torch.float64, device=device)

        n = len(set_names)
        return cls(list(set_names), list(budget_names), zeros(n), zeros(n), zeros(len(budget_names)),
                   zeros(()), zeros(n), zeros(n))

    def state_dict(self) -> dict:
        out = {name: getattr(self, name).detach().clone() for name in _STATE_FIELDS}
        out.update(set_names=list(self.set_names), budget_names=list(self.budget_names))
        return out

    def load_state_dict(self, state: dict) -> None:
        if list(state["set_names"]) != self.set_names or list(state["budget_names"]) != self.budget_names:
            raise ValueError(
                f"ADMM state is for sets {state['set_names']} and budgets {state['budget_names']}, "
                f"this run has {self.set_names} and {self.budget_names}"
            )
        for name in _STATE_FIELDS:
            old = getattr(self, name)
            setattr(self, name, state[name].to(device=old.device, dtype=torch.float64).clone())

    def flat(self) -> Tensor:
        """All fields in one float64 vector (for a DDP broadcast from rank 0)."""
        return torch.cat([getattr(self, name).reshape(-1) for name in _STATE_FIELDS])

    def load_flat_(self, flat: Tensor) -> None:
        """Inverse of `flat()`, in place of this state's fields."""
        expected = sum(getattr(self, name).numel() for name in _STATE_FIELDS)
        if flat.numel() != expected:
            raise ValueError(f"flat ADMM state has {flat.numel()} values, expected {expected}")
        offset = 0
        for name in _STATE_FIELDS:
            old = getattr(self, name)
            n = old.numel()
            setattr(self, name, flat[offset : offset + n].reshape(old.shape).to(old.device, torch.float64).clone())
            offset += n

    @classmethod
    def from_flat(cls, flat: Tensor, set_names: list[str], budget_names: list[str]) -> ADMMState:
        state = cls.initial(set_names, budget_names, device=flat.device)
        state.load_flat_(flat)
        return state


def bottom_k_norm(sorted_norms: Tensor, k: Tensor) -> Tensor:
    """||W_l||²_{k_l,2}: the sum of the k_l smallest group norms. sorted_norms (S, G) ascending (padding
    +inf at the end, never inside the first k), k (S,) long -> (S,)."""
    cols = torch.arange(sorted_norms.shape[1], device=sorted_norms.device)
    return torch.where(cols[None, :] < k[:, None], sorted_norms, 0.0).sum(dim=1)


def next_smallest(sorted_norms: Tensor, k: Tensor, num_groups: Tensor) -> Tensor:
    """v_(k+1), the STE of ∂||W||²_{k,2}/∂s: the (k+1)-th smallest norm; at k = G, the largest (A.1)."""
    index = torch.minimum(k, num_groups - 1)
    return sorted_norms.gather(1, index[:, None]).squeeze(1)


class UMEC:
    """The ADMM of UMEC over the group sets of one DLRM.

    kinds: which group sets (see `groups.KINDS`); `sets` overrides them with prebuilt sets. `mode` only
    names the run in the unreachable-budget error. Build it *before* the optimizer: under `dot` with "dim"
    it adds `model.dim_gate`, a new parameter. Call `step(lr)` after every optimizer step;
    `final_pruned_masks()` and `kept()` at the end. `self.sets` is in the packed (row) order that s, y and
    the stats follow.
    """

    def __init__(self, model, kinds, config: ADMMConfig, sets: list[GroupSet] | None = None,
                 mode: str | None = None):
        self.model = model
        self.config = config
        sets = build_group_sets(model, kinds, dim_block=config.dim_block) if sets is None else sets
        if not sets:
            raise ValueError(f"no group set to prune for kinds {sorted(kinds)}")
        self.budgets = self.config.active_budgets
        self._device_key = None
        self.iterations = 1.0  # the stage's ADMM iterations: `begin` sets them (the relative schedule's T)
        self._build(sets)
        self.resource.check_budgets(self.budgets, mode=mode)
        self.state = ADMMState.initial([gs.name for gs in self.sets], list(self.budgets), device=self.packed.device)
        # c_l: mean group norm per set from the weights ADMM starts from. Kept (and moved by `to`), never
        # recomputed: after training the norms differ. A resumed run rebuilds UMEC from the same pretrained
        # weights before loading its checkpoint, so it computes the same values.
        self._set_norm_scale(self._start_scale())
        # The warm-up (`config.warmup_steps`): steps done; `importance` (this UMEC's own copy of the
        # group_score part) holds the scores measured so far.
        self.warm = 0
        w = self.config.warmup_steps
        self.warmup = w if isinstance(w, int) else 1  # steps; `begin` resolves a fraction
        self.importance: Importance = self.config.group_score.fresh()
        r = self.config.budget_ramp
        self.ramp = r if isinstance(r, int) else 1  # ADMM steps; `begin` resolves a fraction
        self.every = int(self.config.every_n_steps)
        self.due = 0  # optimizer steps to go until the next ADMM iteration (every_n_steps; 0: this one)
        self._last_stats: dict[str, Tensor] | None = None
        # prox_step=adaptive: the optimizer's per-weight preconditioner (`set_optimizer`); None: the nominal lr.
        self.precondition: Preconditioner | None = None

    @torch.no_grad()
    def _start_scale(self) -> Tensor:
        """c_l (S,): the mean group norm per set now (ones unless normalize_norms)."""
        scale = torch.ones(len(self.sets), dtype=torch.float32, device=self.packed.device)
        if self.config.normalize_norms:
            norms = self.packed._norms().float()
            valid = self.packed.valid
            mean = torch.where(valid, norms, 0.0).sum(1) / valid.sum(1).clamp(min=1)
            scale = torch.where(mean > 0, mean, torch.ones_like(mean))
        return scale

    def _build(self, sets: list[GroupSet]) -> None:
        """Everything that depends on the parameters' device and dtype: the packed grid, the resource model
        and the per-set constants, on the device the group members' parameters are on now."""
        device = sets[0].members[0].param.device
        for gs in sets:
            for m in gs.members:
                m.incidence = m.incidence.to(device)
        self.packed = PackedGroups(sets)
        self.sets = self.packed.sets  # the packed (row) order: s, y and the stats follow it
        self.resource = resource_model(self.model, self.sets, device=device)
        self._device_key = (device, sets[0].members[0].param.dtype)
        n = len(self.sets)
        self._budget_index = torch.tensor([RESOURCES.index(b) for b in self.budgets], device=device)
        self._budget_value = torch.tensor(list(self.budgets.values()), dtype=torch.float64, device=device)
        self._num_groups = self.packed.num_groups.long()
        self._max_pruned = (self._num_groups - 1).to(torch.float64)
        self._zero = torch.zeros_like(self._max_pruned)
        self._cols = torch.arange(self.packed.max_groups, device=device)[None, :]
        # Variant 0 = the current masks; variant 1 + l = set l with one more group pruned.
        self._plus_one = torch.cat([torch.zeros(1, n, dtype=torch.long), torch.eye(n, dtype=torch.long)]).to(device)
        self._gate = next((gs.members[0].param for gs in self.sets if gs.kind == "dim" and gs.name == "dims"), None)
        # The CPU path (`_step_host`), chosen from where the parameters are now: NumPy copies of the constants.
        self._host = device.type == "cpu"
        self._np_num_groups = self._num_groups.cpu().numpy()
        self._np_max_pruned = self._max_pruned.cpu().numpy()
        self._np_rows = np.arange(n)
        self._np_cols = np.arange(self.packed.max_groups)
        self._np_budget_index = self._budget_index.cpu().numpy()
        self._np_budget_value = self._budget_value.cpu().numpy()
        self._set_s_step()

    @property
    def eta_z(self) -> float:
        """η4 as used: the configured one, raised for stages shorter than `dual_horizon` under the relative
        schedule."""
        if self.config.schedule != "relative":
            return self.config.eta_z
        return self.config.eta_z * max(1.0, self.config.dual_horizon / max(self.iterations, 1.0))

    @property
    def _betas(self) -> tuple[float, float]:
        """Adam's betas on s: the configured ones, without momentum under the relative schedule."""
        beta1, beta2 = self.config.adam_betas
        return (0.0, beta2) if self.config.schedule == "relative" else (beta1, beta2)

    def _set_s_step(self) -> None:
        """η2 per set (S,) float64: `eta_s` (scaled by set size with s_step_by_set_size) under the paper's
        schedule; `travel`·G_l / T under the relative one (T: the stage's ADMM iterations, known at `begin`)."""
        groups = self._num_groups.to(torch.float64)
        if self.config.schedule == "relative":
            self._s_step = self.config.travel * groups / max(self.iterations, 1.0)
        else:
            step_scale = groups / groups.max() if self.config.s_step_by_set_size else torch.ones_like(groups)
            self._s_step = self.config.eta_s * step_scale
        self._np_s_step = self._s_step.cpu().numpy()

    def _settle_factor(self, step):
        """The relative schedule's s-step multiplier at ADMM iteration `step` (float or tensor): 1 until the end
        of the budget ramp, then linearly down to `settle` at the stage's last iteration. 1 under the paper's."""
        if self.config.schedule != "relative":
            return 1.0
        ramp, total, floor = float(max(self.ramp, 0)), float(max(self.iterations, 1.0)), self.config.settle
        span = max(total - ramp, 1.0)
        if isinstance(step, float):
            return min(1.0, max(floor, 1.0 - (1.0 - floor) * (step - ramp) / span))
        return (1.0 - (1.0 - floor) * (step - ramp) / span).clamp(min=floor, max=1.0)

    def _set_norm_scale(self, scale: Tensor) -> None:
        self._norm_scale = scale.to(self.packed.device)[:, None]
        self._np_norm_scale = scale.cpu().numpy().astype(np.float64)

    def to(self, device: torch.device | str | None = None) -> UMEC:
        """Follow the model: rebuild the grid, the resource model and the constants where the parameters are
        now (device and dtype; `device` only documents the caller's intent), and move the state there. The
        CPU path or the tensor path is chosen again. A no-op when nothing moved."""
        param = self.sets[0].members[0].param
        if (param.device, param.dtype) == self._device_key:
            return self
        scale = self._norm_scale[:, 0]
        weight = self.packed.group_weight
        self._build(self.sets)
        self._set_norm_scale(scale)
        if weight is not None:
            self.packed.group_weight = weight.to(self.packed.device, self._device_key[1])
        self.importance.to(self.packed.device)
        for name in _STATE_FIELDS:
            setattr(self.state, name, getattr(self.state, name).to(self.packed.device))
        return self

    # ---- the step ------------------------------------------------------------------------------------
    def _k(self) -> Tensor:
        """k_l = ceil(s_l) (S,) long, within [0, G_l − 1]."""
        return torch.clamp(self.state.s.ceil(), min=self._zero, max=self._max_pruned).long()

    @torch.no_grad()
    def step(self, lr: float | Tensor | None = None) -> dict[str, Tensor]:
        """One ADMM iteration after the SGD step on ℓ; `lr` is that step's learning rate (η1).

        Returns tensors: kept (S,) groups kept, flops and params (fractions of the dense model) of the
        current masks, s, y (S,), z (budgets,). Reading them is the caller's host sync.
        """
        if self.warming_up:
            return self._warm_up_step()
        if self.due > 0:  # between iterations (every_n_steps > 1): nothing moves
            self.due -= 1
            if self._last_stats is None:  # resumed between two iterations
                self._last_stats = self._current_stats()
            return self._last_stats
        self.due = self.every - 1
        n = self.every
        lr = self.config.eta_w if lr is None else lr
        floor = self.config.prox_horizon / max(self.iterations, 1.0) if self.config.schedule == "relative" else 0.0
        if self.config.prox_step == "adaptive" and self.precondition is not None:
            # (S, Gmax) per-group steps; the relative schedule's floor as below, per group.
            lr = (float(lr) * group_gain(self.packed, self.precondition)).clamp_(min=floor) * n
        elif self.config.schedule == "relative":  # a prox that can empty the pruned groups within the stage
            lr = max(float(lr), floor) * n
        else:
            lr = lr * n
        self._last_stats = self._step_host(lr, n) if self._host else self._step_device(lr, n)
        return self._last_stats

    def _current_stats(self) -> dict[str, Tensor]:
        """`step()`'s stats of the current masks, without an update."""
        _, ranks = self.packed._ranks(self.packed._norms())
        k = self._k()
        both = self.resource.evaluate_bottom_k(ranks, k[None])
        st = self.state
        return {"kept": self._num_groups - k, "flops": both[0, 0], "params": both[1, 0],
                "s": st.s, "y": st.y, "z": st.z}

    # ---- the warm-up ---------------------------------------------------------------------------------
    def begin(self, total_steps: int) -> None:
        """The stage's planned steps: resolves a fractional `warmup_steps` (at least 1 step)."""
        w = self.config.warmup_steps
        self.warmup = max(1, round(w * total_steps)) if isinstance(w, float) else int(w)
        r = self.config.budget_ramp
        iterations = max(0, total_steps - self.warmup) / self.every  # ADMM iterations of the stage
        self.ramp = max(1, round(r * iterations)) if isinstance(r, float) else -(-int(r) // self.every)
        self.iterations = float(iterations)
        self._set_s_step()

    def target(self, step):
        """The budgets z ascends on at ADMM step `step` (1-based; float or tensor): on `budget_ramp`, the
        line from 1 to the budget, then the budget. Same type as `step` (no host sync on a device)."""
        if self.ramp <= 0:
            return self._np_budget_value if isinstance(step, float) else self._budget_value
        if isinstance(step, float):
            left = max(0.0, 1.0 - step / self.ramp)
            return self._np_budget_value + (1.0 - self._np_budget_value) * left
        left = (1.0 - step / self.ramp).clamp(min=0.0)
        return self._budget_value + (1.0 - self._budget_value) * left

    def set_optimizer(self, optimizer) -> None:
        """The optimizer that steps the weights: prox_step=adaptive takes the prox's per-group step from it."""
        self.precondition = preconditioner(optimizer) if self.config.prox_step == "adaptive" else None

    @property
    def feature_row(self) -> int | None:
        """The packed row of the input-feature set (None without one)."""
        return next((l for l, gs in enumerate(self.sets) if gs.kind == "feature"), None)

    @property
    def warming_up(self) -> bool:
        return self.warm < self.warmup

    @property
    def taylor(self) -> Tensor | None:
        """The Taylor scores the warm-up has summed so far (S, Gmax) float64, None before any (or under Norm)."""
        return getattr(self.importance, "total", None)

    @taylor.setter
    def taylor(self, value: Tensor | None) -> None:
        if hasattr(self.importance, "total"):
            self.importance.total = value

    @property
    def holdout_feature_scores(self) -> Tensor | None:
        """(G,) held-out scores of the feature set (group_score=holdout), None until measured."""
        return getattr(self.importance, "feature_scores", None)

    @holdout_feature_scores.setter
    def holdout_feature_scores(self, value: Tensor | None) -> None:
        if HOLDOUT in self.importance.feeds:  # other parts have no use for them
            self.importance.feature_scores = value

    @torch.no_grad()
    def observe_gradients(self) -> None:
        """During a measured (`group_score: taylor` or `holdout`) warm-up, after the backward pass: add
        (Σ_{w in g} grad·w)² of this step to every group's score. Under DDP the gradients are already averaged
        over the ranks."""
        if not self.warming_up or not self.importance.measured:
            return
        self.importance.observe(self.packed)

    def _warm_up_step(self) -> dict[str, Tensor]:
        """No ADMM: count the step; at the last one, fix the group weights (a measured group_score). The
        stats are those of nothing pruned."""
        self.warm += 1
        if self.warm == self.warmup and self.importance.measured:
            self._weigh_by_taylor()
        one = torch.ones((), dtype=torch.float64, device=self.packed.device)
        return {"kept": self._num_groups - self._k(), "flops": one, "params": one,
                "s": self.state.s, "y": self.state.y, "z": self.state.z}

    @torch.no_grad()
    def _weigh_by_taylor(self) -> None:
        """a_g = T_g / v_g · (mean v / mean T) per set: the weighted norms equal the measured scores T (the
        group_score part's: Taylor, with the feature set's held-out scores under Holdout), on the scale of the
        set's plain norms (so η's and `normalize_norms` mean what they meant)."""
        valid = self.packed.valid
        norms = torch.where(valid, self.packed.norms().to(torch.float64), 0.0)
        measured = self.importance.scores(self.packed)
        taylor = measured.clone() if measured is not None else torch.zeros_like(norms)
        row = self.feature_row
        if self.config.feature_cost and row is not None and "params" in self.budgets:
            cost = self._feature_costs().to(taylor)
            taylor[row, : cost.numel()] = taylor[row, : cost.numel()] / (cost / cost.mean()).clamp(min=1e-12)
        if row is not None:
            # An input no model within the budget can keep goes first, whatever its worth: ranked by worth, ADMM
            # kept it to the last, stalled there (the set's last group) and left its removal to the completion
            # (the Kaggle layout's dense block under a tight FLOPs budget; docs/admm_schedule.md).
            infeasible = self._features_beyond_budget()
            taylor[row, : infeasible.numel()] = torch.where(infeasible, 0.0, taylor[row, : infeasible.numel()])
        taylor = torch.where(valid, taylor, 0.0)
        count = valid.sum(1, keepdim=True).clamp(min=1)
        mean_v, mean_t = norms.sum(1, keepdim=True) / count, taylor.sum(1, keepdim=True) / count
        target = torch.where(mean_t > 0, taylor * mean_v / mean_t.clamp(min=1e-300), norms)  # no signal: norms
        weight = torch.where(norms > 0, target / norms.clamp(min=1e-300), torch.ones_like(norms))
        weight = torch.where(valid, weight.clamp(min=1e-12), torch.ones_like(weight))
        self.packed.group_weight = weight.to(self._device_key[1])
        self._set_norm_scale(self._start_scale())

    @torch.no_grad()
    def _features_beyond_budget(self) -> Tensor:
        """(G,) bool over the input-feature set: the features that alone, with every other feature and every other
        set's groups but one pruned, still exceed a budget (no model within the budget keeps them)."""
        row = self.feature_row
        count = int(self._num_groups[row])
        grid = self.packed.valid.clone()
        grid[:, 0] = False  # every set keeps one group ...
        grid = grid[None].repeat(count, 1, 1)
        grid[:, row] = self.packed.valid[row]
        grid[torch.arange(count), row, torch.arange(count)] = False  # ... the feature set keeps feature g
        least = torch.stack(self.resource.evaluate(grid)).index_select(0, self._budget_index)  # (B, G)
        return (least > self._budget_value[:, None] * (1 + 1e-9)).any(0)

    @torch.no_grad()
    def _feature_costs(self) -> Tensor:
        """(G,) float64: the share of the dense model's params that removing each input feature alone frees."""
        row = self.feature_row
        count = int(self._num_groups[row])
        grid = torch.zeros(count, len(self.sets), self.packed.max_groups, dtype=torch.bool, device=self.packed.device)
        grid[torch.arange(count), row, torch.arange(count)] = True
        _, params = self.resource.evaluate(grid)
        return (1.0 - params).clamp(min=0.0)

    def _step_device(self, lr: float | Tensor, n: int = 1) -> dict[str, Tensor]:
        """`step` as a fixed sequence of tensor ops, without a host sync (any device). `lr` is the prox's step
        (η1 times n), `n` scales η2..η4 (every_n_steps)."""
        cfg, st = self.config, self.state
        sorted_norms, ranks = self.packed._ranks(self.packed._norms())  # persistent buffers
        sorted_norms = sorted_norms / self._norm_scale  # c_l (ones unless normalize_norms)
        k = self._k()

        # (1) proximal step: the k_l smallest groups of set l divided by 1 + 2·η·y_l/c_l (paper A.1); η per
        # group (S, Gmax) under prox_step=adaptive, else one η.
        per_group = isinstance(lr, Tensor) and lr.dim() == 2
        y_c = st.y / self._norm_scale[:, 0].to(st.y.dtype)  # (S,)
        shrink = 1.0 + (2.0 * lr) * (y_c[:, None] if per_group else y_c)  # (S, Gmax) or (S,)
        pruned = ranks < k[:, None]  # (S, Gmax)
        log_shrink = torch.log(shrink).neg_().to(sorted_norms.dtype)
        self.packed.scale_(pruned * (log_shrink if per_group else log_shrink[:, None]))
        if self._gate is not None:
            self._gate.clamp_(min=0.0)  # a non-negative gate folds into the ReLU before it on extraction

        # (2) s: STE gradient. Variant 0 = the current masks, variant 1 + l = set l with its (k_l+1)-th
        # smallest group pruned too: every slope R_b(k_l + 1) − R_b(k_l) from one batched evaluation.
        both = self.resource.evaluate_bottom_k(ranks, k[None] + self._plus_one)  # (2, 1 + S)
        resource = both.index_select(0, self._budget_index)  # (B, 1 + S)
        slopes = resource[:, 1:] - resource[:, :1]  # (B, S)
        # v_(k+1): k <= G − 1 always here, so the (k+1)-th smallest exists.
        next_norm = sorted_norms.gather(1, k[:, None])[:, 0].to(torch.float64)
        grad = torch.addmv(st.y * next_norm, slopes.t(), st.z)
        st.step = st.step + 1
        s_step = (n * self._s_step) * self._settle_factor(st.step.to(torch.float64))
        if cfg.s_optimizer == "adam":
            beta1, beta2 = self._betas
            st.adam_m = torch.lerp(st.adam_m, grad, 1 - beta1)
            st.adam_v = torch.lerp(st.adam_v, grad * grad, 1 - beta2)
            denom = (st.adam_v / (1 - beta2**st.step)).sqrt_().add_(cfg.adam_eps)
            s = st.s - s_step * (st.adam_m / (1 - beta1**st.step)) / denom
        else:
            s = st.s - s_step * grad
        st.s = torch.clamp(s, min=self._zero, max=self._max_pruned)

        # (3) y: ascent on the bottom-k norm after this step's prox, (bottom-k before) / (1 + 2ηy)².
        if per_group:  # each pruned group after its own prox (the grid still holds this step's norms)
            norms = (self.packed._grid / self._norm_scale).to(torch.float64)
            after = torch.where(pruned, norms / (shrink * shrink), 0.0).sum(dim=1)
        else:
            bottom_k = torch.where(self._cols < k[:, None], sorted_norms, 0.0).sum(dim=1).to(torch.float64)
            after = bottom_k / (shrink * shrink)
        st.y = torch.add(st.y, after, alpha=n * cfg.eta_y).clamp_(min=0.0)
        # (4) z: ascent on the violation of every budget.
        st.z = torch.add(st.z, resource[:, 0] - self.target(st.step), alpha=n * self.eta_z).clamp_(min=0.0)
        return {"kept": self._num_groups - k, "flops": both[0, 0], "params": both[1, 0],
                "s": st.s, "y": st.y, "z": st.z}

    def _step_host(self, lr: float | Tensor, n: int = 1) -> dict[str, Tensor]:
        """`step` on CPU: the same maths as `_step_device`, the per-set arithmetic in NumPy (see the module
        docstring); the state stays float64 tensors (sharing memory with the arrays computed here)."""
        cfg, st = self.config, self.state
        per_group = isinstance(lr, Tensor) and lr.dim() == 2
        lr = lr.numpy() if per_group else float(lr)
        sorted_t, ranks_t = self.packed._ranks(self.packed._norms())  # persistent buffers
        sorted_norms, ranks = sorted_t.numpy(), ranks_t.numpy()
        if self.config.normalize_norms:
            sorted_norms = sorted_norms / self._np_norm_scale[:, None]
        s, y, z = (st.s.numpy().astype(np.float64, copy=False), st.y.numpy().astype(np.float64, copy=False),
                   st.z.numpy().astype(np.float64, copy=False))
        k = np.minimum(np.maximum(np.ceil(s), 0.0), self._np_max_pruned).astype(np.int64)

        # (1) proximal step, only on the sets it changes (k_l > 0 and y_l > 0); η per group under
        # prox_step=adaptive (shrink (S, Gmax)), else one η (shrink (S,)).
        y_c = y / self._np_norm_scale
        shrink = 1.0 + (2.0 * lr) * (y_c[:, None] if per_group else y_c)
        self.packed._prox_bottom_k_(ranks, k, -np.log(shrink))
        if self._gate is not None:
            self._gate.clamp_(min=0.0)

        # (2) s: the STE gradient, resource slopes from one batched evaluation (variants as in the device path).
        both = self.resource.step_variants(ranks, k)  # (2, 1 + S), memoised on what decides it
        resource = both[self._np_budget_index]  # (B, 1 + S)
        slopes = resource[:, 1:] - resource[:, :1]  # (B, S)
        next_norm = sorted_norms[self._np_rows, k].astype(np.float64)
        grad = y * next_norm + slopes.T @ z
        step = float(st.step) + 1.0
        s_step = (n * self._np_s_step) * self._settle_factor(step)
        if cfg.s_optimizer == "adam":
            beta1, beta2 = self._betas
            adam_m, adam_v = st.adam_m.numpy(), st.adam_v.numpy()
            adam_m = adam_m + (1 - beta1) * (grad - adam_m)
            adam_v = adam_v + (1 - beta2) * (grad * grad - adam_v)
            denom = np.sqrt(adam_v / (1 - beta2**step)) + cfg.adam_eps
            s = s - s_step * ((adam_m / (1 - beta1**step)) / denom)
            st.adam_m, st.adam_v = torch.from_numpy(adam_m), torch.from_numpy(adam_v)
        else:
            s = s - s_step * grad
        st.s = torch.from_numpy(np.minimum(np.maximum(s, 0.0), self._np_max_pruned))
        st.step = torch.from_numpy(np.array(step))

        # (3) y: ascent on the bottom-k norm after this step's prox, (bottom-k before) / (1 + 2ηy)².
        if per_group:  # each pruned group after its own prox (the grid still holds this step's norms)
            norms = self.packed._grid.numpy().astype(np.float64) / self._np_norm_scale[:, None]
            with np.errstate(invalid="ignore"):  # the +inf padding is never pruned
                after = np.where(ranks < k[:, None], norms / (shrink * shrink), 0.0).sum(1)
        else:
            width = int(k.max()) if k.size else 0
            bottom_k = np.where(self._np_cols[:width] < k[:, None], sorted_norms[:, :width], 0.0)
            after = bottom_k.sum(1, dtype=np.float64) / (shrink * shrink)
        st.y = torch.from_numpy(np.maximum(y + (n * cfg.eta_y) * after, 0.0))
        # (4) z: ascent on the violation of every budget.
        st.z = torch.from_numpy(np.maximum(z + (n * self.eta_z) * (resource[:, 0] - self.target(step)), 0.0))
        return {"kept": torch.from_numpy(self._np_num_groups - k),
                "flops": torch.from_numpy(np.array(both[0, 0])), "params": torch.from_numpy(np.array(both[1, 0])),
                "s": st.s, "y": st.y, "z": st.z}

    def log_values(self, stats: dict[str, Tensor]) -> dict[str, float]:
        """Flatten `step()`'s tensors into named floats (one host sync per tensor; call it sparingly)."""
        out = {"resource/flops": float(stats["flops"]), "resource/params": float(stats["params"])}
        for key in ("kept", "s", "y"):
            for name, value in zip(self.state.set_names, stats[key].tolist()):
                out[f"{key}/{name}"] = float(value)
        for name, value in zip(self.state.budget_names, stats["z"].tolist()):
            out[f"z/{name}"] = float(value)
        return out

    # ---- masks and structure -------------------------------------------------------------------------
    @torch.no_grad()
    def _pruned_grid(self) -> Tensor:
        _, ranks = self.packed._ranks(self.packed._norms())
        return ranks < self._k()[:, None]

    def pruned_masks(self) -> dict[str, Tensor]:
        """{set name: bool (G_l,)}: the ceil(s_l) groups of smallest norm of every set, now."""
        return self.packed.to_dict(self._pruned_grid())

    def kept(self, masks: dict[str, Tensor] | None = None) -> Kept:
        return kept_from_masks(self.model, self.sets, self.pruned_masks() if masks is None else masks)

    def in_set_units(self, norms: Tensor) -> Tensor:
        """(S, Gmax) norms (the packed grid's, weighted where set) in units of each set's scale c_l, float64:
        what ADMM ranks groups by."""
        return (norms / self._norm_scale).to(torch.float64)

    def resource_of(self, masks: dict[str, Tensor]) -> dict[str, float]:
        """Fractions of the dense model's FLOPs and params under `masks`."""
        return self.resource.of_masks(masks, normalise=True)

    @torch.no_grad()
    def final_pruned_masks(self, enforce_budget: bool = True,
                           scores: Tensor | None = None) -> tuple[dict[str, Tensor], dict]:
        """The hard-prune masks at the end of ADMM (the ceil(s_l) smallest groups of every set), completed
        to the budget, and what that completion did.

        With `enforce_budget`, `selection.select_groups` finishes the job: if a budget is still exceeded it
        prunes the least useful groups per unit of resource saved; if ADMM overshot it restores the most
        useful ones that fit (`self.restored_groups`). Usefulness is `scores` (S, Gmax) in the packed order
        (UMECMethod passes a measured loss-change estimate), else the normalised group norms. Returns the
        masks and {"pruned_to_meet_budget", "restored_under_budget", "admm_pruned": the grid ADMM ended
        with, "pruned": the final grid}.
        """
        norms = self.in_set_units(self.packed.norms())
        _, ranks = self.packed.ranks(norms)
        admm_pruned = ranks < self._k()[:, None]
        self.restored_groups = 0
        info = {"pruned_to_meet_budget": 0, "restored_under_budget": 0, "admm_pruned": admm_pruned,
                "pruned": admm_pruned}
        if not enforce_budget:
            return self.packed.to_dict(admm_pruned), info
        try:
            pruned, counts = select_groups(self.resource, self.packed, norms if scores is None else scores,
                                           self.budgets, pruned=admm_pruned)
        except ValueError as err:
            raise RuntimeError(str(err)) from None
        self.restored_groups = counts["restored_under_budget"]
        info.update(counts, pruned=pruned)
        return self.packed.to_dict(pruned), info

    # ---- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        out = self.state.state_dict()
        weight = self.packed.group_weight
        out["warm_up"] = {"steps": int(self.warm),
                          "taylor": None if self.taylor is None else self.taylor.cpu().clone(),
                          "group_weight": None if weight is None else weight.cpu().clone(),
                          "norm_scale": self._norm_scale[:, 0].cpu().clone()}
        out["due"] = int(self.due)
        return out

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        warm = state.pop("warm_up", None)
        self.due = int(state.pop("due", 0))  # absent: written before every_n_steps (n = 1: always 0)
        self.state.load_state_dict(state)
        if warm is not None:
            device = self.packed.device
            self.warm = int(warm["steps"])
            self.taylor = None if warm["taylor"] is None else warm["taylor"].to(device)
            weight = warm["group_weight"]
            self.packed.group_weight = None if weight is None else weight.to(device, self._device_key[1])
            self._set_norm_scale(warm["norm_scale"].to(device))
        self.state.s = torch.clamp(self.state.s, min=self._zero, max=self._max_pruned)
