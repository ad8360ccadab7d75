"""Deployable exports of a (compressed) DLRM: TorchScript and ONNX, each verified before it is written.

Every writer goes through a temporary file next to the target and `os.replace`, so a reader never sees a
half-written file and a failed export leaves the previous file in place. Each export is checked against
the eager model on a batch (the one given, or a random one drawn from the structure) before it replaces
the target. What is written is the model as served (`models.serve.fold_batch_norm`): batch norm folded into
the Linear before it, no dropout; it is checked against the eager model as given, in eval mode.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ..archive import compact_archive
from ..models.dlrm import DLRM
from ..models.serve import fold_batch_norm
from ..models.structure import DLRMStructure

__all__ = ["atomic_target", "example_inputs", "export_torchrec", "export_onnx", "export_torchscript", "random_inputs"]


@contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success fsync it and move it onto `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def random_inputs(structure: DLRMStructure, batch_size: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A valid random (dense (B, N), sparse (B, S)) pair: ids below each kept table's size, 0 elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch_size, structure.num_dense, generator=gen)
    sparse = torch.zeros(batch_size, len(structure.sparse_names), dtype=torch.long)
    for fid, rows in zip(structure.feature_ids, structure.table_sizes):
        sparse[:, fid] = torch.randint(0, rows, (batch_size,), generator=gen)
    return dense, sparse


def example_inputs(model: DLRM, example=None) -> tuple[Tensor, Tensor]:
    """(dense, sparse) on the model's device from a `Batch`, a (dense, sparse) pair, or None (random)."""
    if example is None:
        dense, sparse = random_inputs(model.structure)
    elif hasattr(example, "dense") and hasattr(example, "sparse"):
        dense, sparse = example.dense, example.sparse
    else:
        dense, sparse = example[0], example[1]
    device = next(model.parameters()).device
    return dense.to(device), sparse.to(device)


def _eval_output(model: DLRM, dense: Tensor, sparse: Tensor) -> Tensor:
    """The eager model's output in eval mode (batch norm on its running statistics, no dropout), its mode kept."""
    was_training = model.training
    model.eval()
    try:
        return model(dense, sparse)
    finally:
        model.train(was_training)


def _check_close(what: str, got: Tensor, expected: Tensor, atol: float) -> None:
    got, expected = got.detach().cpu().float(), expected.detach().cpu().float()
    if got.shape != expected.shape:
        raise RuntimeError(f"{what}: output shape {tuple(got.shape)} != eager {tuple(expected.shape)}")
    diff = (got - expected).abs().max().item() if got.numel() else 0.0
    if not diff <= atol:
        raise RuntimeError(f"{what}: output differs from the eager model by {diff:.3g} (> {atol:g})")


def _compact(file: Path, drop: tuple[str, ...] = ()) -> None:
    """Rewrite the torch archive `file` in place as `archive.compact_archive` does (pickles and code deflated, one
    short folder name, the records named by `drop` left out): a served file holding only what its loader reads."""
    compacted = file.with_name(file.name + ".compact")
    try:
        with open(file, "rb") as src, open(compacted, "wb") as dst:
            compact_archive(src, dst, drop)
        os.replace(compacted, file)
    finally:
        compacted.unlink(missing_ok=True)


# TorchScript's source ranges of the scripted code: only error messages read them (`torch.jit.load` runs the same
# without them), and they were about half a small model's non-tensor bytes (31 of 60 kB, a 26-table factored DLRM).
DEBUG_RECORDS = (".debug_pkl",)


@torch.no_grad()
def export_torchscript(model: DLRM, path: str | os.PathLike, example=None, *, atol: float = 1e-6) -> Path:
    """Write `model` as served (batch norm folded, no dropout) as TorchScript (scripted; traced on the example
    if scripting fails), compacted without its debug records (`_compact`, `DEBUG_RECORDS`), reloaded from the written
    file and checked against the eager model in eval mode before it replaces `path`."""
    dense, sparse = example_inputs(model, example)
    expected = _eval_output(model, dense, sparse)
    model = fold_batch_norm(model)
    try:
        scripted = torch.jit.script(model)
    except Exception:  # noqa: BLE001 - any scripting failure: tracing is exact for a fixed structure
        scripted = torch.jit.trace(model, (dense, sparse), check_trace=False)
    path = Path(path)
    with atomic_target(path) as tmp:
        torch.jit.save(scripted, str(tmp))
        _compact(tmp, DEBUG_RECORDS)
        loaded = torch.jit.load(str(tmp), map_location=dense.device)
        _check_close(f"TorchScript export to {path}", loaded(dense, sparse), expected, atol)
    return path


