"""QuantizedSparseArch and quantize_tables (quant/sparse.py, quant/apply.py): for DLRM (`dot`, and `cat` with
projected tables of odd stored widths), DCNv2 and DeepFM, the quantized model computes exactly what the float model
computes on the dequantized tables; its state dict has stable names and rebuilds it; TorchScript equals eager and
ONNX is within 1e-5 of it at 8 and 4 bits; the bytes are the row-wise formula's (fp32 / int8 = 3.2 and
fp32 / int4 = 5.33 for 1000-row, 16-wide tables)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from umec_lightning.compressed import read_compressed, save_compressed
from umec_lightning.compression.export import export_onnx, export_torchscript, random_inputs
from umec_lightning.compression.kept import Kept
from umec_lightning.models import DLRM, dense_structure, measure
from umec_lightning.models.dcnv2 import dense_dcnv2_structure
from umec_lightning.models.deepfm import dense_deepfm_structure
from umec_lightning.models.family import family_of_model, family_of_structure
from umec_lightning.quant import (
    HalfStoredLinear,
    QuantizedSparseArch,
    dense_to_half,
    dequantize_rows,
    model_bytes,
    quantize_rows,
    quantize_tables,
    storage_bytes,
)

NAMES = ["C1", "C2", "C3", "C4"]
SIZES = [10, 20, 30, 40]
MIXED = {"C1": 8, "C2": 4, "C3": 16}  # C4 unnamed: fp32
FUSED = {"C1": 4, "C2": 16, "C3": 4, "C4": 16}  # tables of one width: two groups of two, (4 bits: C1, C3), (16: C2, C4)


pytestmark = pytest.mark.usefixtures("one_thread")


def structure(kind: str):
    if kind == "dcnv2":
        return dense_dcnv2_structure(sparse_names=NAMES, table_sizes=SIZES, embedding_dim=4, num_dense=3, deep=[8],
                                     cross_layers=2, cross_rank=None, experts=1, stacking="parallel",
                                     dense_names=["I1", "I2", "I3"])
    if kind == "deepfm":  # tables D + 1 = 5 wide: odd, the int4 pad nibble
        return dense_deepfm_structure(sparse_names=NAMES, table_sizes=SIZES, embedding_dim=4, num_dense=3, deep=[8],
                                      dense_names=["I1", "I2", "I3"])
    s = dense_structure(sparse_names=NAMES, table_sizes=SIZES, embedding_dim=4, bottom=[8, 4], top=[8, 1],
                        num_dense=3, dense_names=["I1", "I2", "I3"], interaction="dot" if kind == "dot" else "cat")
    if kind == "projected":  # stored widths 3, 5, 2, 2; C4 projected 2 -> 4 (with a bias)
        s = dataclasses.replace(s, table_dims=[3, 5, 2, 4], table_ranks=[3, 5, 2, 2], projection_bias=True)
    return s


def model_of(kind: str, seed: int = 0) -> nn.Module:
    s = structure(kind)
    model = family_of_structure(s.to_dict()).build(s, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # off their defaults, so that a dropped bias or norm statistic shows
        for name, p in model.named_parameters():
            if name.endswith("bias") and not name.startswith("sparse.groups"):
                p.normal_(0.0, 0.1, generator=gen)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0.0, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    return model


def dequantized_float(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """The float model with its tables overwritten by the quantized model's dequantized tables."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in quantized.sparse.dequantized_weights().items():
            out.sparse.tables[name].weight.copy_(weight)
    return out


KINDS = ["dot", "projected", "dcnv2", "deepfm"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [8, 4, "mixed", "fused"])
def test_equals_float_model_on_dequantized_tables(kind, bits):
    model = model_of(kind)
    bits = {"mixed": MIXED, "fused": FUSED}.get(bits, bits)
    q = quantize_tables(model, bits)
    assert isinstance(q.sparse, QuantizedSparseArch) and isinstance(model.sparse, type(model.sparse))
    assert q.sparse is not model.sparse
    reference = dequantized_float(model, q)
    dense, sparse = random_inputs(model.structure, batch_size=16, seed=1)
    with torch.no_grad():
        got, expected = q.sparse(sparse), reference.sparse(sparse)
        assert len(got) == len(expected) == 4
        for g, e in zip(got, expected):
            assert g.dtype == torch.float32 and torch.equal(g, e)
        assert torch.equal(q(dense, sparse), reference(dense, sparse))
        # and the quantization moved the model only a little
        assert (q(dense, sparse) - model(dense, sparse)).abs().max() < 0.1


