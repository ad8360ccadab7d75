"""Per-step overhead of UMEC's ADMM on CPU: a dense DLRM training step vs the same step plus `UMEC.step`.

    .venv/bin/python bench/admm_step.py                      # dlrm_kaggle, dot, batch 128 and 2048
    .venv/bin/python bench/admm_step.py --interaction cat    # UMEC's `cat` variant (33 group sets)
    .venv/bin/python bench/admm_step.py --group-score taylor # norms weighted by the warm-up's Taylor scores

The dense step is forward, BCE-with-logits, backward, torch.optim.SGD (lr 0.1, sparse embedding grads).
The ADMM mode is joint (features + neurons + dims, + pairs under `dot`). Dense and ADMM steps are timed in
interleaved rounds on the same model and batches (the dense rounds run without the dim gate), so that a
noisy machine hits both alike. The ratio is (median training step with the dim gate + mean `UMEC.step`) / median dense
step: with --every-n-steps > 1 the median `UMEC.step` is one without an iteration, so its mean carries its real
average cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from umec_lightning.compression import UMEC, ADMMConfig
from umec_lightning.models import DLRM, dense_structure

KAGGLE_SIZES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]


def kaggle(interaction: str, table_scale: float) -> DLRM:
    sizes = [max(1, int(n * table_scale)) for n in KAGGLE_SIZES]
    structure = dense_structure(sparse_names=[f"C{i}" for i in range(1, 27)], table_sizes=sizes,
                                embedding_dim=16, bottom=[512, 256, 64, 16], top=[512, 256, 1], num_dense=13,
                                interaction=interaction)
    return DLRM(structure, sparse_grad=True, seed=0)


def batches(model: DLRM, batch: int, count: int, generator: torch.Generator):
    sizes = torch.tensor(model.structure.table_sizes)
    out = []
    for _ in range(count):
        dense = torch.rand(batch, 13, generator=generator) * 10
        sparse = (torch.rand(batch, 26, generator=generator) * sizes).long()
        labels = (torch.rand(batch, generator=generator) < 0.25).float()
        out.append((dense, sparse, labels))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interaction", choices=["dot", "cat"], default="dot")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant (>= 50)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved dense/ADMM rounds")
    parser.add_argument("--table-scale", type=float, default=1.0, help="scale Kaggle table rows (1 = full)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--s-optimizer", choices=["sgd", "adam"], default="adam")
    parser.add_argument("--group-score", choices=["norm", "taylor"], default="norm",
                        help="taylor: a 1-step warm-up weighs the norms; its gradient pass is timed on its own")
    parser.add_argument("--every-n-steps", type=int, nargs="+", default=[1],
                        help="ADMM iteration every n optimizer steps (admm.every_n_steps); several: one line each")
    parser.add_argument("--tensor-path", action="store_true",
                        help="run the fixed-op tensor step (what an accelerator runs) instead of the CPU NumPy path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = kaggle(args.interaction, args.table_scale)
    rows = sum(model.structure.table_sizes)
    print(f"dlrm_kaggle ({args.interaction}): {rows / 1e6:.2f} M table rows, "
          f"built in {time.perf_counter() - t0:.1f} s, {torch.get_num_threads()} threads")
    kinds = {"feature", "neuron", "dim"} | ({"pair"} if args.interaction == "dot" else set())
    taylor = args.group_score == "taylor"
    umecs = {}  # one UMEC per every_n_steps, on the same model, timed in turn
    for n in args.every_n_steps:
        umecs[n] = UMEC(model, kinds, ADMMConfig(budgets={"flops": 0.5, "params": None},
                                                 s_optimizer=args.s_optimizer, group_score=args.group_score,
                                                 warmup_steps=1 if taylor else 0, every_n_steps=n))
        if args.tensor_path:
            umecs[n]._host = False
    umec = umecs[args.every_n_steps[0]]
    print(f"group sets: {len(umec.sets)}, groups: {int(umec.packed.num_groups.sum())}")
    gate = model.dim_gate
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def train_step(dense, sparse, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(dense, sparse), labels)
        loss.backward()
        optimizer.step()

    generator = torch.Generator().manual_seed(0)
    for batch in args.batch_sizes:
        data = batches(model, batch, 8, generator)
        if taylor and umec.warming_up:  # the warm-up step: Taylor scores from one backward pass, then weights
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(*data[0][:2]), data[0][2]).backward()
            observe = []
            for _ in range(20):
                t = time.perf_counter()
                umec.observe_gradients()
                observe.append(time.perf_counter() - t)
            optimizer.step()
            for u in umecs.values():
                u.observe_gradients()
                u.step(0.1)
            print(f"warm-up: Taylor scores of one step {statistics.median(observe) * 1e3:.2f} ms (median of 20)")
        per_round = max(1, -(-args.steps // args.rounds))
        times = {"dense": []} | {n: {"train": [], "admm_only": []} for n in umecs}
        for r in range(args.rounds + 1):  # round 0 is the warm-up
            n_steps = args.warmup if r == 0 else per_round
            model.dim_gate = None  # the plain DLRM step
            for i in range(n_steps):
                t = time.perf_counter()
                train_step(*data[i % len(data)])
                if r:
                    times["dense"].append(time.perf_counter() - t)
            model.dim_gate = gate
            for n, u in umecs.items():
                for i in range(n_steps):
                    t = time.perf_counter()
                    train_step(*data[i % len(data)])
                    t1 = time.perf_counter()
                    u.step(0.1)
                    t2 = time.perf_counter()
                    if r:
                        times[n]["train"].append(t1 - t)  # with the dim gate under `dot`
                        times[n]["admm_only"].append(t2 - t1)
        dense = statistics.median(times["dense"]) * 1e3
        for n, u in umecs.items():
            # Mean, not median, for the ADMM cost: with n > 1 the median step is one without an iteration.
            admm = (statistics.median(times[n]["train"]) + statistics.fmean(times[n]["admm_only"])) * 1e3
            kept = u.log_values(u._last_stats)
            label = "" if len(umecs) == 1 else f" every_n_steps {n}:"
            print(f"batch {batch:5d}:{label} dense step {dense:.2f} ms, dense+ADMM {admm:.2f} ms "
                  f"(ADMM step alone {statistics.fmean(times[n]['admm_only']) * 1e3:.3f} ms mean), ratio "
                  f"{admm / dense:.3f} [{len(times['dense'])} steps each; flops now {kept['resource/flops']:.3f}]")

if __name__ == "__main__":
    main()
