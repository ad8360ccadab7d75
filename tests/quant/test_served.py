"""The served files' bytes known before they are written (quant/served.py): for models of two families, float and
factored, at int8, int4 (odd widths: the pad nibble) and mixed widths, the estimate of each file a run writes
(compressed.pt, TorchScript, ONNX, torchrec's) from a two-row miniature is never below the file the run's writers
then write, nor more than twice its slack above it; the reserve measured on a spread layout covers a factored
model's own bytes; a bytes limit on the largest file is met by the completion."""

from __future__ import annotations

import dataclasses

import pytest

from umec_lightning.compressed import save_compressed
from umec_lightning.compression.kept import Kept
from umec_lightning.export_report import EXPORTS, file_bytes
from umec_lightning.models import dense_structure
from umec_lightning.models.deepfm import dense_deepfm_structure
from umec_lightning.models.family import family_of_structure
from umec_lightning.models.serve import fold_batch_norm
from umec_lightning.quant import served
from umec_lightning.quant.plan import BitsPlan, apply_plan, complete_to_budget, planned_bytes

from .test_plan import batches

NAMES = ["C1", "C2", "C3", "C4", "C5"]
SIZES = [50, 3000, 40, 700, 1200]

pytestmark = pytest.mark.usefixtures("one_thread")


def model_of(kind: str, ranks: list[int] | None = None, seed: int = 0):
    if kind.startswith("deepfm"):  # "deepfm_bn": batch norm after the deep layer
        s = dense_deepfm_structure(sparse_names=NAMES, table_sizes=SIZES, embedding_dim=8, num_dense=3, deep=[16],
                                   dense_names=["I1", "I2", "I3"], batch_norm=kind.endswith("_bn"))
    else:
        s = dense_structure(sparse_names=NAMES, table_sizes=SIZES, embedding_dim=8, bottom=[16, 8], top=[16, 1],
                            num_dense=3, dense_names=["I1", "I2", "I3"], interaction="dot")
    if ranks is not None:
        s = dataclasses.replace(s, table_ranks=ranks)
    return family_of_structure(s.to_dict()).build(s, seed=seed).eval()


def formats() -> list[str]:
    out = [served.MODEL, "torchscript"]
    for fmt, module in (("onnx", "onnxruntime"), ("torchrec", "torchrec")):
        try:
            __import__(module)
            out.append(fmt)
        except ImportError:
            pass
    return out


def write(model, fmt: str, folder) -> int:
    if fmt == served.MODEL:
        return file_bytes(save_compressed(folder / "compressed.pt", model, Kept.everything(model), {}))
    name, writer = EXPORTS[fmt]
    return file_bytes(writer(model, folder / name, atol=1e-4))


@pytest.mark.parametrize("kind, ranks, tables, dense", [
    pytest.param("dot", None, 8, 32, marks=pytest.mark.slow),  # make test's 10 minutes: two cases cover the rest
    ("dot", [3, 8, 1, 5, 2], 4, 16),  # factored tables, odd widths at int4
    pytest.param("deepfm", None, {"C1": 4, "C2": 8, "C3": 16, "C4": 32, "C5": 4}, 32,  # 9 wide: odd at int4
                 marks=pytest.mark.slow),
    ("deepfm_bn", None, 4, 16),  # batch norm folded before the fp16 Linears
])
def test_the_estimate_bounds_the_written_files(tmp_path, kind, ranks, tables, dense):
    model = fold_batch_norm(model_of(kind, ranks))  # as the quantize stage stores it
    plan = BitsPlan({n: tables if isinstance(tables, int) else tables[n] for n in NAMES}, dense)
    fmts = formats()
    estimate = served.served_bytes(model, plan, served.format_overheads(model, plan, fmts))
    stored = apply_plan(model, plan)
    for fmt in fmts:
        actual, slack = write(stored, fmt, tmp_path), served.slack_bytes(model, fmt)
        assert actual > planned_bytes(model, plan), fmt  # a file holds more than its tensors
        assert actual <= estimate[fmt] <= actual + 2 * slack, (fmt, actual, estimate[fmt], slack)


def test_the_reserve_on_a_spread_layout_covers_a_factored_model(tmp_path):
    """The compress stage holds back `reserve_bytes` of the unfactored model's widest layout (every table at rank 1)
    before it knows the ranks; a model factored at uneven ranks (more fused groups) then fits in it."""
    dense = model_of("dot")
    plan = BitsPlan({n: 4 for n in NAMES}, 16)
    widest = served.layout(dense, _rank_one(dense))
    reserve = served.reserve_bytes(widest, plan, formats())
    factored = apply_plan(model_of("dot", [3, 8, 1, 5, 2]), plan)
    for fmt in formats():
        assert write(factored, fmt, tmp_path) - planned_bytes(model_of("dot", [3, 8, 1, 5, 2]), plan) <= reserve, fmt


