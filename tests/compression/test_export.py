import pytest
import torch

from umec_lightning.compressed import FORMAT, load_compressed, read_compressed, save_compressed
from umec_lightning.compression.export import export_onnx, export_torchscript, random_inputs
from umec_lightning.compression.extract import extract
from umec_lightning.compression.kept import Kept

from .test_extract import kept_for, make_model


def compressed_model(interaction="dot"):
    model = make_model(interaction)
    kept = kept_for(model, "all")
    return extract(model, kept), kept


def predictions(model, batch_size=32, seed=3):
    dense, sparse = random_inputs(model.structure, batch_size=batch_size, seed=seed)
    with torch.no_grad():
        return model(dense, sparse)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_save_load_round_trip(tmp_path, interaction):
    small, kept = compressed_model(interaction)
    path = save_compressed(tmp_path / "compressed.pt", small, kept, {"auc": 0.8, "names": ["C2", "C4"]})
    assert [p.name for p in tmp_path.iterdir()] == ["compressed.pt"]  # no temporary file left
    assert torch.load(path, weights_only=True)["format"] == FORMAT

    loaded = load_compressed(path)
    assert loaded.structure == small.structure
    assert torch.equal(predictions(loaded), predictions(small))
    assert all(t.sparse for t in loaded.sparse.tables.values())

    stored = read_compressed(path)
    assert stored.kept == kept
    assert stored.extra == {"auc": 0.8, "names": ["C2", "C4"]}


def test_save_refuses_unplain_extra(tmp_path):
    small, kept = compressed_model()
    with pytest.raises(TypeError, match="extra"):
        save_compressed(tmp_path / "c.pt", small, kept, {"path": tmp_path})
    assert list(tmp_path.iterdir()) == []


def test_gated_model_round_trip(tmp_path):
    model = make_model("dot")
    model.enable_dim_gate()
    path = save_compressed(tmp_path / "c.pt", model, Kept.everything(model))
    assert torch.equal(predictions(load_compressed(path)), predictions(model))