def test_bits_per_table_and_untouched_original():
    model = model_of("projected")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_tables(model, MIXED)
    assert q.sparse.bits == {"C1": 8, "C2": 4, "C3": 16, "C4": 32}
    assert [t.bits for t in q.sparse.tables.values()] == [8, 4, 16, 32]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(q.sparse.tables["C4"].weight, model.sparse.tables["C4"].weight)  # fp32: the weight itself
    assert torch.equal(q.sparse.tables["C3"].weight, model.sparse.tables["C3"].weight.half())
    weights = q.sparse.dequantized_weights()
    for name in NAMES:
        assert torch.equal(dequantize_rows(q.sparse.table(name)), weights[name])
    assert q.sparse.specs == QuantizedSparseArch.empty(model.structure, MIXED).specs  # the arch's and the structure's
    deepfm = model_of("deepfm")
    assert quantize_tables(deepfm, 8).sparse.specs == QuantizedSparseArch.empty(deepfm.structure, 8).specs
    with pytest.raises(ValueError, match="unknown tables"):
        quantize_tables(model, {"C9": 8})
    with pytest.raises(ValueError, match="bit width"):
        quantize_tables(model, 5)
    meta = model_of("dot")
    meta.release_tables()  # (not DLRM(hold_tables=False): its init on meta tensors costs seconds the first time)
    with pytest.raises(ValueError, match="meta"):
        quantize_tables(meta, 8)


@pytest.mark.parametrize("kind", ["projected", "deepfm"])
def test_state_dict_names_and_rebuild(kind):
    model = model_of(kind)
    q = quantize_tables(model, MIXED)
    keys = [k for k in q.state_dict() if k.startswith("sparse.")]
    # one group per (bits, stored width), in order of their first table: here each table is alone in its group
    expected = [f"sparse.qgroups.{g}.{part}" for g in (0, 1) for part in ("codes", "scale", "bias")]
    expected += ["sparse.qgroups.2.weight", "sparse.qgroups.3.weight"]
    if kind == "projected":
        expected += ["sparse.projections.C4.weight", "sparse.projections.C4.bias"]
    assert keys == expected
    state = q.state_dict()
    assert state["sparse.qgroups.1.codes"].dtype == torch.uint8
    assert state["sparse.qgroups.0.scale"].dtype == state["sparse.qgroups.2.weight"].dtype == torch.float16

    rebuilt = family_of_model(model).build(model.structure).eval()
    rebuilt.sparse = QuantizedSparseArch.empty(model.structure, MIXED)
    rebuilt.load_state_dict(state, strict=True)
    dense, sparse = random_inputs(model.structure, batch_size=16, seed=2)
    with torch.no_grad():
        assert torch.equal(rebuilt(dense, sparse), q(dense, sparse))


def _index_selects(module: nn.Module, *inputs) -> int:
    """How many index_select calls a forward of `module` makes."""
    calls = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "index_select":
                calls.append(func)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        module(*inputs)
    return len(calls)


