"""Quantized tables through train.py's pipeline (conf/mode/quant_*, qat_int4, joint_int8, joint_quant): the stored
bytes reported are the saved model's, what a server loads (TorchScript, ONNX run by onnxruntime, `load_compressed`)
computes the in-framework quantized model's outputs on 1,000 test rows, a bytes budget is met or reported unmet,
and bad stage lists are refused before any work."""

from __future__ import annotations

import pytest
import torch

from umec_lightning import load_compressed
from umec_lightning.config import ConfigError
from umec_lightning.quant import QuantizedSparseArch, model_bytes
from umec_lightning.run import build_datamodule, run

from .conftest import compose_cfg

FAST = ["phases.pretrain_epochs=1", "phases.compress_epochs=1", "phases.finetune_epochs=1",
        "loader.limit_rows={train:6000,val:2000,test:2000}"]


def first_test_rows(cfg, count: int = 1000):
    dm = build_datamodule(cfg)
    dm.ensure_ready()
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    return batch.dense[:count], batch.sparse[:count]


def test_int4_tables_are_served_as_trained_from_every_exported_format(tmp_path, cache_dir):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torchrec")
    cfg = compose_cfg(["mode=quant_int4", "export.torchscript=true", "export.onnx=true", "export.torchrec=true",
                       *FAST], cache_dir)
    summary = run(cfg, tmp_path)
    assert summary["stages"]["bits"]["bits"]["tables"] == {n: 4 for n in summary["stages"]["bits"]["bits"]["tables"]}
    model = load_compressed(tmp_path / "compressed.pt").eval()
    assert isinstance(model.sparse, QuantizedSparseArch) and set(model.sparse.bits.values()) == {4}
    assert model_bytes(model) == summary["stored_bytes"]  # the figure is the saved model's
    # int4 codes: half a byte a value plus 4 bytes of scale and bias a row, against fp32's 4 bytes a value
    rows = sum(t.codes.shape[0] for t in model.sparse.tables.values())
    values = sum(t.codes.shape[0] * t.dim for t in model.sparse.tables.values())
    assert summary["stored_bytes"]["tables"] == sum(t.codes.numel() for t in model.sparse.tables.values()) + 4 * rows
    assert summary["dense_stored_bytes"]["tables"] == 4 * values
    assert summary["bytes_ratio"] == summary["stored_bytes"]["total"] / summary["dense_stored_bytes"]["total"]
    # The files hold the codes as codes: ONNX's weights are the stored bytes (uint8 codes, fp16 scales and biases,
    # the fp32 dense layers), beside a graph of a few kB a table that a model this small makes visible.
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "compressed.onnx")).graph.initializer]
    by_type = {str(w.dtype): 0 for w in weights}
    for w in weights:
        by_type[str(w.dtype)] += w.nbytes
    assert by_type["uint8"] == sum(t.codes.numel() for t in model.sparse.tables.values())
    assert by_type["float16"] == 4 * rows
    assert summary["export_bytes"]["onnx"] > sum(by_type.values())
    assert summary["export_bytes"]["torchscript"] > summary["stored_bytes"]["total"]

    dense, sparse = first_test_rows(cfg)
    with torch.no_grad():
        expected = model(dense, sparse)
    scripted = torch.jit.load(str(tmp_path / "compressed.torchscript.pt"))
    torch.testing.assert_close(scripted(dense, sparse), expected, rtol=0, atol=1e-5)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "compressed.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"dense": dense.numpy(), "sparse": sparse.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # torchrec's quantized EmbeddingBagCollection (fbgemm's int-N TBE) serving the same codes: the file holds them
    # in fbgemm's rows (at fbgemm's CPU row alignment: unpadded) with the TBE's offsets and the pickled modules
    served = torch.load(str(tmp_path / "compressed.torchrec.pt"), weights_only=False)
    with torch.no_grad():
        assert torch.equal(served(dense, sparse), expected)
    assert summary["export_bytes"]["torchrec"] > summary["stored_bytes"]["total"]
    # The files read back, timed against the dense model's TorchScript export (ONNX runs outside torch: not timed)
    timing = summary["export_latency_ms"]
    assert set(timing["ratio"]) == {"torchscript", "torchrec"} and timing["threads"] == 1
    for fmt in ("dense", "torchscript", "torchrec"):
        assert all(ms > 0 for ms in timing["ms"][fmt].values()), fmt


