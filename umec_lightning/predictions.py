"""Per-row test predictions: what the report's paired tests on the same rows read (report/delong.py).

Every evaluation of a model on the test split (`stages.training.evaluate`) also writes
`<run dir>/test_predictions_<phase>.npz` (atomically): the label and the predicted probability of every test row,
in the cache's row order, with the data cache's fingerprint and the split. summary.json names the files:
`test_predictions` (the model the run reports),
`dense_test_predictions` (its dense pretrain point), `dense_same_epochs_test_predictions` (the shared reference's
control, `reference.py`). Two files are predictions on the same rows when fingerprint, split, row count and labels
agree (`Predictions.rows_key`).

The probabilities come from a plain float32 forward of the model in eval mode over the whole split (also under
DDP, where each rank evaluated a share; `trainer.limit_test_batches` keeps the first batches, as one process counts
them): the summary's `test_auc` is the binned AUROC of `eval.auroc_bins`
(under a reduced `trainer.precision` also of its autocast), so the exact AUC of these probabilities may differ from
it in the fifth decimal. Size: 5 bytes per test row per file.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .compression.method import model_device
from .io import write_bytes

FORMAT_VERSION = 1


def batches_evaluated(num_batches: int, limit) -> int:
    """How many of `num_batches` a Trainer's `limit_<split>_batches` evaluates (an int: that many; a fraction:
    int(fraction · batches); None or 1.0: all), as one process counts them."""
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return num_batches
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(limit, num_batches)
    return int(num_batches * float(limit))


@torch.no_grad()
def split_logits(model: torch.nn.Module, datamodule, split: str = "test", limit_batches=None):
    """(logits float32, labels) of each batch of `split` the Trainer evaluates (all, unless `limit_batches`:
    `trainer.limit_<split>_batches`), in row order, from `model` in eval mode (its mode is restored after)."""
    from .data.datamodule import BatchDataset

    rows = datamodule.split_rows(split)
    dataset = BatchDataset(datamodule.cache_dir, split, rows, datamodule.eval_batch_size, shuffle=False, seed=0)
    device = model_device(model)  # a parameter not a table (those may be meta)
    training = model.training
    model.eval()
    try:
        for i in range(batches_evaluated(len(dataset), limit_batches)):
            batch = dataset[i]
            yield model(batch.dense.to(device), batch.sparse.to(device)).float(), batch.label
    finally:
        model.train(training)


def predict_split(model: torch.nn.Module, datamodule, split: str = "test",
                  limit_batches=None) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8, probabilities float32) of the rows of `split` the Trainer evaluates, in row order
    (`split_logits`)."""
    labels, probs = [], []
    for logits, label in split_logits(model, datamodule, split, limit_batches):
        probs.append(torch.sigmoid(logits).cpu().numpy())
        labels.append(label.numpy())
    empty = np.zeros(0, dtype=np.float32)
    return (np.concatenate(labels or [empty]).astype(np.uint8), np.concatenate(probs or [empty]).astype(np.float32))


@dataclass(frozen=True)
class Predictions:
    label: np.ndarray  # (N,) uint8
    prob: np.ndarray  # (N,) float32
    fingerprint: str  # the data cache's
    split: str
    path: Path

    @property
    def rows_key(self) -> str:
        """Equal for two files exactly when they hold predictions on the same rows (data, split, count, labels)."""
        labels = hashlib.sha1(np.ascontiguousarray(self.label, dtype=np.uint8).tobytes()).hexdigest()[:16]
        return f"{self.fingerprint}/{self.split}/{len(self.label)}/{labels}"


def write_predictions(path: Path, labels: np.ndarray, probs: np.ndarray, fingerprint: str, split: str = "test") -> Path:
    if labels.shape != probs.shape or labels.ndim != 1:
        raise ValueError(f"one label and one probability per row, got shapes {labels.shape} and {probs.shape}")
    buffer = io.BytesIO()
    np.savez(buffer, label=labels.astype(np.uint8), prob=probs.astype(np.float32), fingerprint=np.array(fingerprint),
             split=np.array(split), version=np.array(FORMAT_VERSION))
    return write_bytes(Path(path), buffer.getvalue())


def read_predictions(path: Path) -> Predictions:
    """The file `write_predictions` wrote; ValueError naming it when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return Predictions(label=f["label"], prob=f["prob"], fingerprint=str(f["fingerprint"]),
                               split=str(f["split"]), path=Path(path))
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: not a test-predictions file ({err})") from None


def save_test_predictions(path: Path, model: torch.nn.Module, datamodule, limit_batches=None) -> Path:
    """Predict the test rows with `model` and write the file (see the module docstring)."""
    labels, probs = predict_split(model, datamodule, "test", limit_batches)
    return write_predictions(path, labels, probs, datamodule.meta.fingerprint, "test")