def test_tables_of_one_bits_and_width_share_one_group():
    model = model_of("dot")
    q = quantize_tables(model, FUSED)
    sparse_arch = q.sparse
    assert [(type(g).__name__, g.bits, g.dim, g.positions, g.rows) for g in sparse_arch.qgroups] == [
        ("RowwiseGroup", 4, 4, [0, 2], [10, 30]), ("FloatGroup", 16, 4, [1, 3], [20, 40])]
    rowwise, half = sparse_arch.qgroups
    assert rowwise.codes.shape == (40, 2) and rowwise.scale.shape == rowwise.bias.shape == (40,)
    assert half.weight.shape == (60, 4) and half.weight.dtype == torch.float16
    # each buffer once in the state dict; `tables` holds views of the groups' rows, not copies nor modules
    assert list(sparse_arch.state_dict()) == ["qgroups.0.codes", "qgroups.0.scale", "qgroups.0.bias",
                                              "qgroups.1.weight"]
    assert list(sparse_arch.tables) == NAMES and [t.bits for t in sparse_arch.tables.values()] == [4, 16, 4, 16]
    c3, c4 = sparse_arch.tables["C3"], sparse_arch.tables["C4"]
    assert c3.rows == 30 and c3.dim == 4 and not hasattr(c3, "weight")
    assert c3.codes.shape == (30, 2) and c3.codes.data_ptr() == rowwise.codes[10].data_ptr()
    assert c3.scale.data_ptr() == rowwise.scale[10].data_ptr() and c3.bias.data_ptr() == rowwise.bias[10].data_ptr()
    assert c4.weight.shape == (40, 4) and c4.weight.data_ptr() == half.weight[20].data_ptr()
    for name in NAMES:  # the tables quantized one by one, then stored side by side
        expected, got = quantize_rows(model.sparse.tables[name].weight, FUSED[name]), sparse_arch.table(name)
        assert all(torch.equal(a, b) for a, b in zip((got.codes, got.scale, got.bias),
                                                     (expected.codes, expected.scale, expected.bias)))
    # set_table writes its table's rows of the group, and refuses a table of another shape
    table = quantize_rows(torch.randn(30, 4), 4)
    sparse_arch.set_table("C3", table)
    assert torch.equal(rowwise.codes[10:], table.codes) and torch.equal(rowwise.scale[10:], table.scale)
    with pytest.raises(ValueError, match="C1"):
        sparse_arch.set_table("C1", table)
    # what reads the tables of any model still does: the cost in values, the tables of record
    assert measure(q).table_params == measure(model).table_params == sum(SIZES) * 4
    assert len(sparse_arch.groups) == 0 and q.holds_tables and q.table_keys() == []
    # one gather of the id block, then one per group's buffer (codes, scale, bias; weight), not one per table
    dense, sparse = random_inputs(model.structure, batch_size=8, seed=0)
    assert _index_selects(sparse_arch, sparse) == 1 + 3 + 1
    assert _index_selects(quantize_tables(model, 4).sparse, sparse) == 1 + 3


def old_layout(q: nn.Module) -> dict[str, torch.Tensor]:
    """`q`'s state dict as the per-table layout wrote it (one module a table, before the tables were grouped):
    `sparse.tables.<name>.codes / .scale / .bias` at 8 and 4 bits, `sparse.tables.<name>.weight` at 16 and 32, in
    feature order, then the projections and the rest."""
    state = q.state_dict()
    tables = {}
    for name in q.sparse.feature_names:
        table = q.sparse.table(name)
        if table.bits < 16:
            tables |= {f"sparse.tables.{name}.codes": table.codes.clone(),
                       f"sparse.tables.{name}.scale": table.scale.clone(),
                       f"sparse.tables.{name}.bias": table.bias.clone()}
        else:
            tables[f"sparse.tables.{name}.weight"] = table.codes.clone()
    return tables | {k: v for k, v in state.items() if not k.startswith("sparse.qgroups.")}