def _served_by_fbgemm_equals(model, dense, sparse, expected) -> None:
    """fbgemm's int-N TBE (torchrec's quantized tables' kernel) serving the saved model's tables gives its logits."""
    pytest.importorskip("fbgemm_gpu")
    from umec_lightning.quant.fbgemm import serve_with_fbgemm

    with torch.no_grad():
        assert torch.equal(serve_with_fbgemm(model)(dense, sparse), expected)


def test_a_bytes_budget_is_met_on_the_served_files_or_reported_unmet(tmp_path, cache_dir):
    # 0.4: the planned widths alone, with compressed.pt's own bytes, are over it: the pruning has a share to take
    summary = run(compose_cfg(["mode=joint_quant", "budget.bytes=0.4", *FAST], cache_dir), tmp_path)
    bits = summary["stages"]["bits"]["bits"]
    assert bits["how"] == "auto" and {"16", "8", "4", "dense16"} <= set(bits["probe"])
    assert summary["budget"] == {"bytes": 0.4}
    on_disk = (tmp_path / "compressed.pt").stat().st_size
    assert summary["file_bytes"] == {"model": on_disk}
    assert summary["budget_met_files"] == (on_disk <= 0.4 * summary["dense_stored_bytes"]["total"])
    assert summary["budget_met"] == (summary["bytes_ratio"] <= 0.4 and summary["budget_met_files"])
    assert summary["budget_met"] is True  # the pruning held back room for compressed.pt's own bytes
    quantize = summary["stages"]["quantize"]
    assert quantize["stored_bytes"] == summary["stored_bytes"]
    for step in quantize["forced_widths"]:  # the completion's steps, each said
        assert step["to"] < step["from"] and step["bytes_saved"] > 0
    model = load_compressed(tmp_path / "compressed.pt")
    assert model_bytes(model)["total"] == summary["stored_bytes"]["total"]
    assert summary["params_ratio"] < 1  # the pruning stage took its share


def test_quantization_aware_finetuning_reports_the_fake_quantized_metrics(tmp_path, cache_dir):
    summary = run(compose_cfg(["mode=qat_int4", *FAST], cache_dir), tmp_path)
    finetune = summary["stages"]["finetune"]
    if finetune.get("qat_kept_start"):  # training never beat its starting point on validation: it was kept
        assert finetune["qat_trained_val_auc"] < summary["val_auc"] + 2e-4
    else:
        assert {"qat_val_auc", "qat_test_auc"} <= set(finetune)
        # The stored int4 model serves the values it trained on: its test AUC is the fake-quantized one's.
        assert summary["test_auc"] == pytest.approx(finetune["qat_test_auc"], abs=2e-4)
    assert finetune["epochs_run"] >= 1


