"""CTR metrics: AUC, accuracy and logloss, DDP-synced through torchmetrics.

`BinnedAUROC` keeps two fixed-size histograms of predicted probabilities (positives, negatives) instead
of every prediction, so memory is constant whatever the size of the validation set (Terabyte: 89 M rows).
With 2^16 bins the AUC differs from the exact one only through ties inside one bin (≈ 1e-5 in practice;
a test checks it against the exact AUROC).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC


class BinnedAUROC(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, bins: int = 1 << 16, **kwargs):
        super().__init__(**kwargs)
        self.bins = bins
        self.add_state("pos", default=torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("neg", default=torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        idx = (probs.detach().float().clamp(0, 1) * (self.bins - 1)).round().long()
        pos = target.bool()
        self.pos += torch.bincount(idx[pos], minlength=self.bins).to(self.pos.dtype)
        self.neg += torch.bincount(idx[~pos], minlength=self.bins).to(self.neg.dtype)

    def compute(self) -> Tensor:
        # P(score_pos > score_neg) + 0.5 P(tie): walk bins upwards, counting negatives below each bin.
        neg_below = torch.cumsum(self.neg, 0) - self.neg
        wins = (self.pos * (neg_below + 0.5 * self.neg)).sum()
        total = self.pos.sum() * self.neg.sum()
        return (wins / total).float() if total > 0 else torch.tensor(float("nan"))


class LogLoss(Metric):
    """Mean binary cross-entropy of probabilities (the CTR 'logloss')."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits.detach().float(), target.float(), reduction="sum"
        )
        self.total += loss.double()
        self.count += target.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count).float()


def ctr_metrics(auroc_bins: int | None = 1 << 16, **metric_kwargs) -> MetricCollection:
    """auc / accuracy / logloss. `auroc_bins=None` uses the exact (memory-hungry) AUROC. `metric_kwargs` go to
    every metric (torchmetrics' `sync_on_compute=False`: one process's own rows, no collective)."""
    auc = BinaryAUROC(**metric_kwargs) if auroc_bins is None else BinnedAUROC(auroc_bins, **metric_kwargs)
    return MetricCollection({"auc": auc, "accuracy": BinaryAccuracy(**metric_kwargs)})


__all__ = ["BinnedAUROC", "LogLoss", "ctr_metrics"]
