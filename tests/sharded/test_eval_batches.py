"""trainer=torchrec needs every rank to evaluate as many batches (each sharded forward is a collective)."""

import math

import pytest

from umec_lightning.data.core import DataError
from umec_lightning.data.datamodule import EpochBatchSampler, equal_share_batch_size


class _Rows:
    def __init__(self, rows, batch_size):
        self.num_batches = math.ceil(rows / batch_size)

    def __len__(self):
        return self.num_batches


@pytest.mark.parametrize("rows, cap, world", [(4001, 2001, 2), (4000, 2000, 2), (7, 4, 2), (10_007, 4096, 3),
                                              (3, 2, 2), (999_983, 16384, 4)])
def test_equal_share_batch_size_gives_every_rank_as_many_batches(rows, cap, world):
    size = equal_share_batch_size(rows, cap, world)
    assert 1 <= size <= cap
    # The largest such size: one more batch row than needed would not do it.
    assert all(math.ceil(rows / s) % world for s in range(size + 1, cap + 1))
    counts = [len(EpochBatchSampler(_Rows(rows, size), r, world, drop_remainder=False)) for r in range(world)]
    assert len(set(counts)) == 1 and sum(counts) * size >= rows


def test_the_plain_eval_split_can_leave_ranks_unequal():
    # What equal_share_batch_size exists for: 4001 rows at the default cap of ceil(rows / world) = 2001
    # make 2 batches here, but 4001 rows at 1500 make 3: rank 0 would wait on rank 1 forever.
    counts = [len(EpochBatchSampler(_Rows(4001, 1500), r, 2, drop_remainder=False)) for r in (0, 1)]
    assert counts == [2, 1]
    assert equal_share_batch_size(4001, 1500, 2) < 1500


def test_one_row_cannot_be_shared_by_two_ranks():
    with pytest.raises(DataError, match="cannot give each of 2 ranks"):
        equal_share_batch_size(1, 4096, 2)