@torch.no_grad()
def export_torchrec(model: DLRM, path: str | os.PathLike, example=None, *, atol: float = 0.0) -> Path:
    """Write `model` as served with its tables in torchrec's quantized EmbeddingBagCollection
    (`quant.fbgemm.serve_with_fbgemm`: fbgemm's int-N TBE inside, our codes, scales and biases in its rows; float
    tables go in as fp32 tables), `torch.save`d whole and compacted (`_compact`; read back with
    `torch.load(path, weights_only=False)` where umec_lightning, torchrec and fbgemm_gpu are installed), reloaded
    from the written file and checked against the eager model (equal: `atol` 0) before it replaces `path`. CPU
    only, as fbgemm's CPU kernels: rows at fbgemm's CPU row alignment (`quant.fbgemm.CPU_ROW_ALIGNMENT`), not
    torchrec's GPU-minded 16."""
    from ..quant.apply import quantize_tables
    from ..quant.fbgemm import CPU_ROW_ALIGNMENT, serve_with_fbgemm
    from ..quant.sparse import QuantizedSparseArch

    dense, sparse = example_inputs(model, example)
    expected = _eval_output(model, dense, sparse)
    served = fold_batch_norm(model).eval()
    if not isinstance(served.sparse, QuantizedSparseArch):
        served = quantize_tables(served, 32)  # fp32 tables: the same values, in fbgemm's layout
    served = serve_with_fbgemm(served, row_alignment=CPU_ROW_ALIGNMENT)
    path = Path(path)
    with atomic_target(path) as tmp:
        torch.save(served, str(tmp))
        _compact(tmp)
        loaded = torch.load(str(tmp), weights_only=False)
        _check_close(f"torchrec export to {path}", loaded(dense, sparse), expected, atol)
    return path


def _run_onnx(path: Path, dense: Tensor, sparse: Tensor) -> Tensor:
    """Run the exported file: onnxruntime when installed, else onnx's reference evaluator (pure NumPy)."""
    feeds = {"dense": dense.cpu().numpy(), "sparse": sparse.cpu().numpy()}
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, feeds)[0])
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        return torch.from_numpy(ReferenceEvaluator(str(path)).run(None, feeds)[0])


@torch.no_grad()
def export_onnx(
    model: DLRM,
    path: str | os.PathLike,
    example_batch=None,
    *,
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-5,
) -> Path:
    """Write `model` as ONNX with a dynamic batch axis: inputs `dense` (B, N) float and `sparse` (B, S)
    int64, output `logits` (B,). Checked with onnx.checker and, if `verify`, run on the example batch and
    compared with the eager model. Weights go to an external `<name>.data` file only past ONNX's 2 GB limit.
    """
    import onnx

    path = Path(path)
    dense, sparse = example_inputs(model, example_batch)
    if dense.shape[0] < 2:  # torch.export specialises a batch of 1 to a constant
        dense, sparse = dense.repeat(2, 1), sparse.repeat(2, 1)
    expected = _eval_output(model, dense, sparse)
    model = fold_batch_norm(model)
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        # Exporter-internal noise that says nothing about this model.
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")
        program = _export(model, dense, sparse, batch, opset)
    # The exporter annotates every node with its Python stack and module path: about 1 KB a node, a quarter of
    # a small quantized model's file, and nothing a server reads.
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()

    def check(file: Path) -> None:
        onnx.checker.check_model(str(file), full_check=True)
        if verify:
            _check_close(f"ONNX export to {path}", _run_onnx(file, dense, sparse), expected, atol)

    def write(file: Path) -> None:
        program.save(str(file), external_data=None)
        _compact_graph(file)

    _write_dir_atomically(path, write, check)
    return path


def _compact_graph(file: Path) -> None:
    """Rewrite the ONNX file `file` (weights inline; one past ONNX's 2 GB limit is left as written) without what no
    runtime reads: the graph's `value_info` (intermediate types and shapes, optional in ONNX and inferred again by
    every runtime and by onnx.checker: about 70 bytes a value), its `metadata_props` (torch.export's graph signature
    as text: 6 kB for a 26-table factored DLRM) and the nodes' names (optional), and with the intermediate values
    named by short numbers (the exporter's `_to_copy_12`, `getitem_33`: names no caller sees; the inputs, outputs and
    initializers keep theirs). 39 of that DLRM's 72 kB of graph."""
    import onnx

    proto = onnx.load(str(file), load_external_data=False)
    graph = proto.graph
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        return
    del graph.value_info[:]
    del graph.metadata_props[:]
    nested = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node
                 for a in n.attribute)  # a subgraph may read outer values by name: keep every name then
    named = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    short: dict[str, str] = {}

    def rename(value: str) -> str:
        if nested or not value or value in named:
            return value
        return short.setdefault(value, format(len(short), "x"))

    for node in graph.node:
        node.name = ""
        node.input[:] = [rename(v) for v in node.input]
        node.output[:] = [rename(v) for v in node.output]
    onnx.save(proto, str(file))


# Constants of more elements than this are not folded when the ONNX graph is optimised: folding a weight's dtype cast
# (an fp16-stored Linear's `.to(float32)`) would store an fp32 copy in place of the fp16 weight (1.3 MB more in a
# DCNv2's 4.2 MB file); shape arithmetic and the like are still folded.
FOLD_LIMIT = 64


def _export(model: nn.Module, dense: Tensor, sparse: Tensor, batch, opset: int | None):
    import onnxscript.optimizer

    program = torch.onnx.export(
        model,
        (dense, sparse),
        input_names=["dense", "sparse"],
        output_names=["logits"],
        opset_version=opset,
        dynamic_shapes={"dense": {0: batch}, "sparse": {0: batch}},
        dynamo=True,
        verbose=False,
        optimize=False,
    )
    program.model = onnxscript.optimizer.optimize(program.model, input_size_limit=FOLD_LIMIT)
    return program


def _write_dir_atomically(path: Path, write: Callable[[Path], None], check: Callable[[Path], None]) -> None:
    """Write `path` (and any side files it names, e.g. external data) in a scratch folder next to it,
    check it there, then move the side files and finally the main file into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = scratch / path.name
        write(staged)
        check(staged)
        for file in scratch.iterdir():
            if file != staged:
                os.replace(file, path.parent / file.name)
        with open(staged, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(staged, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