def test_bad_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_compressed(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*not a compressed model"):
        load_compressed(foreign)
    small, kept = compressed_model()
    path = save_compressed(tmp_path / "truncated.pt", small, kept)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_compressed(path)
    damaged = tmp_path / "damaged.pt"
    payload = torch.load(save_compressed(damaged, small, kept), weights_only=True)
    payload["state_dict"].pop("over.layers.0.bias")
    torch.save(payload, damaged)
    with pytest.raises(ValueError, match="damaged.pt"):
        load_compressed(damaged)
    with pytest.raises(FileNotFoundError):
        load_compressed(tmp_path / "missing.pt")


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_torchscript_export(tmp_path, interaction):
    small, _ = compressed_model(interaction)
    path = export_torchscript(small, tmp_path / "model.ts")
    scripted = torch.jit.load(str(path))
    for batch_size in (1, 17):  # any batch size, not only the verification batch's
        dense, sparse = random_inputs(small.structure, batch_size=batch_size, seed=5)
        with torch.no_grad():
            assert torch.equal(scripted(dense, sparse), small(dense, sparse))
    assert [p.name for p in tmp_path.iterdir()] == ["model.ts"]
    import zipfile

    records = zipfile.ZipFile(path).infolist()  # the code and the tensors, not the code's source ranges
    names = [r.filename for r in records]
    assert any("/code/" in r for r in names) and not any(r.endswith(".debug_pkl") for r in names)
    assert all(r.filename.startswith("archive/") for r in records)  # compacted (`archive.compact_archive`)
    assert all(r.compress_type == zipfile.ZIP_DEFLATED for r in records if r.filename.endswith((".py", ".pkl")))


def test_onnx_export(tmp_path):
    import onnx
    from onnx.reference import ReferenceEvaluator

    small, _ = compressed_model("dot")
    path = export_onnx(small, tmp_path / "model.onnx", random_inputs(small.structure, batch_size=4))
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["dense", "sparse"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert "Loop" not in {n.op_type for n in graph.node}  # lookups are plain gathers
    assert not graph.value_info  # intermediate shapes: optional, inferred again by every runtime
    assert not graph.metadata_props and not any(n.name for n in graph.node)  # torch.export's notes; node names
    inner = {v for n in graph.node for v in n.output} - {o.name for o in graph.output}
    assert inner and all(len(v) <= 3 for v in inner)  # intermediate values named by short numbers
    onnx.checker.check_model(str(path), full_check=True)
    dense, sparse = random_inputs(small.structure, batch_size=9, seed=7)
    got = ReferenceEvaluator(str(path)).run(None, {"dense": dense.numpy(), "sparse": sparse.numpy()})[0]
    with torch.no_grad():
        assert (torch.from_numpy(got) - small(dense, sparse)).abs().max().item() <= 1e-5


def projected_compressed(interaction):
    """A compressed model with projections: factorised under `dot`; built with one under `cat` (there
    extraction folds its own factorisations away)."""
    from .test_extract import projected_model

    model = make_model(interaction) if interaction == "dot" else projected_model("cat")
    kept = kept_for(model, "all" if interaction == "dot" else "neurons")  # cat "all" narrows them away
    if interaction == "dot":
        kept.ranks = {"C2": 1, "C4": 2}
    small = extract(model, kept)
    assert len(small.sparse.projections) > 0
    return small, kept


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_projected_model_round_trip(tmp_path, interaction):
    small, kept = projected_compressed(interaction)
    path = save_compressed(tmp_path / "compressed.pt", small, kept)
    stored = read_compressed(path)
    assert stored.model.structure == small.structure and stored.kept == kept
    assert sorted(stored.model.sparse.projections) == sorted(small.sparse.projections)
    assert torch.equal(predictions(stored.model), predictions(small))


def test_files_from_before_projections_load(tmp_path):
    small, kept = compressed_model("cat")
    path = save_compressed(tmp_path / "old.pt", small, kept)
    payload = torch.load(path, weights_only=True)
    payload["structure"].pop("table_ranks")  # keys an older writer did not know
    payload["kept"].pop("ranks")
    torch.save(payload, path)
    stored = read_compressed(path)
    assert stored.model.structure == small.structure and stored.kept == kept
    assert torch.equal(predictions(stored.model), predictions(small))


def assert_exports_match(small, tmp_path):
    """TorchScript (scripted, not only traced) and ONNX exports of `small` answer like it, batch 1 and 17."""
    from onnx.reference import ReferenceEvaluator

    torch.jit.script(small)  # scriptable as it is, not only traceable
    scripted = torch.jit.load(str(export_torchscript(small, tmp_path / "model.ts")))
    path = export_onnx(small, tmp_path / "model.onnx", random_inputs(small.structure, batch_size=4))
    for batch_size in (1, 17):
        dense, sparse = random_inputs(small.structure, batch_size=batch_size, seed=5)
        with torch.no_grad():
            expected = small(dense, sparse)
        assert torch.equal(scripted(dense, sparse), expected)
        got = ReferenceEvaluator(str(path)).run(None, {"dense": dense.numpy(), "sparse": sparse.numpy()})[0]
        assert (torch.from_numpy(got) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_projected_model_exports(tmp_path, interaction):
    small, _ = projected_compressed(interaction)
    assert_exports_match(small, tmp_path)


def factored_compressed(interaction, activation=False):
    """A compressed model with factored Linear layers (pruned, then factorised; `dot`: also a table with a
    centred basis, so its projection has a bias)."""
    from umec_lightning.compression.extract import Basis

    model = make_model(interaction)
    kept = kept_for(model, "all")
    kept.ranks = {"dense.layers.0": 2, "over.layers.0": 2, "C2" if interaction == "dot" else "C4": 2}
    bases = {}
    if interaction == "dot":
        q, _ = torch.linalg.qr(torch.randn(3, 2, generator=torch.Generator().manual_seed(0)))
        bases["C2"] = Basis(q, torch.randn(3, generator=torch.Generator().manual_seed(1)))
    small = extract(model, kept, bases, factor_activation=activation)
    assert set(small.factored_layers()) == {"dense.layers.0", "over.layers.0"}
    assert small.structure.projection_bias == (interaction == "dot")
    return small, kept


@pytest.mark.parametrize("interaction", ["dot", "cat"])
@pytest.mark.parametrize("activation", [False, True])
def test_factored_model_round_trip(tmp_path, interaction, activation):
    small, kept = factored_compressed(interaction, activation)
    path = save_compressed(tmp_path / "compressed.pt", small, kept)
    stored = read_compressed(path)
    assert stored.model.structure == small.structure and stored.kept == kept
    assert stored.model.structure.factor_activation == activation
    assert torch.equal(predictions(stored.model), predictions(small))


def test_files_from_before_factored_layers_load(tmp_path):
    small, kept = compressed_model("dot")
    path = save_compressed(tmp_path / "old.pt", small, kept)
    payload = torch.load(path, weights_only=True)
    for key in ("projection_bias", "layer_ranks", "factor_activation"):
        payload["structure"].pop(key)  # keys an older writer did not know
    torch.save(payload, path)
    stored = read_compressed(path)
    assert stored.model.structure == small.structure
    assert torch.equal(predictions(stored.model), predictions(small))


@pytest.mark.parametrize("interaction, activation", [("dot", False), ("cat", True)])
def test_factored_model_exports(tmp_path, interaction, activation):
    from umec_lightning.latency import latency_ms

    small, _ = factored_compressed(interaction, activation)
    assert_exports_match(small, tmp_path)
    assert set(latency_ms(small, batches=(1, 4), repeats=2)) == {"batch_1", "batch_4"}


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_model_without_dense_features_exports(tmp_path, interaction):
    """Categorical-only data (Avazu, Frappe): no bottom MLP, the dense input is (B, 0)."""
    from umec_lightning.models import DLRM
    from umec_lightning.models.structure import dense_structure

    s = dense_structure(sparse_names=["a", "b", "c"], table_sizes=[10, 20, 30], embedding_dim=4, bottom=[8, 4],
                        top=[8, 1], num_dense=0, interaction=interaction)
    assert not s.use_dense and s.bottom == []
    model = DLRM(s, seed=0).eval()
    assert_exports_match(model, tmp_path)
