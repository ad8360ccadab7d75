"""Dense training step, ours against facebookresearch/dlrm's `DLRM_Net`, side by side in one process.

    python bench/vs_reference.py --reference /path/to/facebookresearch/dlrm [--batches 128 2048]
        [--steps 200] [--threads 1] [--table-scale 1.0] [--model dlrm_kaggle]

The reference checkout stays outside this repository; importing `dlrm_s_pytorch` needs scikit-learn and
tensorboard (`pip install -e ".[reference]"`).

Same architecture (Kaggle: bottom 13-512-256-64-16, top -512-256-1, dim 16, the 26 Kaggle table sizes),
same weights (ours copied into the reference, checked by comparing their predictions), same Zipf batches,
each model fed its own input format (ours: the (B, 26) id block our loader yields; the reference: per-table
indices and offsets, as its loader yields), built outside the timed loop. One step is forward + BCE +
backward + SGD lr 0.1 with sparse table gradients; "ours" is the step of the default training config
(conf/config.yaml: its model, optimizer and precision). The two are timed in alternating order, step by
step, so that the machine's load falls on both; the ratio is of the medians, with the median per-step
ratio beside it. When torchrec is importable (`make torchrec`), its DLRM with a FusedEmbeddingBagCollection
(fbgemm's table-batched kernel, SGD fused into the backward) adds a line: the same architecture with its own
initial weights, so that line compares time only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import MODELS, kaggle_model, zipf_batches  # noqa: E402


def default_training_config():
    """The optimizer factory and precision of `python train.py` with no overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config")
    return instantiate(cfg.optim), str(cfg.trainer.precision), str(cfg.model.name)


def reference_model(reference: Path, ours):
    """facebookresearch/dlrm's DLRM_Net with our model's architecture and a copy of its weights."""
    sys.path.insert(0, str(reference))
    try:
        import dlrm_s_pytorch as ref
    except ImportError as err:
        raise SystemExit(f"cannot import dlrm_s_pytorch from {reference}: {err} "
                         "(it needs scikit-learn and tensorboard: pip install -e '.[reference]')") from err
    s = ours.structure
    ln_bot = np.array([s.num_dense, *s.bottom])
    ln_top = np.array([s.interaction_out, *s.top])
    # The reference builds every table with numpy's uniform draw; ours are copied over it below.
    net = ref.DLRM_Net(m_spa=s.dim if s.interaction == "dot" else s.table_dims[0],
                       ln_emb=np.array(s.table_sizes), ln_bot=ln_bot, ln_top=ln_top,
                       arch_interaction_op=s.interaction, arch_interaction_itself=s.self_interaction,
                       sigmoid_bot=-1, sigmoid_top=len(ln_top) - 2, loss_function="bce")
    with torch.no_grad():
        for k, table in enumerate(ours.sparse.tables.values()):
            net.emb_l[k].weight.copy_(table.weight)
        for mlp, seq in ((ours.dense, net.bot_l), (ours.over, net.top_l)):
            linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
            for mine, theirs in zip(mlp.layers, linears, strict=True):
                theirs.weight.copy_(mine.weight)
                theirs.bias.copy_(mine.bias)
    return net


def reference_inputs(sparse: torch.Tensor):
    """Our (B, S) id block as the reference's loader yields it: per-table offsets and indices (S, B)."""
    batch, tables = sparse.shape
    offsets = torch.arange(batch).unsqueeze(0).repeat(tables, 1)
    return offsets, sparse.t().contiguous()