@pytest.mark.parametrize("stages, key", [
    ("[pretrain,quantize]", "needs a `bits` stage"),
    ("[pretrain,{kind:finetune,qat:true}]", "needs a `bits` stage"),
    ("[pretrain,{kind:bits,tables:4},quantize,finetune]", "must be the last"),
    ("[pretrain,{kind:bits,tables:3}]", "mode.stages[1].tables"),
    ("[pretrain,{kind:bits,tables:8,dense:8}]", "mode.stages[1].dense"),
])
def test_a_bad_quantization_stage_list_is_refused_before_work(tmp_path, cache_dir, stages, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        run(compose_cfg(["mode=quant_int8", f"mode.stages={stages}", *FAST], cache_dir), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_a_bytes_budget_widths_alone_cannot_reach_is_refused_before_work(tmp_path, cache_dir):
    """quant_int8 under budget.bytes=0.2: even int4 tables and fp16 Linears (what the quantize stage can complete
    to) with compressed.pt's own bytes are over it; refused before pretraining, naming the key."""
    with pytest.raises(ConfigError, match=r"config key `budget.bytes`: 0.2 is out of reach of mode=quant_int8"):
        run(compose_cfg(["mode=quant_int8", "budget.bytes=0.2", *FAST], cache_dir), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_auto_widths_need_a_bytes_budget(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="budget.bytes"):
        run(compose_cfg(["mode=joint_quant", "budget.flops=0.5", *FAST], cache_dir), tmp_path)


def test_a_deepfm_stores_its_tables_quantized_first_order_column_and_all(tmp_path, cache_dir):
    """Every family keeps its tables in `sparse`: DeepFM's rows (D + 1 wide, the first-order weight last) go int8."""
    cfg = compose_cfg(["mode=quant_int8", "model=deepfm", "model.deep=[32]", "model.embedding_dim=4", *FAST], cache_dir)
    summary = run(cfg, tmp_path)
    model = load_compressed(tmp_path / "compressed.pt").eval()
    assert isinstance(model.sparse, QuantizedSparseArch) and {s.stored_dim for s in model.sparse.specs} == {5}
    assert model_bytes(model) == summary["stored_bytes"] and summary["bytes_ratio"] < 1
    assert abs(summary["delta_test_auc"]) < 0.01  # int8 rows: the same model, near enough
    dense, sparse = first_test_rows(cfg)
    with torch.no_grad():
        _served_by_fbgemm_equals(model, dense, sparse, model(dense, sparse))


def test_low_rank_and_bits_meet_a_bytes_budget_or_are_refused_before_work(tmp_path, cache_dir):
    """lowrank_quant: the check before the data assumes the loosest widths `auto` could pick (int4 tables, fp16
    Linears), prices parameters as the run will and holds back the served files' own bytes (`quant.served`: on this
    108 kB model compressed.pt's structure and zip records are a fifth of it); a budget the int4 rows' scales and
    biases and the files' bytes exceed (at rank 1 everywhere) is refused naming `budget`, one within reach is met on
    the stored model and on the file written (compressed.pt)."""
    with pytest.raises(ConfigError, match=r"config key `budget`.*rank 1"):
        run(compose_cfg(["mode=lowrank_quant", "budget.bytes=0.3", *FAST], cache_dir), tmp_path / "refused")
    assert not (tmp_path / "refused" / "checkpoints").exists()
    # a TorchScript export's code and records of 26 projected tables: a third of this model's bytes
    with pytest.raises(ConfigError, match=r"config key `budget`.*model, torchscript\) need \d+ of their own"):
        run(compose_cfg(["mode=lowrank_quant", "budget.bytes=0.3", "export.torchscript=true", *FAST], cache_dir),
            tmp_path / "refused_files")
    summary = run(compose_cfg(["mode=lowrank_quant", "budget.bytes=0.6", "mode.method.calibration_batches=5",
                               *FAST], cache_dir), tmp_path / "met")
    assert summary["budget_met"] is True and summary["budget_met_files"] is True and summary["bytes_ratio"] <= 0.6
    assert summary["stages"]["bits"]["bits"]["how"] == "auto"
    assert model_bytes(load_compressed(tmp_path / "met" / "compressed.pt")) == summary["stored_bytes"]
    dense = summary["dense_stored_bytes"]["total"]
    on_disk = (tmp_path / "met" / "compressed.pt").stat().st_size
    assert summary["file_bytes"] == {"model": on_disk} and on_disk <= 0.6 * dense
    # the quantize stage's estimate of the file bounds it (quant/served.py)
    assert on_disk <= summary["stages"]["quantize"]["served_bytes_estimate"]["model"]
    compress = summary["stages"]["compress"]
    assert compress["served_files_reserve_bytes"] > 0
    # the ranks fit again to what their own layout's files take, at most the upper bound held back first
    assert compress["layout_allocations"] >= 1 and compress["layout_reserve_bytes"] <= compress[
        "served_files_reserve_bytes"]
