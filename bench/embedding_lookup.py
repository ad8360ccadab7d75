"""The embedding part of a training step alone: lookup + backward + sparse SGD of 26 Kaggle-sized tables.

Three layouts, alternating step by step on the same Zipf ids, ms/step (median):
  bag:   one EmbeddingBag per table, called on a (B, 1) column view of the id block (our first path);
  embed: one nn.Embedding per table, on one contiguous row of a (F, B) id block (our second);
  fused: one weight for all tables, per-table row offsets, one lookup (table-batched: SparseArch's
         TableGroup, one per stored width).

    python bench/embedding_lookup.py [--batches 128 2048] [--steps 50] [--table-scale 0.1] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import KAGGLE_SIZES  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--table-scale", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dim", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [max(1, int(n * args.table_scale)) for n in KAGGLE_SIZES]
    g = torch.Generator().manual_seed(0)
    bags = [nn.EmbeddingBag(n, args.dim, mode="sum", sparse=True) for n in sizes]
    embeds = [nn.Embedding(n, args.dim, sparse=True) for n in sizes]
    fused = nn.Parameter(torch.cat([b.weight.detach() for b in bags]))
    offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    opts = {"bag": torch.optim.SGD([b.weight for b in bags], lr=0.1),
            "embed": torch.optim.SGD([e.weight for e in embeds], lr=0.1),
            "fused": torch.optim.SGD([fused], lr=0.1)}
    feature_ids = torch.arange(len(sizes))

    def bag(ids):
        cols = ids.index_select(1, feature_ids)
        return torch.stack([b(cols[:, k : k + 1]) for k, b in enumerate(bags)], 1)

    def embed(ids):
        rows = ids.t().index_select(0, feature_ids)
        return torch.stack([e(rows[k]) for k, e in enumerate(embeds)], 1)

    def fused_lookup(ids):
        return F.embedding((ids + offsets).reshape(-1), fused, sparse=True).view(ids.shape[0], len(sizes), -1)

    layouts = {"bag": bag, "embed": embed, "fused": fused_lookup}
    print(f"{len(sizes)} tables, {sum(sizes):,} rows, dim {args.dim}, {torch.get_num_threads()} thread(s)")
    limits = torch.tensor(sizes, dtype=torch.float64)
    for batch in args.batches:
        times = {k: [] for k in layouts}
        for i in range(args.steps + 10):
            u = torch.rand(batch, len(sizes), generator=g, dtype=torch.float64)
            ids = (limits**u - 1).long().clamp_max(limits.long() - 1)  # log-uniform ranks ≈ Zipf(1)
            for name in (list(layouts) if i % 2 == 0 else list(layouts)[::-1]):
                t = time.perf_counter()
                loss = layouts[name](ids).sum()
                opts[name].zero_grad(set_to_none=True)
                loss.backward()
                opts[name].step()
                if i >= 10:
                    times[name].append(time.perf_counter() - t)
        print(f"batch {batch}: " + ", ".join(f"{k} {1000 * statistics.median(v):.2f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