def torchrec_model(ours):
    """torchrec's DLRM with a FusedEmbeddingBagCollection (SGD fused into backward), or None."""
    try:
        from torchrec import EmbeddingBagConfig
        from torchrec.models.dlrm import DLRM as TorchrecDLRM
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
    except Exception:  # not installed, or installed without a working fbgemm
        return None
    s = ours.structure
    tables = [EmbeddingBagConfig(name=f"t_{n}", embedding_dim=d, num_embeddings=rows, feature_names=[n])
              for n, rows, d in zip(s.feature_names, s.table_sizes, s.table_dims)]
    ebc = FusedEmbeddingBagCollection(tables=tables, optimizer_type=torch.optim.SGD,
                                      optimizer_kwargs={"lr": 0.1}, device=torch.device("cpu"))
    return TorchrecDLRM(embedding_bag_collection=ebc, dense_in_features=s.num_dense,
                        dense_arch_layer_sizes=list(s.bottom), over_arch_layer_sizes=list(s.top))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, required=True, help="a checkout of facebookresearch/dlrm")
    p.add_argument("--batches", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--steps", type=int, default=200, help="timed steps at batch 128 (fewer for larger)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table-scale", type=float, default=1.0, help="shrink the Kaggle tables (quick runs)")
    p.add_argument("--model", default=None, choices=sorted(MODELS), help="default: the training config's")
    args = p.parse_args()
    if not (args.reference / "dlrm_s_pytorch.py").is_file():
        raise SystemExit(f"--reference {args.reference}: no dlrm_s_pytorch.py there")
    torch.set_num_threads(args.threads)
    optimizer_factory, precision, default_model = default_training_config()
    if precision not in ("32-true", "32"):
        raise SystemExit(f"the default trainer.precision is {precision}: this bench times fp32 steps only")
    name = args.model or default_model
    t0 = time.perf_counter()
    ours = kaggle_model(name, table_scale=args.table_scale)
    theirs = reference_model(args.reference, ours)
    rec = torchrec_model(ours)
    print(f"{name}: {sum(ours.structure.table_sizes):,} table rows, built in {time.perf_counter() - t0:.0f} s; "
          f"{torch.get_num_threads()} thread(s); ours: {optimizer_factory.func.__name__}"
          f"({optimizer_factory.keywords}), precision {precision}; torchrec: "
          f"{'fused DLRM' if rec is not None else 'not importable'}")

    # Same weights, same predictions: the comparison is of one model.
    dense, sparse, _ = zipf_batches(ours, 256, 1, seed=99)[0]
    with torch.no_grad():
        mine = torch.sigmoid(ours(dense, sparse))
        ref = theirs(dense, *reference_inputs(sparse)).squeeze(1)
    gap = float((mine - ref).abs().max())
    print(f"predictions, ours vs reference, same weights: max |diff| {gap:.2e}")
    if gap > 1e-5:
        raise SystemExit("the two models disagree: the comparison would not be of one model")

    ours_opt = optimizer_factory(ours.parameters())
    ref_opt = torch.optim.SGD(theirs.parameters(), lr=0.1)

    def our_step(dense, sparse, label, _ref):
        loss = F.binary_cross_entropy_with_logits(ours(dense, sparse), label)
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()

    def ref_step(dense, _sparse, label, ref_in):
        loss = theirs.loss_fn(theirs(dense, *ref_in), label.view(-1, 1))
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()

    def rec_step(dense, _sparse, label, kjt):
        loss = F.binary_cross_entropy_with_logits(rec(dense, kjt).squeeze(1), label)
        rec_opt.zero_grad(set_to_none=True)
        loss.backward()  # the fused collection updates its tables here
        rec_opt.step()

    steps = {"ours": our_step, "reference": ref_step}
    if rec is not None:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        dense_params = [p for n, p in rec.named_parameters() if "embedding_bag_collection" not in n]
        rec_opt = torch.optim.SGD(dense_params, lr=0.1)
        steps["torchrec"] = rec_step
    for batch in args.batches:
        count = args.steps if batch <= 512 else max(40, args.steps // 4)
        warmup = 10
        batches = zipf_batches(ours, batch, count + warmup, seed=batch)
        inputs = {"ours": [None] * len(batches), "reference": [reference_inputs(b[1]) for b in batches]}
        if rec is not None:
            names = list(ours.structure.feature_names)
            inputs["torchrec"] = [KeyedJaggedTensor.from_lengths_sync(
                keys=names, values=b[1].t().reshape(-1), lengths=torch.ones(b[1].numel(), dtype=torch.int32))
                for b in batches]
        times = {k: [] for k in steps}
        for i, (dense, sparse, label) in enumerate(batches):
            order = list(steps) if i % 2 == 0 else list(steps)[::-1]  # alternate who goes first
            for k in order:
                t = time.perf_counter()
                steps[k](dense, sparse, label, inputs[k][i])
                if i >= warmup:
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        per_step = statistics.median(r / o for r, o in zip(times["reference"], times["ours"]))
        print(f"batch {batch}: ours {batch / med['ours']:.0f} samples/s, reference "
              f"{batch / med['reference']:.0f} samples/s, ratio {med['reference'] / med['ours']:.2f} "
              f"(median per-step ratio {per_step:.2f}, {count} steps)", flush=True)
        if rec is not None:
            print(f"batch {batch}: ours {batch / med['ours']:.0f} samples/s, torchrec "
                  f"{batch / med['torchrec']:.0f} samples/s, ratio {med['torchrec'] / med['ours']:.2f}", flush=True)


if __name__ == "__main__":
    main()
