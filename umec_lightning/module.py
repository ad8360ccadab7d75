"""The LightningModule: holds a DLRM and, while compressing, a compression method.

Manual optimization, because a compression step is not "loss.backward(); opt.step()": UMEC follows the SGD
step on the weights with the proximal step and the updates of s, y and z (method.md §3), Taylor pruning reads
the gradients before the step, group lasso adds a loss term. The methods live in plain PyTorch in
`umec_lightning.compression` (interface: `compression.method.CompressionMethod`); the module only calls their
hooks, checkpoints their state and logs. The loss (BCE with logits) lives here, not in the model.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from .metrics import LogLoss, ctr_metrics
from .models import DLRM


class NonFiniteLossError(RuntimeError):
    pass


class CTRModule(pl.LightningModule):
    """`phase` prefixes every metric ("pretrain/train_loss", "compress/resource/flops", "finetune/val/auc")
    so that one W&B run or CSV file holds every phase of a run without the curves colliding.

    Results travel on the module: `compression_history` (the logged compression values, checkpointed) and
    `extracted` (set by the extraction callback at the end of a compress stage)."""

    def __init__(
        self,
        model: DLRM,
        lr: float = 0.1,
        phase: str = "train",
        compression=None,
        auroc_bins: int | None = 1 << 16,
        log_every_n_steps: int = 50,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.lr = lr
        self.phase = phase
        self.compression = compression  # a `CompressionMethod`, or None (dense training)
        self.log_every_n_steps = max(1, int(log_every_n_steps))
        self.val_metrics = ctr_metrics(auroc_bins)
        self.val_logloss = LogLoss()
        self.test_metrics = ctr_metrics(auroc_bins)
        self.test_logloss = LogLoss()
        self.last_loss: float | None = None
        self.compression_history: list[dict] = []
        self.extracted = None  # set by the extraction callback
        self.samples_per_second = 0.0  # set by the throughput callback

    @property
    def val_monitor(self) -> str:
        """The metric a best-on-validation checkpoint of this phase monitors."""
        return f"{self.phase}/val/auc"

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.model(dense, sparse)

    def on_fit_start(self) -> None:
        # The strategy has placed the model now (and a checkpoint may have been restored on CPU before):
        # the method's tensors follow it.
        if self.compression is not None:
            self.compression.to(self.device)

    def configure_optimizers(self):
        # Plain SGD (reference DLRM): it accepts the sparse gradients of the embedding tables.
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)

    # ---- training --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int):
        opt = self.optimizers()
        logits = self.model(batch.dense, batch.sparse)
        loss = F.binary_cross_entropy_with_logits(logits, batch.label)
        method = self.compression
        penalty = method.loss(self.model) if method is not None else None
        total = loss if penalty is None else loss + penalty
        # A NaN must stop the run before it reaches the weights (and the next checkpoint).
        loss_value = float(loss.detach())
        total_value = loss_value if penalty is None else float(total.detach())
        if not math.isfinite(total_value):
            raise NonFiniteLossError(self._nan_message(total_value))
        opt.zero_grad(set_to_none=True)
        self.manual_backward(total)
        if method is not None:
            method.after_backward(self.model)
        opt.step()
        if method is not None:
            method.after_step(self.model, self.lr)
        self.last_loss = loss_value
        if self.global_step % self.log_every_n_steps == 0:
            self.log(f"{self.phase}/train_loss", loss_value, prog_bar=True, on_step=True, on_epoch=False)
        return loss.detach()

    def _nan_message(self, value: float) -> str:
        where = f"{self.phase} step {self.global_step} (epoch {self.current_epoch})"
        duals = ""
        if self.compression is not None:
            values = self.compression.log_values()
            shown = {k: v for k, v in values.items() if k.startswith(("y/", "z/"))}
            if shown:
                duals = "; last dual values seen: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
        return f"training loss became {value} at {where}{duals}"

    # ---- evaluation ------------------------------------------------------------------------------
    def _eval_step(self, batch, metrics, logloss) -> None:
        logits = self.model(batch.dense, batch.sparse)
        target = batch.label.long()
        metrics.update(torch.sigmoid(logits), target)
        logloss.update(logits, batch.label)

    def _eval_epoch_end(self, split: str, metrics, logloss) -> None:
        values = {f"{self.phase}/{split}/{k}": v for k, v in metrics.compute().items()}
        values[f"{self.phase}/{split}/logloss"] = logloss.compute()
        self.log_dict(values, prog_bar=split == "val", sync_dist=False)
        metrics.reset()
        logloss.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_logloss)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_metrics, self.val_logloss)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_logloss)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_metrics, self.test_logloss)

    def load_weights(self, checkpoint_path) -> None:
        """The weights of a Lightning checkpoint of this module (e.g. the best-on-validation one)."""
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        self.load_state_dict(state["state_dict"])

    # ---- checkpointing the compression state -------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lets `pretrained=` refuse a checkpoint made for another model or data config.
        checkpoint["dlrm_structure"] = self.model.structure.to_dict()
        if self.compression is not None:
            checkpoint["compression_state"] = self.compression.state_dict()
            checkpoint["compression_history"] = list(self.compression_history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.compression is not None and "compression_state" in checkpoint:
            self.compression.load_state_dict(checkpoint["compression_state"])
            self.compression_history = list(checkpoint.get("compression_history", []))
