"""Quantization under trainer=torchrec: the tables train sharded on two gloo ranks, rank 0 quantizes the gathered
tables of record, evaluates the quantized model over the whole of each split in its one process and saves it.

What a sharded run stores is what one process stores from the same float model: both runs here start from the same
single-process dense checkpoint (`pretrained=`), so the int8 codes, scales and biases must be equal bit for bit,
and the metrics equal up to float summation order (1e-6: both evaluate the same model on the same rows).
"""

from __future__ import annotations

import json
import os
import socket

import pytest

pytest.importorskip("torchrec")
pytest.importorskip("fbgemm_gpu")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from umec_lightning import load_compressed  # noqa: E402
from umec_lightning.config import ConfigError  # noqa: E402
from umec_lightning.quant import QuantizedSparseArch  # noqa: E402
from umec_lightning.run import run  # noqa: E402

from .conftest import SHARDED, SINGLE, compose_cfg, read_summary  # noqa: E402

INT8 = ["mode=quant_int8"]
# Widths chosen by the held-out probe (on rank 0's model), completed to a bytes budget there: compressed.pt of this
# small model at int4 and fp16 Linears is about 0.50 of the dense bytes (its tensors 0.40, its structure the rest).
AUTO = ["mode=quant_int8", "mode.stages=[pretrain,{kind:bits,tables:auto,tolerance:0.001},quantize]",
        "budget.bytes=0.55"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cache_dir: str, out: str, dense_ckpt: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", WANDB_MODE="offline")
    torch.set_num_threads(1)
    from pathlib import Path

    results = {}
    for name, mode in (("int8", INT8), ("auto", AUTO)):
        summary = run(compose_cfg([*SHARDED, *mode, f"pretrained={dense_ckpt}"], Path(cache_dir)),
                      Path(out) / name)
        results[name] = {"bits": summary["stages"]["bits"]["bits"], "test_auc": summary.get("test_auc")}
    (Path(out) / f"results{rank}.json").write_text(json.dumps(results))


def test_the_gathered_tables_are_quantized_as_one_process_quantizes_them(tmp_path, cache_dir):
    dense = run(compose_cfg([*SINGLE, "mode=dense", "phases.pretrain_epochs=2"], cache_dir), tmp_path / "dense")
    single = run(compose_cfg([*SINGLE, *INT8, f"pretrained={dense['best_checkpoint']}"], cache_dir),
                 tmp_path / "single")
    mp.spawn(_worker, args=(_free_port(), str(cache_dir), str(tmp_path), dense["best_checkpoint"]), nprocs=2)
    ranks = [json.loads((tmp_path / f"results{r}.json").read_text()) for r in (0, 1)]

    sharded = read_summary(tmp_path / "int8")
    assert sharded["stored_bytes"] == single["stored_bytes"]
    assert sharded["bytes_ratio"] == pytest.approx(single["bytes_ratio"], rel=1e-12)
    for key in ("val_auc", "test_auc", "val_logloss", "test_logloss"):
        assert sharded[key] == pytest.approx(single[key], abs=1e-6), key
    assert sharded["test_auc"] > 0.55  # a trained model, not two untrained ones agreeing
    ours, theirs = (load_compressed(d / "compressed.pt").state_dict() for d in (tmp_path / "int8", tmp_path / "single"))
    assert isinstance(load_compressed(tmp_path / "int8" / "compressed.pt").sparse, QuantizedSparseArch)
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert ranks[1]["int8"]["test_auc"] is None  # rank 1 held no tables: rank 0 alone evaluated the quantized model

    # `tables: auto`: rank 0 probed and both ranks went on with its plan; the saved model meets the budget.
    assert ranks[0]["auto"]["bits"] == ranks[1]["auto"]["bits"]
    assert ranks[0]["auto"]["bits"]["how"] == "auto"
    auto = read_summary(tmp_path / "auto")
    assert auto["budget_met"] is True and auto["file_bytes_ratio"]["model"] <= 0.55


def test_quantization_aware_finetuning_under_torchrec_is_refused_before_work(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"mode.stages\[3\].qat"):
        run(compose_cfg(["mode=joint_quant", "budget.bytes=0.1", "trainer=torchrec"], cache_dir), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
