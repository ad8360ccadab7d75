"""Our SparseArch as a torchrec EmbeddingBagCollection: one table per kept sparse feature, named by the
feature ("C1"...), SUM-pooled bags of exactly one id per sample, so each bag is its table's row: the same
(B, d_f) vectors as SparseArch, in feature order, projections (shared modules) after them.

The sharded EBC's output KeyedTensor lists features grouped by rank, not in input order: it is read by key
(`to_dict()`), never by position.

Widths. fbgemm's kernels (every sharded compute kernel, CPU too) need each shard's width divisible by 4;
compression narrows tables to any width (3 of 4 dims kept, a `cat` table at 5). A table of width d is
stored at `padded_width(d)` columns, the extra ones zero, and its output sliced back to d: the slice passes
no gradient to the padding, so it stays zero and the model is exactly the width-d one (≤ 3 columns of
memory per table). `SHARD_WIDTH` names the multiple.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from ..models import DLRM

SHARD_WIDTH = 4


def padded_width(dim: int) -> int:
    """The stored width of a table of width `dim`: the next multiple of `SHARD_WIDTH`."""
    return -(-dim // SHARD_WIDTH) * SHARD_WIDTH


class EBCSparseArch(nn.Module):
    """sparse ids (B, S) -> list of F vectors (B, d_f), like `SparseArch`, from `ebc` (tables named by feature).

    `projections`: the projection modules of the SparseArch it stands for (Linear(r_f, d_f) by feature name).
    """

    def __init__(self, feature_names: list[str], feature_ids: list[int], table_sizes: list[int],
                 stored_dims: list[int], projections: nn.ModuleDict, device: torch.device | str = "meta"):
        super().__init__()
        self.feature_names = list(feature_names)
        self.dims = dict(zip(self.feature_names, stored_dims))  # each table's real width (module docstring)
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=name, embedding_dim=padded_width(dim), num_embeddings=rows,
                                       feature_names=[name], pooling=PoolingType.SUM)
                    for name, rows, dim in zip(feature_names, table_sizes, stored_dims)],
            device=torch.device(device))
        self.projections = projections
        # The data's column of each feature, in feature order; derived, so not checkpointed.
        self.register_buffer("feature_ids", torch.tensor(feature_ids, dtype=torch.long), persistent=False)

    @classmethod
    def of(cls, model: DLRM) -> EBCSparseArch:
        """The EBC arch of `model`'s sparse arch, sharing its projections; tables on `meta` (DMP allocates
        the shards, `tables.load_tables` fills them)."""
        s = model.structure
        return cls(s.feature_names, list(s.feature_ids), list(s.table_sizes), list(s.stored_dims),
                   model.sparse.projections)

    def features(self, sparse: Tensor) -> KeyedJaggedTensor:
        """(B, S) ids -> the KJT of the kept features: one value per sample and feature, key-major."""
        batch = sparse.shape[0]
        values = sparse.index_select(1, self.feature_ids).t().reshape(-1)
        lengths = torch.ones(values.numel(), dtype=torch.int32, device=sparse.device)
        return KeyedJaggedTensor(keys=self.feature_names, values=values, lengths=lengths, stride=batch)

    def forward(self, sparse: Tensor) -> list[Tensor]:
        pooled = self.ebc(self.features(sparse)).to_dict()  # by key: a sharded EBC reorders its features
        out = [pooled[name] if self.dims[name] == pooled[name].shape[1] else pooled[name][:, : self.dims[name]]
               for name in self.feature_names]
        for projection in self.projections.values():
            out[projection.position] = projection(out[projection.position])
        return out


def ebc_shell(model: nn.Module) -> nn.Module:
    """A model of `model`'s family whose sparse arch is an `EBCSparseArch` with its tables on `meta` (to be sharded
    and loaded), and whose every other module and parameter *is* `model`'s (MLPs, interaction or cross network,
    projections, dimension gate; nothing copied). So the dense weights DMP trains are the plain model's own: a
    compression method's group sets, built on the plain model, see every step (its prox and gates act on what
    trains), and at the end only the tables need to come back."""
    shell = copy.copy(model)  # the same attributes; its own module registries, so `sparse` is replaced in it alone
    shell._modules, shell._parameters, shell._buffers = dict(model._modules), dict(model._parameters), \
        dict(model._buffers)
    shell.sparse = EBCSparseArch.of(model)
    return shell