def test_a_pruning_layout_is_spread_over_widths_only_where_tables_may_differ(tmp_path):
    """A pruning makes no projections: its reserve is measured on the model's own layout, tables spread over widths
    only where the structure lets them differ (`cat`, not `dot` or DeepFM's one width); a `cat` model pruned to
    uneven widths (more fused groups) then fits in it, and the `dot` reserve is below the factored layout's."""
    for kind in ("dot", "deepfm"):
        model = model_of(kind)
        assert served.spread_widths(model, Kept.everything(model)) == Kept.everything(model), kind
    factored = model_of("dot")
    assert served.spread_widths(factored, _rank_one(factored)) == _rank_one(factored)  # ranks spread in `miniature`

    s = dense_structure(sparse_names=NAMES, table_sizes=SIZES, embedding_dim=8, bottom=[16, 8], top=[16, 1],
                        num_dense=3, dense_names=["I1", "I2", "I3"], interaction="cat")
    cat = family_of_structure(s.to_dict()).build(s, seed=0).eval()
    spread = served.spread_widths(cat, Kept.everything(cat))
    assert len({len(cols) for cols in spread.dims.values()}) == len(NAMES)
    plan = BitsPlan({n: 4 for n in NAMES}, 16)
    reserve = served.reserve_bytes(served.layout(cat, spread), plan, formats())
    pruned = Kept.everything(cat)
    pruned.dims = {name: cols[:w] for (name, cols), w in zip(pruned.dims.items(), [3, 8, 1, 5, 2])}
    small = family_of_structure(s.to_dict()).build(served.layout(cat, pruned).structure).eval()
    for fmt in formats():
        assert write(apply_plan(small, plan), fmt, tmp_path) - planned_bytes(small, plan) <= reserve, fmt

    dot, fmts = model_of("dot"), [served.MODEL, "torchscript"]
    assert served.reserve_bytes(dot, plan, fmts) < served.reserve_bytes(served.layout(dot, _rank_one(dot)), plan, fmts)


def _rank_one(model) -> Kept:
    kept = Kept.everything(model)
    kept.ranks = {name: 1 for name in model.structure.feature_names}
    return kept


def test_the_completion_meets_a_limit_on_the_largest_file():
    model = model_of("dot")
    plan = BitsPlan({n: 32 for n in NAMES}, 32)
    overheads = served.format_overheads(model, plan, [served.MODEL, "torchscript"])
    limit = planned_bytes(model, BitsPlan({n: 8 for n in NAMES}, 32)) + 2 * max(overheads.values())

    def largest(m, p):
        return served.largest_served(m, p, served.format_overheads(m, p, [served.MODEL, "torchscript"]))

    done, steps = complete_to_budget(model, plan, limit, batches(model), largest)
    assert steps and largest(model, done) <= limit
    assert planned_bytes(model, done) < limit - max(overheads.values())  # room left for the files' own bytes


def test_onnx_stores_the_weights_at_their_stored_widths(tmp_path):
    """The ONNX file's initializers hold the stored model's bytes (codes, fp16 scales and biases, fp16 Linears), not
    fp32 copies of the fp16 weights that folding their casts would make."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    model = model_of("deepfm")
    plan = BitsPlan({n: 8 for n in NAMES}, 16)
    stored = apply_plan(model, plan)
    path = EXPORTS["onnx"][1](stored, tmp_path / "m.onnx", atol=1e-4)
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    assert sum(w.nbytes for w in weights) <= planned_bytes(model, plan) + 1024  # + the offsets, shape constants
    assert any(w.dtype.name == "float16" and w.ndim == 2 for w in weights)  # the Linears' weights, as stored


def test_a_batch_norm_model_is_measured_as_it_is_stored():
    """The compress stage measures the files' own bytes on its input model, batch norm and all; the miniature folds
    it first, as the quantize stage does before the fp16 Linears (an export folds it after, into fp32 weights)."""
    model = model_of("deepfm_bn")
    plan = BitsPlan({n: 4 for n in NAMES}, 16)
    fmts = [served.MODEL, "torchscript"]
    unfolded = served.format_overheads(model, plan, fmts)
    folded = served.format_overheads(fold_batch_norm(model), plan, fmts)
    for fmt in fmts:
        assert abs(unfolded[fmt] - folded[fmt]) <= 256, (fmt, unfolded[fmt], folded[fmt])
