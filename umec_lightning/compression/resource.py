"""The resource model R: per-sample forward FLOPs and parameters of the model that pruning would leave.

Same conventions as `umec_lightning.models.cost.measure` (Linear in->out: 2·in·out + out FLOPs and
in·out + out parameters; tables 0 FLOPs and rows·dims parameters; a `dot` pair 2·D FLOPs), so that for any
masks R(masks) == measure(extract(model, kept_from_masks(model, sets, masks))). The dim gate used during
compression is folded away by extraction and is not counted.

Liveness (shared with `kept_from_masks`): the dense block is alive iff its feature group is kept and its
output keeps at least one column (then the whole bottom MLP is counted, else none of it); a table is alive
iff its feature group is kept and it keeps at least one dim; a `dot` pair counts iff its pair group is kept
and both of its vectors are alive. Layer input widths follow the previous layer's kept outputs; the top
MLP's input is bottom_out' + alive pairs (`dot`) or bottom_out' + Σ kept dims of alive tables (`cat`).

`evaluate` takes a *batch* of mask variants (V, num_sets, max_groups) and costs a fixed number of tensor
ops, whatever V or the number of sets: the ADMM step evaluates the current masks and, for every set, the
masks with one more group pruned (the finite slope R(k_l + 1) − R(k_l) of the STE) in one call.
Arithmetic is float64: 33.8 M rows × 16 dims is not exact in float32. Every value is an integer below 2**53
until the final normalisation, so the result does not depend on the order of the sums.

The same formulas run on torch tensors or, for the CPU fast path of the ADMM step, on NumPy arrays (a
NumPy op on a 34 × 33 array costs a fraction of a torch dispatch): `_evaluate` only uses operations both
share, through a small namespace of constants and functions per backend.

`GroupResourceModel` is that machinery for any family (batching, the NumPy path, the memoised ADMM variants,
`minimum`, the budget check); a family's subclass lays out its model and writes `_evaluate`: `ResourceModel`
for DLRM (described above), `models.dcnv2_resources.DCNv2ResourceModel` for DCNv2.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

from .groups import GroupSet

RESOURCES = ("flops", "params")


def table_param_weights(model) -> dict[str, float] | None:
    """{feature name: what one of its table's parameters costs, in parameters of the dense layers} while a bytes
    budget prices the pruning (`stages.runners.compress_stage` sets `model.table_param_weights` from the planned
    storage widths, e.g. 0.25 for int8 tables beside fp32 Linears), else None: every parameter counts 1. With it
    the "params" resource is the model's stored bytes over a dense parameter's bytes (rows' fp16 scale and bias
    aside), so the budget removes what is cheapest in bytes to lose, not in parameters."""
    return getattr(model, "table_param_weights", None)


def table_row_weights(model) -> dict[str, float] | None:
    """{feature name: what each row of a live table costs beyond its columns, in dense-layer parameters} under a
    bytes budget (a quantized row's fp16 scale and bias: 4 bytes, over a dense parameter's bytes), else None. The
    cost goes with the table's life, not its width: only removing the feature (or every column) saves it."""
    return getattr(model, "table_row_weights", None)


class GroupResourceModel:
    """R of a model under the masks of `sets` (the same order as in `PackedGroups`): the family-independent
    machinery. A family's subclass lays its model out in `_layout` and costs it in `_evaluate`.

    `_layout(model, by_name)` sets `_num_vectors` (the groups of the "features" set, when it has one), and
    `_pairs` / `_num_pairs` (DLRM's `dot` pairs: a second set whose groups differ in cost, or None), and
    returns the constants of `_evaluate` as tensors {name: tensor}; they become the attributes of
    `self._torch` (on `device`) and `self._numpy` (as arrays), next to the ops both backends share: `cat`,
    `stack`, `take` (columns by a long index) and `tile` (a (1, n) row to (V, n)).

    `_evaluate(kept, feature_kept, pair_kept, c)`: kept (V, S) groups kept per set, feature_kept (V, F) and
    pair_kept (V, P) float 0/1 (None when that set is not pruned) -> (2, V) absolute FLOPs, params; tensors
    with c = self._torch, or NumPy arrays with c = self._numpy.
    """

    CACHE_SIZE = 4096  # `step_variants` entries (each (2, 1 + S) float64: ≤ 0.6 KB under `cat`)
    KIND_ORDER = ("feature", "neuron", "dim", "pair")

    def __init__(self, model, sets: list[GroupSet], device: torch.device | str | None = None):
        self.structure = model.structure
        self.sets = sets
        self.names = [gs.name for gs in sets]
        self.kinds = sorted({gs.kind for gs in sets}, key=list(self.KIND_ORDER).index)
        if device is None:
            device = sets[0].members[0].param.device if sets else "cpu"
            if torch.device(device).type == "meta":
                device = "cpu"
        self.device = torch.device(device)
        num_sets = len(sets)
        self.num_sets = num_sets
        self.max_groups = max((gs.num_groups for gs in sets), default=1)
        by_name = {gs.name: l for l, gs in enumerate(sets)}
        self._features = by_name.get("features")
        self._num_vectors = 0
        self._pairs = None
        self._num_pairs = 0
        consts = self._layout(model, by_name)
        weights, row_meta = table_param_weights(model), table_row_weights(model)
        names = model.structure.feature_names
        if weights is not None and "rows" in consts:  # params priced by storage: see `table_param_weights`
            consts["rows"] = consts["rows"] * torch.tensor([weights.get(n, 1.0) for n in names], dtype=torch.float64)
        # What a live table costs beyond its columns (its rows' scale and bias when quantized), 0 without a plan
        consts["row_meta"] = torch.tensor([float(rows) * (row_meta or {}).get(n, 0.0)
                                           for n, rows in zip(names, model.structure.table_sizes)],
                                          dtype=torch.float64)
        self._sizes = torch.tensor([gs.num_groups for gs in sets], dtype=torch.float64, device=self.device)
        self._torch = SimpleNamespace(
            **{name: value.to(self.device) for name, value in consts.items()},
            cat=torch.cat, stack=torch.stack, take=lambda x, i: x.index_select(1, i),
            tile=lambda x, v: x.expand(v, -1),
        )
        self._numpy = SimpleNamespace(
            **{name: getattr(self._torch, name).cpu().numpy() for name in consts},
            cat=np.concatenate, stack=np.stack, take=lambda x, i: x[:, i],
            tile=lambda x, v: np.broadcast_to(x, (v, x.shape[1])),
        )
        self._sizes_np = self._sizes.cpu().numpy()
        self._plus_one_np = np.concatenate([np.zeros((1, num_sets), dtype=np.int64), np.eye(num_sets, dtype=np.int64)])
        self._variant_cache: dict[bytes, np.ndarray] = {}
        self.cache_hits = self.cache_misses = 0
        nothing = torch.zeros(1, num_sets, self.max_groups, dtype=torch.bool, device=self.device)
        self._scale = torch.ones(2, 1, dtype=torch.float64, device=self.device)
        dense = torch.stack(self.evaluate(nothing, normalise=False))[:, 0]
        self.dense = {"flops": float(dense[0]), "params": float(dense[1])}
        self._scale = 1.0 / dense[:, None]
        self._scale_np = self._scale.cpu().numpy()

    # ---- what a family's subclass provides ------------------------------------------------------------
    def _layout(self, model, by_name: dict[str, int]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _evaluate(self, kept, feature_kept, pair_kept, c: SimpleNamespace):
        raise NotImplementedError

    def _minimum_variant_(self, variant: Tensor, keep: int) -> None:
        """`minimum`'s hook: prune, in `variant` (S, Gmax), what else keeping feature `keep` alone allows."""

    # ---------------------------------------------------------------------------------------------------
    def evaluate(self, pruned: Tensor, normalise: bool = True) -> tuple[Tensor, Tensor]:
        """pruned (V, S, Gmax) bool (padding ignored) -> (flops (V,), params (V,)), float64; as fractions
        of the dense model's values when `normalise`."""
        kept = self._sizes - pruned.sum(dim=2, dtype=torch.float64)
        feature_kept = pair_kept = None
        if self._features is not None:
            feature_kept = (~pruned[:, self._features, : self._num_vectors]).to(torch.float64)
        if self._pairs is not None:
            pair_kept = (~pruned[:, self._pairs, : self._num_pairs]).to(torch.float64)
        out = self._evaluate(kept, feature_kept, pair_kept, self._torch)
        if normalise:
            out = out * self._scale
        return out[0], out[1]

    def evaluate_bottom_k(self, ranks: Tensor, k: Tensor) -> Tensor:
        """The fast path of the ADMM step: variants given as "the k[v, l] smallest groups of set l pruned".

        ranks (S, Gmax) long, the rank of every group in its set; k (V, S) long. Never builds the
        (V, S, Gmax) masks (V = 1 + S is 34 under `cat`). Returns (2, V) fractions: FLOPs, params.
        Both NumPy arrays (CPU: the same values, several times faster) or both tensors.
        """
        host = isinstance(k, np.ndarray)
        kept = (self._sizes_np if host else self._sizes) - k
        feature_kept = pair_kept = None
        if self._features is not None:
            f = self._features
            feature_kept = ranks[f, : self._num_vectors] >= k[:, f : f + 1]
        if self._pairs is not None:
            p = self._pairs
            pair_kept = ranks[p, : self._num_pairs] >= k[:, p : p + 1]
        if host:
            feature_kept = None if feature_kept is None else feature_kept.astype(np.float64)
            pair_kept = None if pair_kept is None else pair_kept.astype(np.float64)
            return self._evaluate(kept, feature_kept, pair_kept, self._numpy) * self._scale_np
        feature_kept = None if feature_kept is None else feature_kept.to(torch.float64)
        pair_kept = None if pair_kept is None else pair_kept.to(torch.float64)
        return self._evaluate(kept, feature_kept, pair_kept, self._torch) * self._scale

    def step_variants(self, ranks: np.ndarray, k: np.ndarray) -> np.ndarray:
        """The ADMM step's variants on CPU, memoised: `evaluate_bottom_k(ranks, k[None] + plus_one)` with
        variant 0 = the current k (S,) and variant 1 + l = set l with one more group pruned, (2, 1 + S),
        read-only.

        R and its slopes only depend on what the masks decide: the counts k, and, for the two sets whose
        groups differ in cost (features; pairs under `dot`), which groups are among the k smallest and
        which is the (k + 1)-th. That is the key; neurons and dims only enter through k. A step whose key
        was seen (k moves by one every tens of steps per set) costs a few NumPy ops instead of ~30.
        """
        key = [k.tobytes()]
        for row, width in ((self._features, self._num_vectors), (self._pairs, self._num_pairs)):
            if row is not None:
                r = ranks[row, :width]
                # 2 = pruned, 1 = the next to prune, 0 = kept further (the order among the pruned is irrelevant).
                key.append(((r < k[row]).view(np.int8) + (r <= k[row]).view(np.int8)).tobytes())
        key = b"|".join(key)
        out = self._variant_cache.get(key)
        if out is None:
            out = self.evaluate_bottom_k(ranks, k[None] + self._plus_one_np)
            out.flags.writeable = False
            if len(self._variant_cache) >= self.CACHE_SIZE:
                self._variant_cache.pop(next(iter(self._variant_cache)))  # the oldest entry
            self._variant_cache[key] = out
            self.cache_misses += 1
        else:
            self.cache_hits += 1
        return out

    def pad(self, masks: dict[str, Tensor]) -> Tensor:
        """{set name: bool (G_l,)} -> (1, S, Gmax); absent sets prune nothing."""
        grid = torch.zeros(1, self.num_sets, self.max_groups, dtype=torch.bool, device=self.device)
        for l, gs in enumerate(self.sets):
            if gs.name in masks:
                grid[0, l, : gs.num_groups] = masks[gs.name].to(device=self.device, dtype=torch.bool)
        return grid

    def of_masks(self, masks: dict[str, Tensor], normalise: bool = False) -> dict[str, float]:
        """Convenience: {"flops": .., "params": ..} of one set of masks (absolute unless `normalise`)."""
        flops, params = self.evaluate(self.pad(masks), normalise=normalise)
        return {"flops": float(flops[0]), "params": float(params[0])}

    # ---------------------------------------------------------------------------------------------------
    def minimum(self) -> dict[str, float]:
        """The smallest reachable R (fractions) with these sets: every set pruned down to one group.

        Neuron and dim groups are interchangeable for R; which feature survives is not, so every choice of
        the surviving feature is tried (and `_minimum_variant_` prunes what else that choice allows: DLRM's
        surviving `dot` pair is one with a dead endpoint where possible). FLOPs and params are minimised
        separately (each a lower bound).
        """
        base = torch.zeros(self.num_sets, self.max_groups, dtype=torch.bool, device=self.device)
        for l, gs in enumerate(self.sets):
            base[l, 1 : gs.num_groups] = True  # keep group 0
        variants = [base]
        if "features" in self.names:
            lf = self.names.index("features")
            num_features = self.sets[lf].num_groups
            variants = []
            for keep in range(num_features):
                var = base.clone()
                var[lf, :num_features] = True
                var[lf, keep] = False
                self._minimum_variant_(var, keep)
                variants.append(var)
        flops, params = self.evaluate(torch.stack(variants), normalise=True)
        return {"flops": float(flops.min()), "params": float(params.min())}

    def check_budgets(self, budgets: dict[str, float | None], mode: str | None = None) -> None:
        """Raise ValueError, before any training, for an unknown resource or an unreachable budget."""
        unknown = set(budgets) - set(RESOURCES)
        if unknown:
            raise ValueError(f"unknown budget resources {sorted(unknown)}; choose from {RESOURCES}")
        lowest = None
        for name, budget in budgets.items():
            if budget is None:
                continue
            if not budget > 0:
                raise ValueError(f"{name} budget must be a positive fraction of the dense model, got {budget}")
            lowest = lowest or self.minimum()
            if budget < lowest[name]:
                where = f"mode={mode}" if mode else f"pruning {', '.join(self.kinds) or 'nothing'}"
                raise ValueError(
                    f"{name} budget {budget:g} is below the {lowest[name]:.4g} that the smallest reachable "
                    f"model needs under {where} (every group set pruned down to one group)"
                )




class ResourceModel(GroupResourceModel):
    """R of a DLRM under the masks of `sets` (the same order as in `PackedGroups`)."""

    def _layout(self, model, by_name: dict[str, int]) -> dict[str, Tensor]:
        s = model.structure
        num_sets = self.num_sets
        self.dot = s.interaction == "dot"
        self.ud = int(s.use_dense)
        ud = self.ud

        consts: list[float] = []

        def source(set_name: str, full: int) -> int:
            """Column of the kept-count table: the set's kept count if the set is active, else a constant."""
            if set_name in by_name:
                return by_name[set_name]
            consts.append(float(full))
            return num_sets + len(consts) - 1

        dim_shared = source("dims", s.dim) if self.dot else None
        # Every Linear as (input-width column, output-width column, in the bottom MLP?); the top MLP's
        # input width is computed per variant and appended as the last column.
        layers: list[tuple[int, int, bool]] = []
        previous = source("", s.num_dense) if ud else None
        for i, w in enumerate(s.bottom if ud else []):
            last = i == len(s.bottom) - 1
            out = dim_shared if self.dot and last else source(f"neurons:dense.layers.{i}", w)
            layers.append((previous, out, True))
            previous = out
        self._bottom_out = previous
        top_in_col = -1
        previous = top_in_col
        for i, w in enumerate(s.top):
            out = source(f"neurons:over.layers.{i}", w) if i < len(s.top) - 1 else source("", 1)
            layers.append((previous, out, False))
            previous = out
        # Every constant column must exist before the top MLP's input width is appended after them: the
        # per-table dims under `cat` are constants when no dim set is pruned.
        if self.dot:
            dim_src = [dim_shared]
        else:
            dim_src = [source(f"dims:{name}", d) for name, d in zip(s.feature_names, s.table_dims)]
        top_in_col = num_sets + len(consts)
        ins = [top_in_col if a == -1 else a for a, _, _ in layers]
        # M = [in·out | out] @ coef gives, per variant: top FLOPs, top params, bottom FLOPs, bottom params.
        coef = torch.zeros(2 * len(layers), 4, dtype=torch.float64)
        for n, (_, _, bottom) in enumerate(layers):
            c = 2 if bottom else 0
            coef[n, c : c + 2] = torch.tensor([2.0, 1.0], dtype=torch.float64)  # in·out: 2 FLOPs, 1 param
            coef[len(layers) + n, c : c + 2] = 1.0  # out: 1 FLOP (bias), 1 param

        def long(x):
            return torch.tensor(x, dtype=torch.long)

        self._num_vectors = ud + s.num_features
        pairs = s.kept_pairs() if self.dot else []
        self._num_pairs = len(pairs)
        self._pairs = by_name.get("pairs") if self.dot else None
        # The constants of `_evaluate` (the base puts them, with the ops it needs, in one namespace per backend).
        return dict(
            consts=torch.tensor(consts, dtype=torch.float64)[None, :],
            widths=torch.tensor([[float(gs.width) for gs in self.sets]], dtype=torch.float64),
            ins=long(ins), outs=long([b for _, b, _ in layers]), coef=coef,
            dim_src=long(dim_src), rows=torch.tensor(s.table_sizes, dtype=torch.float64),
            ones=torch.ones(1, self._num_vectors, dtype=torch.float64),
            li=long([p[0] for p in pairs]), lj=long([p[1] for p in pairs]),
        )

    def _evaluate(self, kept, feature_kept, pair_kept, c: SimpleNamespace):
        """The cost from what the masks decide: kept (V, S) groups kept per set, feature_kept (V, ud + F)
        and pair_kept (V, P) float 0/1 (None when that set is not pruned) -> (2, V) absolute FLOPs, params.
        Tensors with c = self._torch, or NumPy arrays with c = self._numpy."""
        v = kept.shape[0]
        counts = c.cat([kept * c.widths, c.tile(c.consts, v)], 1)  # units kept: a dim group may be b dims
        kept_vectors = c.ones if feature_kept is None else feature_kept
        ud = self.ud
        if self.dot:
            dim = c.take(counts, c.dim_src)  # (V, 1): the shared D'
            alive = kept_vectors * (dim > 0)  # (V, ud + F), dense block first
            pair_alive = c.take(alive, c.li) * c.take(alive, c.lj)
            if pair_kept is not None:
                pair_alive = pair_alive * pair_kept
            num_pairs = pair_alive.sum(1)[:, None]  # (V, 1)
            tables = dim[:, 0] * (alive[:, ud:] @ c.rows) + alive[:, ud:] @ c.row_meta
            interaction = 2.0 * (dim * num_pairs)[:, 0]
            top_in = num_pairs + alive[:, :1] * dim if ud else num_pairs
        else:
            dims = c.take(counts, c.dim_src)  # (V, F) kept dims per table
            table_dims = kept_vectors[:, ud:] * (dims > 0) * dims
            tables = table_dims @ c.rows + table_dims.clip(max=1.0) @ c.row_meta  # 1 a live table (integer dims)
            interaction = 0.0
            top_in = table_dims.sum(1)[:, None]
            if ud:
                bottom_out = counts[:, self._bottom_out : self._bottom_out + 1]
                alive = kept_vectors[:, :1] * (bottom_out > 0)
                top_in = top_in + alive * bottom_out
        cols = c.cat([counts, top_in], 1)
        outs = c.take(cols, c.outs)
        m = c.cat([c.take(cols, c.ins) * outs, outs], 1) @ c.coef  # (V, 4)
        total = m[:, :2] + alive[:, :1] * m[:, 2:] if ud else m[:, :2]  # the bottom MLP iff the block lives
        return c.stack([total[:, 0] + interaction, total[:, 1] + tables])

    def _minimum_variant_(self, variant: Tensor, keep: int) -> None:
        """Under `dot`, the surviving pair is one with a dead endpoint where possible."""
        if "pairs" in self.names:
            lp = self.names.index("pairs")
            li, lj = self._torch.li.tolist(), self._torch.lj.tolist()
            dead = [p for p, (i, j) in enumerate(zip(li, lj)) if i != keep or j != keep]
            survivor = dead[0] if dead else 0
            variant[lp, : len(li)] = True
            variant[lp, survivor] = False


def resource_model(model, sets: list[GroupSet], device: torch.device | str | None = None) -> GroupResourceModel:
    """R of `model` under the masks of `sets`, as its family counts it (`models.family`; DLRM's: `ResourceModel`)."""
    from ..models.family import family_of_model

    return family_of_model(model).resource_model(model, sets, device=device)


def check_group_budgets(model, kinds, budgets: dict[str, float], mode: str | None = None,
                        dim_block: int = 1) -> None:
    """ValueError unless the group sets of `kinds` exist on `model` (shapes only: a meta-device model is
    fine) and can reach every budget: the check of every group-pruning method before any training."""
    from .groups import build_group_sets

    sets = build_group_sets(model, kinds, dim_block=dim_block)
    if not sets:
        raise ValueError(f"no group set to prune for kinds {sorted(kinds)}")
    resource_model(model, sets, device="cpu").check_budgets(budgets, mode=mode)