@pytest.mark.parametrize("kind,bits", [("projected", "mixed"), ("dot", "fused"), ("deepfm", "fused")])
def test_per_table_state_dict_of_older_files_loads(kind, bits, tmp_path):
    model = model_of(kind)
    bits = MIXED if bits == "mixed" else FUSED
    q = quantize_tables(model, bits)
    old = old_layout(q)
    assert not any(k.startswith("sparse.qgroups.") for k in old)
    dense, sparse = random_inputs(model.structure, batch_size=16, seed=2)
    with torch.no_grad():
        expected = q(dense, sparse)

    arch = QuantizedSparseArch.empty(model.structure, bits)  # the arch alone: keys without the `sparse.` prefix
    arch.load_state_dict({k[len("sparse."):]: v for k, v in old.items() if k.startswith("sparse.")}, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(arch.state_dict().values(), q.sparse.state_dict().values()))

    rebuilt = family_of_model(model).build(model.structure).eval()  # the whole model, as fold_batch_norm loads it
    rebuilt.sparse = QuantizedSparseArch.empty(model.structure, bits)
    rebuilt.load_state_dict(old, strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(dense, sparse), expected)

    path = save_compressed(tmp_path / "compressed.pt", q, Kept.everything(model))  # a compressed file of then
    payload = torch.load(path, weights_only=True)
    assert [k for k in payload["state_dict"] if k.startswith("sparse.") and "projections" not in k] == \
        [k for k in q.state_dict() if k.startswith("sparse.qgroups.")]
    payload["state_dict"] = old
    torch.save(payload, tmp_path / "old.pt")
    for hold_tables in (True, False):
        loaded = read_compressed(tmp_path / "old.pt", hold_tables=hold_tables).model.eval()
        assert loaded.sparse.bits == q.sparse.bits
        with torch.no_grad():
            assert torch.equal(loaded(dense, sparse), expected)

    incomplete = dict(old)  # a group whose tables' keys are not all there is not fused: its keys are missing
    incomplete.pop("sparse.tables.C3.bias" if bits is FUSED else "sparse.tables.C2.bias")
    with pytest.raises(RuntimeError, match="qgroups"):
        rebuilt.load_state_dict(incomplete, strict=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", ["mixed", "fused"])
def test_torchscript_equals_eager(kind, bits, tmp_path):
    q = quantize_tables(model_of(kind), {"mixed": MIXED if kind != "dcnv2" else 4, "fused": FUSED}[bits])
    dense, sparse = random_inputs(q.structure, batch_size=16, seed=3)
    scripted = torch.jit.script(q)
    with torch.no_grad():
        assert torch.equal(scripted(dense, sparse), q(dense, sparse))
    path = export_torchscript(q, tmp_path / "model.pt", (dense, sparse))  # checks the reloaded file too
    with torch.no_grad():
        assert torch.equal(torch.jit.load(str(path))(dense, sparse), q(dense, sparse))


def _onnx_runs(path, dense, sparse) -> dict[str, torch.Tensor]:
    """The exported file's output under onnxruntime (where installed) and onnx's reference evaluator."""
    feeds = {"dense": dense.numpy(), "sparse": sparse.numpy()}
    out = {}
    try:
        import onnxruntime
    except ImportError:
        pass
    else:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out["onnxruntime"] = torch.from_numpy(session.run(None, feeds)[0])
    from onnx.reference import ReferenceEvaluator

    out["reference"] = torch.from_numpy(ReferenceEvaluator(str(path)).run(None, feeds)[0])
    return out


def test_onnx_within_1e5_at_8_and_4_bits(tmp_path):
    """One export holds tables at 8 bits, 4 bits (odd width 5: the pad nibble), 16 and 32, and a projection."""
    pytest.importorskip("onnx")
    q = quantize_tables(model_of("projected"), MIXED)
    dense, sparse = random_inputs(q.structure, batch_size=16, seed=4)
    path = export_onnx(q, tmp_path / "model.onnx", (dense, sparse))
    import onnx

    graph = onnx.load(str(path)).graph
    stored = {i.name: i.data_type for i in graph.initializer}
    assert stored["sparse.qgroups.1.codes"] == onnx.TensorProto.UINT8  # C2's: the file holds the codes, not floats
    assert stored["sparse.qgroups.0.scale"] == onnx.TensorProto.FLOAT16  # C1's
    assert "Mod" in {n.op_type for n in graph.node}  # int4 unpacked in the graph
    dense, sparse = random_inputs(q.structure, batch_size=5, seed=5)  # another batch size: the axis is dynamic
    with torch.no_grad():
        expected = q(dense, sparse)
    for runtime, got in _onnx_runs(path, dense, sparse).items():
        assert (got - expected).abs().max() <= 1e-5, runtime


def test_onnx_of_fused_groups_within_1e5(tmp_path):
    pytest.importorskip("onnx")
    q = quantize_tables(model_of("dot"), FUSED)
    dense, sparse = random_inputs(q.structure, batch_size=16, seed=4)
    path = export_onnx(q, tmp_path / "model.onnx", (dense, sparse))
    import onnx

    stored = {i.name: (i.data_type, list(i.dims)) for i in onnx.load(str(path)).graph.initializer}
    assert stored["sparse.qgroups.0.codes"] == (onnx.TensorProto.UINT8, [40, 2])  # C1 and C3's codes, one buffer
    assert stored["sparse.qgroups.1.weight"] == (onnx.TensorProto.FLOAT16, [60, 4])  # C2 and C4's
    dense, sparse = random_inputs(q.structure, batch_size=5, seed=5)
    with torch.no_grad():
        expected = q(dense, sparse)
    for runtime, got in _onnx_runs(path, dense, sparse).items():
        assert (got - expected).abs().max() <= 1e-5, runtime


def test_compression_ratio_of_1000_row_d16_tables():
    s = dense_structure(sparse_names=["A", "B", "C"], table_sizes=[1000] * 3, embedding_dim=16, bottom=[8, 16],
                        top=[8, 1], num_dense=2)
    model = DLRM(s, seed=0)
    fp32 = model_bytes(model)
    assert fp32["tables"] == measure(model).table_bytes == 3 * 1000 * 16 * 4
    assert fp32["dense"] == (measure(model).params - measure(model).table_params) * 4
    ratios = {}
    for bits in (16, 8, 4):
        q = quantize_tables(model, bits)
        counted = model_bytes(q)
        assert counted["tables"] == q.sparse.storage_bytes() == 3 * storage_bytes(1000, 16, bits)
        assert counted["dense"] == fp32["dense"] and counted["total"] == counted["tables"] + counted["dense"]
        ratios[bits] = fp32["tables"] / counted["tables"]
    assert ratios[16] == 2
    assert ratios[8] == pytest.approx(16 * 4 / (16 + 4))  # 3.2
    assert ratios[4] == pytest.approx(64 / (8 + 4))  # 5.33


def test_model_bytes_counts_norm_statistics_and_projections():
    model = model_of("dcnv2")  # a BatchNorm1d on the dense block
    counted = model_bytes(model)
    params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("sparse.groups")) * 4
    stats = 2 * 3 * 4  # running mean and var of 3 dense inputs, fp32; num_batches_tracked not counted
    assert counted["dense"] == params + stats
    q = quantize_tables(model_of("projected"), 8)
    projection = 4 * sum(p.numel() for p in q.sparse.projections.parameters())
    tables = sum(storage_bytes(n, d, 8) for n, d in zip(SIZES, [3, 5, 2, 2]))
    assert q.sparse.storage_bytes() == tables + projection
    assert model_bytes(q)["tables"] == tables


def test_dense_to_half():
    model = quantize_tables(model_of("dot"), 8)
    half = dense_to_half(model, torch.float16)
    assert all(type(m) is nn.Linear for m in model.over.layers)  # the original untouched
    assert all(isinstance(m, HalfStoredLinear) and m.weight.dtype == torch.float16 for m in half.over.layers)
    assert torch.equal(half.sparse.tables["C1"].codes, model.sparse.tables["C1"].codes)
    linear = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("sparse."))
    assert model_bytes(model)["dense"] - model_bytes(half)["dense"] == linear * 2  # 4 -> 2 bytes each
    dense, sparse = random_inputs(model.structure, batch_size=16, seed=6)
    with torch.no_grad():
        out = half(dense, sparse)
        assert out.dtype == torch.float32
        assert (out - model(dense, sparse)).abs().max() < 1e-2
        assert torch.equal(torch.jit.script(half)(dense, sparse), out)
    bf16 = dense_to_half(model, torch.bfloat16)
    assert bf16.over.layers[0].weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 or bf16"):
        dense_to_half(model, torch.float64)
