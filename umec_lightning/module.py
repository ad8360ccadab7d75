"""The LightningModule: holds a DLRM and, while compressing, the ADMM state.

Manual optimization, because UMEC's step is not "loss.backward(); opt.step()": after the SGD step on the
weights come the proximal step on the weights and the updates of s, y and z (method.md §3), which live in
plain PyTorch in `umec_lightning.compression`. The module only orchestrates them, checkpoints their state
and logs. The loss (BCE with logits) lives here, not in the model.
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
    """`phase` names the metrics ("pretrain/train_loss", "admm/resource_flops", ...) so that one W&B run
    or CSV file can hold every phase of a run without the curves colliding."""

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
        self.compression = compression  # a `umec_lightning.compression` ADMM object, or None (dense)
        self.log_every_n_steps = max(1, int(log_every_n_steps))
        self.val_metrics = ctr_metrics(auroc_bins)
        self.val_logloss = LogLoss()
        self.test_metrics = ctr_metrics(auroc_bins)
        self.test_logloss = LogLoss()
        self.last_loss: float | None = None
        self.last_stats: dict | None = None

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.model(dense, sparse)

    def configure_optimizers(self):
        # Plain SGD (reference DLRM): it accepts the sparse gradients of the embedding tables.
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)

    # ---- training --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int):
        opt = self.optimizers()
        logits = self.model(batch.dense, batch.sparse)
        loss = F.binary_cross_entropy_with_logits(logits, batch.label)
        # A NaN must stop the run before it reaches the weights (and the next checkpoint).
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(self._nan_message(loss_value))
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        if self.compression is not None:
            # Tensors only: callbacks.SparsityLogger reads them every n steps (no per-step host sync).
            self.last_stats = self.compression.step(self.lr)
        self.last_loss = loss_value
        if self.global_step % self.log_every_n_steps == 0:
            self.log(f"{self.phase}/train_loss", loss_value, prog_bar=True, on_step=True, on_epoch=False)
        return loss.detach()

    def _nan_message(self, value: float) -> str:
        where = f"{self.phase} step {self.global_step} (epoch {self.current_epoch})"
        duals = ""
        if self.compression is not None and self.last_stats is not None:
            values = self.compression.log_values(self.last_stats)
            duals = "; last dual values seen: " + ", ".join(
                f"{k}={v:.4g}" for k, v in values.items() if k.startswith(("y/", "z/"))
            )
        return f"training loss became {value} at {where}{duals}"

    # ---- evaluation ------------------------------------------------------------------------------
    def _eval_step(self, batch, metrics, logloss) -> None:
        logits = self.model(batch.dense, batch.sparse)
        target = batch.label.long()
        metrics.update(torch.sigmoid(logits), target)
        logloss.update(logits, batch.label)

    def _eval_epoch_end(self, split: str, metrics, logloss) -> None:
        values = {f"{split}/{k}": v for k, v in metrics.compute().items()}
        values[f"{split}/logloss"] = logloss.compute()
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

    # ---- checkpointing the ADMM state --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lets `pretrained=` refuse a checkpoint made for another model or data config.
        checkpoint["dlrm_structure"] = self.model.structure.to_dict()
        if self.compression is not None:
            checkpoint["umec_state"] = self.compression.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.compression is not None and "umec_state" in checkpoint:
            self.compression.load_state_dict(checkpoint["umec_state"])
