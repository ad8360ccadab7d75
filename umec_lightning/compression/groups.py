"""Group sets: which slices of which parameters form one prunable group (method.md §3, the group-set table).

A `GroupSet` is one "layer" l of the paper: G groups, each a union of parameter slices, with one real
s_l (how many of its groups are to be zero) and one dual y_l. A member of a set is (parameter, dim,
incidence): slice i of the parameter along `dim` belongs to group g iff incidence[i, g] = 1. A slice may
belong to several groups (a `dot` pair column belongs to both of its features): the group norm counts it in
each, and the proximal step shrinks it once per shrunk group containing it (an approximation of the exact
prox of overlapping groups, which has no closed form).

Group norms are squared L2 norms, v_g = Σ_members Σ_{slices i in g} ||slice_i||² (the paper's ||W_{·,g}||²).

Nothing here ever reads an embedding table: feature and dimension groups live on the top MLP's input
columns (and, under `dot`, on the per-dimension gate), so a step costs the same with 33 M-row tables as
with 10-row ones.

`PackedGroups` lays all sets of a model out in one padded (num_sets, max_groups) grid, so that a training
step computes every group norm, sorts every set and applies every proximal step with a fixed number of
tensor ops, however many sets (26 `dims:` sets under `cat`) there are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .kept import Kept

KINDS = ("feature", "neuron", "dim", "pair")


def slice_sum(values: Tensor, dim: int) -> Tensor:
    """Sum of `values` over every dimension but `dim`: (values.shape[dim],)."""
    if values.dim() == 1:
        return values
    return values.sum(dim=[d for d in range(values.dim()) if d != dim])


@dataclass
class GroupMember:
    """Slices of `param` along `dim`; incidence (param.shape[dim], G) float 0/1 maps slices to groups."""

    param: nn.Parameter
    dim: int
    incidence: Tensor

    def slice_norms(self) -> Tensor:
        """Squared L2 norm of every slice along `dim`: (param.shape[dim],)."""
        p = self.param.detach()
        if p.dim() == 1:
            return p * p
        others = [d for d in range(p.dim()) if d != self.dim]
        return p.square().sum(dim=others)


@dataclass
class GroupSet:
    """One prunable set of groups. kind in KINDS; `labels` name the groups (for reports)."""

    name: str
    kind: str
    members: list[GroupMember]
    labels: list[str] = field(default_factory=list)
    # How many units (dims) one group is: a dim set of `dim_block` b has groups of b consecutive dims, so
    # its kept count times b is its kept dims (`ResourceModel`, `kept_from_masks`). 1 for every other set.
    width: int = 1

    @property
    def num_groups(self) -> int:
        return int(self.members[0].incidence.shape[1])

    @property
    def max_pruned(self) -> int:
        """At least one group of every set survives (s_l is clamped to G_l − 1)."""
        return self.num_groups - 1

    def norms(self) -> Tensor:
        """v (G,): squared L2 norm of every group (reference implementation; `PackedGroups` batches it)."""
        return sum(m.slice_norms() @ m.incidence.to(m.param.dtype) for m in self.members)

    @torch.no_grad()
    def scale_(self, factors: Tensor) -> None:
        """Multiply group g by factors[g] in place. A slice in several groups gets the product of their
        factors; a factor 0 zeroes the slice (hard prune)."""
        for m in self.members:
            inc = m.incidence.to(factors.dtype)
            zero = inc @ (factors == 0).to(factors.dtype) > 0
            logf = torch.where(factors == 0, torch.zeros_like(factors), factors.log())
            slice_factor = torch.where(zero, torch.zeros_like(zero, dtype=factors.dtype), (inc @ logf).exp())
            shape = [1] * m.param.dim()
            shape[m.dim] = -1
            m.param.mul_(slice_factor.to(m.param.dtype).view(shape))

    def zero_(self, pruned: Tensor) -> None:
        """Hard prune: zero every slice that belongs to a pruned group."""
        factors = torch.ones(self.num_groups, dtype=torch.float64, device=pruned.device)
        self.scale_(factors.masked_fill(pruned.to(torch.bool), 0.0))


# ---- building the sets of a DLRM ----------------------------------------------------------------------


def _identity(n: int, device) -> Tensor:
    return torch.eye(n, device=device)


def _top_input_layout(structure) -> tuple[int, list[tuple[int, int]], list[int]]:
    """(bottom_out, pairs in T-row numbering, first top-input column of each table under `cat`)."""
    bottom_out = structure.bottom_out
    if structure.interaction == "dot":
        return bottom_out, structure.kept_pairs(), []
    starts, col = [], bottom_out
    for d in structure.table_dims:
        starts.append(col)
        col += d
    return bottom_out, [], starts


def _blocks(n: int, block: int, device, what: str) -> Tensor:
    """(n, n / block) incidence: unit j in group j // block. ValueError unless `block` divides n."""
    if n % block:
        raise ValueError(f"config key `mode.method[.admm].dim_block`: {block} does not divide {what} ({n} dims)")
    return torch.eye(n // block, device=device).repeat_interleave(block, dim=0)


def _block_labels(n: int, block: int) -> list[str]:
    return [str(i) if block == 1 else f"{i}-{i + block - 1}" for i in range(0, n, block)]


def build_group_sets(model, kinds, dim_block: int = 1) -> list[GroupSet]:
    """The group sets of `model` for the requested kinds, as its family builds them (`models.family`; DLRM's:
    `dlrm_group_sets`)."""
    from ..models.family import family_of_model

    return family_of_model(model).group_sets(model, kinds, dim_block)


def dlrm_group_sets(model, kinds, dim_block: int = 1) -> list[GroupSet]:
    """The group sets of a `DLRM` for the requested kinds (a subset of KINDS), in a fixed order:
    feature, neuron (bottom then top), dim, pair. `dim_block` b > 1: embedding dims are pruned b at a
    time (groups of b consecutive dims; b must divide every table width): fbgemm's sharded tables are
    stored in widths divisible by 4, so under `trainer=torchrec` only b = 4 makes every pruned dim free
    memory.

    Under `dot` with "dim", this calls `model.enable_dim_gate()`: build the sets *before* creating the
    optimizer, so that the gate is trained.
    """
    kinds = set(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown group kinds {sorted(unknown)}; choose from {KINDS}")
    s = model.structure
    if s.table_ranks is not None:
        # A projected table's columns are factors, not its original dims, and R does not count projections.
        raise ValueError("group sets of a model with projected (factorised) tables are not supported: "
                         "run factorising methods (mixed_dim) as the last compress stage")
    if s.layer_ranks is not None:
        # A factored layer has no single weight whose rows are its neurons' groups, and R counts plain Linears.
        raise ValueError("group sets of a model with factored (low-rank) Linear layers are not supported: "
                         "run factorising methods (lowrank) as the last compress stage")
    dot = s.interaction == "dot"
    if "pair" in kinds and not dot:
        raise ValueError("group kind 'pair' (interaction pairs) only exists under `dot` interaction, "
                         "this model uses `cat`")
    top0 = model.over.layers[0]
    w0 = top0.weight
    device = w0.device
    in0 = w0.shape[1]
    bottom_out, pairs, starts = _top_input_layout(s)
    ud = int(s.use_dense)
    sets: list[GroupSet] = []

    if "feature" in kinds:
        labels = (["dense"] if ud else []) + s.feature_names
        inc = torch.zeros(in0, len(labels), device=device)
        if ud:
            inc[:bottom_out, 0] = 1.0
        if dot:
            for p, (i, j) in enumerate(pairs):
                # T row r is group r (row 0 = the dense block when it is read, as in the group labels).
                inc[bottom_out + p, i] = 1.0
                inc[bottom_out + p, j] = 1.0
        else:
            for f, (start, d) in enumerate(zip(starts, s.table_dims)):
                inc[start : start + d, ud + f] = 1.0
        sets.append(GroupSet("features", "feature", [GroupMember(w0, 1, inc)], labels))

    if "neuron" in kinds:
        layers = []
        if model.dense is not None:
            n = len(model.dense.layers)
            # Under `dot` the last bottom layer's width is the shared embedding dim: the dim set's job.
            layers += [(f"dense.layers.{i}", m) for i, m in enumerate(model.dense.layers) if not (dot and i == n - 1)]
        layers += [(f"over.layers.{i}", m) for i, m in enumerate(model.over.layers)][:-1]
        norms = model.batch_norms()
        for name, m in layers:
            eye = _identity(m.out_features, device)
            # A batch-normalised neuron's pre-activation is γ·x̂ + β whatever its weight row's scale (the norm
            # undoes it), so its group is (γ, β): their squared norm is the channel's output energy E[y²] in
            # training, scaling them scales the neuron's output exactly, and zeroing them removes it.
            # (Network slimming, Liu et al. 2017, ranks channels by |γ| alike.)
            params = (norms[name].weight, norms[name].bias) if name in norms else (m.weight, m.bias)
            sets.append(GroupSet(f"neurons:{name}", "neuron", [GroupMember(p, 0, eye) for p in params],
                                 [str(i) for i in range(m.out_features)]))

    if "dim" in kinds:
        b = int(dim_block)
        if b < 1:
            raise ValueError(f"config key `mode.method.admm.dim_block` must be a positive integer, got {dim_block!r}")
        if dot:
            gate = model.enable_dim_gate()
            sets.append(GroupSet("dims", "dim",
                                 [GroupMember(gate, 0, _blocks(gate.numel(), b, device, "the embedding dim"))],
                                 _block_labels(gate.numel(), b), width=b))
        else:
            for name, start, d in zip(s.feature_names, starts, s.table_dims):
                blocks = _blocks(d, b, device, f"table {name}")
                inc = torch.zeros(in0, blocks.shape[1], device=device)
                inc[start : start + d] = blocks
                sets.append(GroupSet(f"dims:{name}", "dim", [GroupMember(w0, 1, inc)], _block_labels(d, b),
                                     width=b))

    if "pair" in kinds:
        inc = torch.zeros(in0, len(pairs), device=device)
        inc[bottom_out:] = _identity(len(pairs), device)
        sets.append(GroupSet("pairs", "pair", [GroupMember(w0, 1, inc)], [f"{i}-{j}" for i, j in pairs]))
    return sets


# ---- from masks to structure -------------------------------------------------------------------------


def _kept_list(mask: Tensor | None, n: int, width: int = 1) -> list[int]:
    """The kept units (0..n-1) of a set's group mask; a group stands for `width` consecutive units."""
    if mask is None:
        return list(range(n))
    mask = mask.to(torch.bool).cpu().repeat_interleave(width)
    return [int(i) for i in torch.nonzero(~mask).flatten()]


def kept_from_masks(model, sets: list[GroupSet], pruned: dict[str, Tensor]) -> Kept:
    """The structure left when the groups marked in `pruned` (set name -> bool (G,)) are removed, as `model`'s
    family reads it (`models.family`; DLRM's: `dlrm_kept_from_masks`)."""
    from ..models.family import family_of_model

    return family_of_model(model).kept_from_masks(model, sets, pruned)


def dlrm_kept_from_masks(model, sets: list[GroupSet], pruned: dict[str, Tensor]) -> Kept:
    """The structure left when the groups marked in `pruned` (set name -> bool (G,)) are removed.

    Liveness rules (shared with `ResourceModel`): the dense block is alive iff its feature group is kept and
    its output keeps at least one column; a table is alive iff its feature group is kept and it keeps at
    least one dim; a `dot` pair is kept iff its pair group is kept and both of its vectors are alive.
    Sets absent from `pruned` (or not built) keep everything. Indices are in `model`'s numbering, which is
    the original numbering when `model` is the dense model. A dead dense block has no `neurons` entries;
    under `dot` the last bottom layer's kept neurons are the kept dims.
    """
    s = model.structure
    dot = s.interaction == "dot"
    by_name = {gs.name: gs for gs in sets}
    unknown = set(pruned) - set(by_name)
    if unknown:
        raise ValueError(f"masks for unknown group sets {sorted(unknown)}")
    for name, m in pruned.items():
        if m.numel() != by_name[name].num_groups:
            raise ValueError(f"mask for {name} has {m.numel()} entries, the set has {by_name[name].num_groups}")
    ud = int(s.use_dense)
    feat = pruned.get("features")
    feat_pruned = [False] * (ud + s.num_features) if feat is None else [bool(x) for x in feat.cpu()]

    def width(name: str) -> int:
        return by_name[name].width if name in by_name else 1

    if dot:
        dims_dot = _kept_list(pruned.get("dims"), s.dim, width("dims"))
        if not dims_dot:
            raise ValueError("every shared embedding dim is pruned: nothing left to interact")
        dims = {name: dims_dot for name in s.feature_names}
    else:
        dims = {name: _kept_list(pruned.get(f"dims:{name}"), d, width(f"dims:{name}"))
                for name, d in zip(s.feature_names, s.table_dims)}

    neurons: dict[str, list[int]] = {}
    for name, m in model.linear_layers().items():
        if name == f"over.layers.{len(s.top) - 1}":
            continue
        if dot and name == f"dense.layers.{len(s.bottom) - 1}":
            neurons[name] = dims_dot
        else:
            neurons[name] = _kept_list(pruned.get(f"neurons:{name}"), m.out_features)

    use_dense = bool(ud) and not feat_pruned[0] and len(neurons[f"dense.layers.{len(s.bottom) - 1}"]) > 0
    alive_tables = [not feat_pruned[ud + f] and len(dims[name]) > 0 for f, name in enumerate(s.feature_names)]
    if not use_dense and not any(alive_tables):
        raise ValueError("the masks prune every input (dense block and all tables)")
    for name, keep in neurons.items():
        if not keep and (use_dense or not name.startswith("dense.")):
            raise ValueError(f"the masks prune every neuron of {name}")
    if not use_dense:
        neurons = {k: v for k, v in neurons.items() if not k.startswith("dense.")}

    pairs = None
    if dot:
        alive_rows = ([use_dense] if ud else []) + alive_tables
        pair_mask = pruned.get("pairs")
        all_pairs = s.kept_pairs()
        pair_pruned = [False] * len(all_pairs) if pair_mask is None else [bool(x) for x in pair_mask.cpu()]
        pairs = [(i, j) for (i, j), gone in zip(all_pairs, pair_pruned) if not gone and alive_rows[i] and alive_rows[j]]

    return Kept(
        use_dense=use_dense,
        feature_ids=[fid for fid, alive in zip(s.feature_ids, alive_tables) if alive],
        dims={name: dims[name] for name, alive in zip(s.feature_names, alive_tables) if alive},
        neurons=neurons,
        pairs=pairs,
    )


def apply_masks_(model, sets: list[GroupSet], pruned: dict[str, Tensor]) -> None:
    """Zero the pruned groups' members in place: the "masked model", whose outputs equal the model that
    extraction builds from `kept_from_masks(model, sets, pruned)` (under `dot` dims: dim_gate[j] = 0)."""
    by_name = {gs.name: gs for gs in sets}
    for name, mask in pruned.items():
        by_name[name].zero_(mask)


# ---- all sets in one padded grid ---------------------------------------------------------------------


class PackedGroups:
    """Every set of a model in one (num_sets, max_groups) grid; row l = set `self.sets[l]`, padded with +inf.

    Rows are ordered by size bucket (`self.sets` is that order, not necessarily the order given), so that
    each bucket is a contiguous block of rows sorted by one `torch.sort`: one padded sort of everything is
    several times slower on CPU than a few right-sized ones.

    Precomputed once: the distinct (parameter, dim) slice sources, the (slice, grid cell) incidence
    entries, and persistent buffers with their views, so a step's `norms`/`scale_`/`ranks` cost a fixed
    number of ops per *parameter* and per bucket, never per set or group. Methods whose name starts with
    `_` return those persistent buffers (overwritten by the next call); the public ones return copies.
    """

    def __init__(self, sets: list[GroupSet]):
        if not sets:
            raise ValueError("no group sets to pack")

        def bucket(gs: GroupSet) -> int:
            return 1 << max(6, (gs.num_groups - 1).bit_length())  # 64, 128, 256, ...

        order = sorted(range(len(sets)), key=lambda l: bucket(sets[l]))
        self.sets = [sets[l] for l in order]
        sets = self.sets
        self.names = [gs.name for gs in sets]
        self.num_sets = len(sets)
        self.max_groups = max(gs.num_groups for gs in sets)
        first = sets[0].members[0].param
        device, dtype = first.device, first.dtype
        self.device = device
        self.num_groups = torch.tensor([gs.num_groups for gs in sets], device=device)
        cols = torch.arange(self.max_groups, device=device)
        self.valid = cols[None, :] < self.num_groups[:, None]  # (S, Gmax)
        self._template = torch.zeros(self.num_sets, self.max_groups, dtype=dtype, device=device)
        self._template[~self.valid] = float("inf")

        # Distinct slice sources, keyed by (parameter, dim). Sources whose norm is computed as a root
        # (`vector_norm` of rows, `abs` of a vector: fast) come first and are squared in one op; sources
        # needing column sums of squares (slow as a norm) are summed as squares directly.
        params: dict[int, tuple[nn.Parameter, list[int]]] = {}
        for gs in sets:
            for m in gs.members:
                if m.param.dim() not in (1, 2):
                    raise ValueError(f"group members must be 1-D or 2-D parameters, got {tuple(m.param.shape)}")
                dims = params.setdefault(id(m.param), (m.param, []))[1]
                if m.dim not in dims:
                    dims.append(m.dim)

        # Buffer layout: [vectors (1-D params) | rows of matrices needing rows only | column/both sums].
        # The first two regions hold roots (the raw values, `vector_norm` of rows) squared in one op.
        def region(p, dims):
            return 0 if p.dim() == 1 else (1 if dims == [0] else 2)

        start: dict[tuple[int, int], int] = {}
        total = 0
        bounds = []
        for r in range(3):
            for key, (p, dims) in params.items():
                if region(p, dims) == r:
                    for d in sorted(dims):
                        start[(key, d)] = total
                        total += p.shape[d]
            bounds.append(total)
        self._num_slices = total
        # Optional per-group weight a_g of the norms, (S, Gmax) > 0 with 1 in the padding: v_g = a_g·Σ||slice||²
        # (UMEC's measured `group_score`, Taylor or Holdout). None: plain norms.
        self.group_weight: Tensor | None = None
        # Every (parameter, dim) source in buffer order, for `group_sums` of any per-slice quantity.
        self._slice_sources = [(params[key][0], d) for (key, d), _ in sorted(start.items(), key=lambda kv: kv[1])]
        self._slices = torch.zeros(total, dtype=dtype, device=device)
        self._factors = torch.ones(total, dtype=dtype, device=device)
        self._rooted = self._slices[: bounds[1]]
        self._vector_out = self._slices[: bounds[0]]
        self._vectors = [p for p, dims in params.values() if region(p, dims) == 0]
        self._vectors.sort(key=lambda p: start[(id(p), 0)])
        self._row_norms = []  # (matrix, view of its row norms)
        self._column_sums = []  # (matrix, [(dim, view)])
        # In-place multiplications of the prox, as two foreach lists (a matrix scaled along both dims
        # appears once in each, never twice in one list).
        self._scale_first: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._scale_second: tuple[list[Tensor], list[Tensor]] = ([], [])
        # Every (parameter, dim) source as (parameter, its factor view, its first slice in the buffer, its number
        # of slices, dim): the CPU prox (`_prox_bottom_k_`) scales only the slices of the sets it shrinks.
        self._sources: list[tuple[nn.Parameter, Tensor, int, int, int]] = []
        source_index: dict[tuple[int, int], int] = {}
        for key, (p, dims) in params.items():
            views = []
            for d in sorted(dims):
                a, n = start[(key, d)], p.shape[d]
                factor = self._factors[a : a + n]
                views.append((d, self._slices[a : a + n], factor[:, None] if (p.dim() == 2 and d == 0) else factor))
            if region(p, dims) == 1:
                self._row_norms.append((p, views[0][1]))
            elif region(p, dims) == 2:
                self._column_sums.append((p, [(d, out) for d, out, _ in views]))
            for n, (d, _, factor) in enumerate(views):
                target = self._scale_first if n == 0 else self._scale_second
                target[0].append(p)
                target[1].append(factor)
                source_index[(key, d)] = len(self._sources)
                self._sources.append((p, factor, start[(key, d)], p.shape[d], d))
        self._factors_np = self._factors.numpy() if device.type == "cpu" else None
        self._squares = [torch.empty_like(p, memory_format=torch.contiguous_format) for p, _ in self._column_sums]
        # set_sources[l, j]: set l has a member on source j.
        self._set_sources = np.zeros((self.num_sets, len(self._sources)), dtype=bool)
        for l, gs in enumerate(sets):
            for m in gs.members:
                self._set_sources[l, source_index[(id(m.param), m.dim)]] = True

        entry_slice, entry_pos = [], []
        for l, gs in enumerate(sets):
            for m in gs.members:
                nz = torch.nonzero(m.incidence)
                entry_slice.append(nz[:, 0] + start[(id(m.param), m.dim)])
                entry_pos.append(nz[:, 1] + l * self.max_groups)
        self._entry_slice = torch.cat(entry_slice).to(device)
        self._entry_pos = torch.cat(entry_pos).to(device)
        self._entry_slice_np = self._entry_slice.cpu().numpy()
        self._entry_pos_np = self._entry_pos.cpu().numpy()
        self._entry_set_np = self._entry_pos_np // self.max_groups

        self._grid = self._template.clone()
        self._values = torch.full_like(self._grid, float("inf"))
        self._indices = cols.expand(self.num_sets, -1).clone()
        self._rank_buf = torch.empty_like(self._indices)
        self._cols = cols.expand(self.num_sets, -1)
        self._buckets = []
        row = 0
        widths = [bucket(gs) for gs in sets]
        while row < len(sets):
            end = row
            while end < len(sets) and widths[end] == widths[row]:
                end += 1
            w = min(widths[row], self.max_groups)
            self._buckets.append((self._grid[row:end, :w], self._values[row:end, :w], self._indices[row:end, :w]))
            row = end

    # -- norms -----------------------------------------------------------------------------------------
    def _slice_norms(self) -> Tensor:
        """Squared norm of every distinct slice, (num_slices,) — a persistent buffer."""
        if self._vectors:
            torch.cat([p.detach() for p in self._vectors], out=self._vector_out)
        for p, out in self._row_norms:
            torch.linalg.vector_norm(p.detach(), dim=1, out=out)
        self._rooted.square_()
        for (p, views), sq in zip(self._column_sums, self._squares):
            torch.mul(p.detach(), p.detach(), out=sq)  # a persistent buffer: no fresh (page-faulting) allocation
            for d, out in views:
                torch.sum(sq, dim=1 - d, out=out)
        return self._slices

    def _norms(self) -> Tensor:
        """(S, Gmax) group norms v (times `group_weight` where set), +inf padding — a persistent buffer."""
        grid = self._grid
        grid.copy_(self._template)
        grid.view(-1).index_add_(0, self._entry_pos, self._slice_norms().index_select(0, self._entry_slice))
        if self.group_weight is not None:
            grid.mul_(self.group_weight)
        return grid

    def norms(self) -> Tensor:
        """(S, Gmax) group norms v (squared L2), +inf where a set has fewer than Gmax groups."""
        with torch.no_grad():
            return self._norms().clone()

    @property
    def slice_sources(self) -> list[tuple[nn.Parameter, int]]:
        """Every (parameter, dim) a group has slices of, in buffer order."""
        return list(self._slice_sources)

    @torch.no_grad()
    def taylor_scores(self, grad_of=None) -> Tensor:
        """(S, Gmax) float64: (Σ_{w in g} ∂ℓ/∂w · w)² per group, the first-order Taylor estimate of the loss
        change of zeroing g, squared (Molchanov et al. 2019). `grad_of(param)` gives a parameter's gradient
        (default: its `.grad`; None or absent: no gradient, 0). A slice shared by several groups counts in each."""
        return self.taylor_sums(grad_of).square()

    @torch.no_grad()
    def taylor_sums(self, grad_of=None) -> Tensor:
        """(S, Gmax) float64: Σ_{w in g} ∂ℓ/∂w · w per group, unsquared (`taylor_scores` squares it; ranks
        that split one batch average this before squaring)."""
        def grad_times_weight(param, dim):
            grad = param.grad if grad_of is None else grad_of(param)
            if grad is None:
                return param.new_zeros(param.shape[dim])
            return slice_sum((grad.to_dense() if grad.is_sparse else grad) * param.detach(), dim)

        return self.group_sums(grad_times_weight, torch.float64)

    def group_sums(self, per_slice, dtype: torch.dtype | None = None) -> Tensor:
        """(S, Gmax) grid: Σ over the slices of each group of per_slice(param, dim), a (param.shape[dim],)
        tensor per source; 0 in the padding. A fixed number of ops per source, and differentiable when
        `per_slice` is (group lasso's penalty; Taylor's grad·w)."""
        values = torch.cat([per_slice(p, d) for p, d in self._slice_sources])
        if dtype is not None:
            values = values.to(dtype)
        grid = values.new_zeros(self.num_sets * self.max_groups)
        grid = grid.index_add(0, self._entry_pos, values.index_select(0, self._entry_slice))
        return grid.view(self.num_sets, self.max_groups)

    # -- scaling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _scale_slices_(self) -> None:
        for params, factors in (self._scale_first, self._scale_second):
            if params:
                torch._foreach_mul_(params, factors)  # one dispatch for every parameter

    @torch.no_grad()
    def scale_(self, log_factor: Tensor) -> None:
        """Multiply every group by exp(log_factor[l, g]) (S, Gmax); a slice in several groups gets the
        product. The proximal step passes −log(1 + 2ηy_l) on the k_l smallest groups and 0 elsewhere."""
        log_factor = log_factor.to(self._factors.dtype)
        logs = torch.zeros_like(self._factors)
        logs.index_add_(0, self._entry_slice, log_factor.reshape(-1).index_select(0, self._entry_pos))
        torch.exp(logs, out=self._factors)
        self._scale_slices_()

    # A source with more than this fraction of its slices shrunk is multiplied whole (one vectorised op);
    # below it, only its shrunk rows/columns are gathered, scaled and written back.
    DENSE_PROX_FRACTION = 0.25

    @torch.no_grad()
    def _prox_bottom_k_(self, ranks: np.ndarray, k: np.ndarray, log_factor: np.ndarray) -> None:
        """CPU fast path of the ADMM prox, in NumPy on the host: multiply the k[l] smallest groups of set l
        (ranks (S, Gmax), k (S,) int) by exp(log_factor[l]) (S,) float64 — or exp(log_factor[l, g]) with a
        (S, Gmax) log_factor —, as `scale_(where(ranks < k, log_factor, 0))` does, up to the rounding of the
        logs. Only the slices whose factor is not exp(0) = 1 are touched: a source where few are (the usual
        case: the prox shrinks the k_l smallest of hundreds of neurons) scales just those rows or columns."""
        per_group = log_factor.ndim == 2
        shrunk = (k > 0) & ((log_factor != 0).any(axis=1) if per_group else (log_factor != 0))
        touched = self._set_sources[shrunk].any(axis=0)
        if not touched.any():
            return
        entry_set = self._entry_set_np
        pruned = ranks.reshape(-1)[self._entry_pos_np] < k[entry_set]
        factor = log_factor.reshape(-1)[self._entry_pos_np] if per_group else log_factor[entry_set]
        logs = np.bincount(self._entry_slice_np, weights=np.where(pruned, factor, 0.0), minlength=self._num_slices)
        # Sources in buffer order, a matrix's rows before its columns: each element gets its factors in the
        # order `scale_` applies them.
        for j in np.flatnonzero(touched).tolist():
            p, factor, a, length, dim = self._sources[j]
            segment = logs[a : a + length]
            hit = np.flatnonzero(segment)
            data = p.detach()
            if hit.size > self.DENSE_PROX_FRACTION * length:
                np.exp(segment, out=self._factors_np[a : a + length], casting="same_kind")
                data.mul_(factor)
            elif hit.size:
                index = torch.from_numpy(hit)
                scale = torch.from_numpy(np.exp(segment[hit]).astype(self._factors_np.dtype))
                if data.dim() == 2 and dim == 0:
                    scale = scale[:, None]
                data.index_copy_(dim, index, data.index_select(dim, index).mul_(scale))

    @torch.no_grad()
    def zero_(self, pruned: Tensor) -> None:
        """Hard prune: zero every slice of every group with pruned[l, g] (S, Gmax bool)."""
        hits = torch.zeros_like(self._factors)
        hits.index_add_(0, self._entry_slice, pruned.reshape(-1).to(hits.dtype).index_select(0, self._entry_pos))
        self._factors.copy_(hits == 0)
        self._scale_slices_()

    # -- ranking ---------------------------------------------------------------------------------------
    def _ranks(self, norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(sorted values, ranks), both (S, Gmax) persistent buffers: each row sorted ascending (padding
        last), and the rank of every grid cell in its row (0 = smallest). Ties keep the lower index first
        (stable sort), so every DDP rank ranks identical weights identically. `norms` defaults to the grid
        of the last `_norms()`."""
        if norms is not None and norms is not self._grid:
            self._grid.copy_(norms)
        for grid, values, indices in self._buckets:
            torch.sort(grid, dim=1, stable=True, out=(values, indices))
        self._rank_buf.scatter_(1, self._indices, self._cols)
        return self._values, self._rank_buf

    def ranks(self, norms: Tensor) -> tuple[Tensor, Tensor]:
        """Copies of `_ranks(norms)`: (sorted values (S, Gmax), rank of every cell (S, Gmax) long)."""
        values, ranks = self._ranks(norms)
        return values.clone(), ranks.clone()

    # -- conversions -----------------------------------------------------------------------------------
    def to_dict(self, grid: Tensor) -> dict[str, Tensor]:
        """(S, Gmax) -> {set name: (G_l,)}."""
        return {gs.name: grid[l, : gs.num_groups].clone() for l, gs in enumerate(self.sets)}

    def from_dict(self, masks: dict[str, Tensor]) -> Tensor:
        """{set name: bool (G_l,)} -> (S, Gmax) bool; absent sets prune nothing."""
        grid = torch.zeros(self.num_sets, self.max_groups, dtype=torch.bool, device=self.device)
        for l, gs in enumerate(self.sets):
            if gs.name in masks:
                grid[l, : gs.num_groups] = masks[gs.name].to(device=self.device, dtype=torch.bool)
        return grid
