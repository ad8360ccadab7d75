"""Our SparseArch as a torchrec EmbeddingBagCollection: one table per kept sparse feature, named by the
feature ("C1"...), SUM-pooled bags of exactly one id per sample, so each bag is its table's row: the same
(B, d_f) vectors as SparseArch, in feature order, projections (shared modules) after them.

The sharded EBC's output KeyedTensor lists features grouped by rank, not in input order: it is read by key
(`to_dict()`), never by position.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from ..models import DLRM


class EBCSparseArch(nn.Module):
    """sparse ids (B, S) -> list of F vectors (B, d_f), like `SparseArch`, from `ebc` (tables named by feature).

    `projections`: the projection modules of the SparseArch it stands for (Linear(r_f, d_f) by feature name).
    """

    def __init__(self, feature_names: list[str], feature_ids: list[int], table_sizes: list[int],
                 stored_dims: list[int], projections: nn.ModuleDict, device: torch.device | str = "meta"):
        super().__init__()
        self.feature_names = list(feature_names)
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[name],
                                       pooling=PoolingType.SUM)
                    for name, rows, dim in zip(feature_names, table_sizes, stored_dims)],
            device=torch.device(device))
        self.projections = projections
        # The data's column of each feature, in feature order; derived, so not checkpointed.
        self.register_buffer("feature_ids", torch.tensor(feature_ids, dtype=torch.long), persistent=False)

    @classmethod
    def of(cls, model: DLRM, projections: nn.ModuleDict | None = None,
           device: torch.device | str = "meta") -> EBCSparseArch:
        """The EBC arch of `model`'s sparse arch (tables on `device`, uninitialised on `meta`: load them)."""
        s = model.structure
        return cls(s.feature_names, list(s.feature_ids), list(s.table_sizes), list(s.stored_dims),
                   model.sparse.projections if projections is None else projections, device=device)

    def features(self, sparse: Tensor) -> KeyedJaggedTensor:
        """(B, S) ids -> the KJT of the kept features: one value per sample and feature, key-major."""
        batch = sparse.shape[0]
        values = sparse.index_select(1, self.feature_ids).t().reshape(-1)
        lengths = torch.ones(values.numel(), dtype=torch.int32, device=sparse.device)
        return KeyedJaggedTensor(keys=self.feature_names, values=values, lengths=lengths, stride=batch)

    def forward(self, sparse: Tensor) -> list[Tensor]:
        pooled = self.ebc(self.features(sparse)).to_dict()  # by key: a sharded EBC reorders its features
        out = [pooled[name] for name in self.feature_names]
        for projection in self.projections.values():
            out[projection.position] = projection(out[projection.position])
        return out


def table_key(name: str) -> str:
    """The per-table key of `name` in our checkpoints (what `SparseArch.fuse_table_keys_` loads)."""
    return f"sparse.tables.{name}.weight"


def ebc_shell(model: DLRM) -> DLRM:
    """A copy of `model` whose sparse arch is an `EBCSparseArch` with its tables on `meta` (to be sharded and
    loaded); the dense parts (MLPs, projections, gate) are copies of `model`'s, the tables are not copied."""
    memo = {id(g.weight): nn.Parameter(torch.empty(0, device="meta")) for g in model.sparse.groups}
    shell = copy.deepcopy(model, memo)
    shell.sparse = EBCSparseArch.of(model, projections=shell.sparse.projections)
    return shell
