"""The tables of record of any model family's model (`models.family`): its `sparse` (a `SparseArch`) holds them.

Under trainer=torchrec only rank 0 holds the tables whole (the model of record); the other ranks' models have `meta`
tables: the right shapes, no memory. Their tables live only as shards.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TablesOfRecord:
    """Mixed into a model class whose `sparse` is a `SparseArch`."""

    __jit_unused_properties__ = ["holds_tables", "sparse_grad"]  # Python-side only: TorchScript would compile them

    @property
    def holds_tables(self) -> bool:
        """False when the tables are `meta` tensors (shapes only)."""
        return not any(group.weight.is_meta for group in self.sparse.groups)

    @property
    def sparse_grad(self) -> bool:
        """Whether the tables give sparse gradients (the constructor's `sparse_grad`; True without tables)."""
        return bool(self.sparse.groups[0].sparse) if len(self.sparse.groups) else True

    def release_tables(self) -> None:
        """Replace the tables by `meta` tensors of their shapes, freeing their memory (the rest is untouched)."""
        for group in self.sparse.groups:
            if not group.weight.is_meta:
                group.weight = nn.Parameter(torch.empty_like(group.weight, device="meta"),
                                            requires_grad=group.weight.requires_grad)

    def table_keys(self) -> list[str]:
        """The state-dict keys of the tables (`sparse.groups.<g>.weight`)."""
        return [f"sparse.groups.{g}.weight" for g in range(len(self.sparse.groups))]

    def table_placeholders(self, prefix: str = "") -> dict[str, Tensor]:
        """{prefix + table key: a meta tensor of its shape}: what a state dict without tables is completed with
        to load into a model that does not hold them (a copy into a meta tensor is nothing)."""
        return {f"{prefix}sparse.groups.{g}.weight": torch.empty_like(group.weight, device="meta")
                for g, group in enumerate(self.sparse.groups)}
