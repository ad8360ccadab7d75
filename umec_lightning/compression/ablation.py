"""How much each input feature is worth on held-out data: the loss increase when it is held at its mean.

    score_f = ℓ(batches | input f replaced by its mean looked-up vector) − ℓ(batches)

for every sparse feature (its table's output) and the dense block (the bottom MLP's output). Unlike a
Taylor score, Σ_batches (Σ_{w in g} ∂ℓ/∂w·w)², it does not count gradient noise as importance: a frequent
noise feature (Kaggle's 4-value C20) has a large per-batch gradient and so a high Taylor score, yet holding it
at its mean costs nothing on held-out data (or helps: it was fitted to noise). How it ranks the planted-noise
features of the synthetic data: docs/results_features.md. The `importance.Holdout` part scores the feature set
by it (ADMM: `admm.group_score=holdout`); `bench/feature_ablation.py` prints it for a checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DENSE = "dense"


def _inputs(model) -> dict[str, tuple[nn.Module, int | None]]:
    """{feature name: (module, k)}: that feature's vector is the module's output (k None) or its k-th entry
    (k: the table's place in SparseArch's output list; the tables share lookups, so no table module has
    an output of its own), the dense block first. Any sparse arch with SparseArch's output list works (the
    sharded one of `trainer=torchrec` too)."""
    out = {DENSE: (model.dense, None)} if model.dense is not None else {}
    out.update((name, (model.sparse, k)) for k, name in enumerate(model.structure.feature_names))
    return out


def _replace(output, k: int | None, mean):
    """`output` with the feature's vector (all of it, or entry k of the list) held at `mean`."""
    if k is None:
        return mean.expand_as(output)
    out = list(output)
    out[k] = mean.expand_as(out[k])
    return out


@torch.no_grad()
def mean_ablation_scores(model, batches) -> dict[str, float]:
    """{feature: held-out BCE increase when held at its mean} over `batches` of (dense, sparse, label).
    The mean is each input's average vector over the same batches (two passes, then one per feature)."""
    was_training = model.training
    model.eval()
    batches = list(batches)
    inputs = _inputs(model)
    sums = {name: None for name in inputs}

    def collect(name, k):
        def hook(_module, _args, output):
            total = (output if k is None else output[k]).sum(0)
            sums[name] = total if sums[name] is None else sums[name] + total
        return hook

    def loss() -> float:
        total, n = 0.0, 0
        for dense, sparse, label in batches:
            logits = model(dense, sparse)
            total += float(F.binary_cross_entropy_with_logits(logits, label, reduction="sum"))
            n += label.numel()
        return total / max(n, 1)

    handles = [m.register_forward_hook(collect(name, k)) for name, (m, k) in inputs.items()]
    try:
        base = loss()
        count = sum(label.numel() for _, _, label in batches)
    finally:
        for h in handles:
            h.remove()
    scores = {}
    for name, (module, k) in inputs.items():
        mean = sums[name] / max(count, 1)
        handle = module.register_forward_hook(lambda _m, _a, output, k=k, mean=mean: _replace(output, k, mean))
        try:
            scores[name] = loss() - base
        finally:
            handle.remove()
    model.train(was_training)
    return scores
