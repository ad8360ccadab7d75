"""The seam: a method is a class plus a config; the stages of a run are data. Plus the run-level fixes
(0-epoch compress stages, resume at every boundary, refused resumes, failure status of the loggers)."""

import json
import shutil

import pytest
import torch
from pytorch_lightning.loggers import Logger

from umec_lightning import load_compressed
from umec_lightning.compression.kept import Kept
from umec_lightning.compression.method import CompressionMethod, Outcome
from umec_lightning.config import ConfigError
from umec_lightning.models import measure
from umec_lightning.run import close_loggers, run

from .conftest import compose_cfg

TINY_ROWS = "loader.limit_rows={train:3000,val:1000,test:1000}"


class HalveTopLayer(CompressionMethod):
    """A method written by a user, known to the pipeline only through its config: it counts its steps
    and, at the end, keeps the first half of the first top-MLP layer's neurons."""

    name = "halve_top"
    targets_budget = False

    def __init__(self, layer: str = "over.layers.0"):
        self.layer = layer
        self.steps = 0

    def after_step(self, model, lr):
        self.steps += 1

    def log_values(self):
        return {"steps": float(self.steps)}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]

    def finish(self, model):
        kept = Kept.everything(model)
        kept.neurons[self.layer] = kept.neurons[self.layer][: len(kept.neurons[self.layer]) // 2]
        return Outcome(kept=kept, info={"steps_seen": self.steps})


def test_a_method_defined_in_a_test_runs_through_the_real_pipeline_from_config(tmp_path, cache_dir):
    cfg = compose_cfg(["mode=dense", "mode.name=halve", f"+mode.method={{_target_:{__name__}.HalveTopLayer}}",
                       "mode.stages=[pretrain,compress,finetune]", "phases.finetune_epochs=1", TINY_ROWS],
                      cache_dir)
    summary = run(cfg, tmp_path)
    model = load_compressed(tmp_path / "compressed.pt")
    assert model.structure.top[0] == 8  # dlrm_small's 16, halved
    assert summary["kept"]["neurons"]["over.layers.0"] == 8
    assert summary["stages"]["compress"]["steps_seen"] == summary["stages"]["compress"]["steps"] > 0
    assert summary["budget_met"] is None and summary["method"] == "HalveTopLayer"
    assert (summary["flops"], summary["params"]) == (measure(model).flops, measure(model).params)


def test_zero_compress_epochs_still_extracts_and_meets_the_budget(tmp_path, cache_dir):
    cfg = compose_cfg(["mode=prediction", "budget.flops=0.6", "phases.compress_epochs=0",
                       "phases.finetune_epochs=0", TINY_ROWS], cache_dir)
    summary = run(cfg, tmp_path)
    assert summary["budget_met"] is True and summary["flops_ratio"] <= 0.6
    assert summary["stages"]["compress"]["admm_steps"] == 0
    assert summary["stages"]["compress"]["extra_groups_pruned_at_extraction"] > 0


def test_resume_after_the_compress_fit_but_before_its_marker(tmp_path, cache_dir):
    """A run killed after the ADMM fit ended but before it recorded the stage: the resumed fit starts
    finished, and extraction still runs (and decides the same structure)."""
    overrides = ["mode=joint", "budget.flops=0.5", "phases.finetune_epochs=1", TINY_ROWS]
    whole = run(compose_cfg(overrides, cache_dir), tmp_path)
    for path in ("phases/compress.json", "phases/finetune.json", "summary.json", "compressed.pt",
                 "checkpoints/compress/extracted.pt"):
        (tmp_path / path).unlink()
    shutil.rmtree(tmp_path / "checkpoints" / "finetune")
    resumed = run(compose_cfg([*overrides, "resume=true"], cache_dir), tmp_path)
    assert resumed["kept"] == whole["kept"]
    assert resumed["test_auc"] == pytest.approx(whole["test_auc"], abs=1e-6)


def test_resume_with_other_overrides_is_refused_naming_the_keys(tmp_path, cache_dir):
    overrides = ["mode=prediction", "budget.flops=0.7", "phases.finetune_epochs=0", TINY_ROWS]
    run(compose_cfg(overrides, cache_dir), tmp_path)
    changed = ["mode=prediction", "budget.flops=0.5", "phases.finetune_epochs=0", TINY_ROWS, "resume=true"]
    with pytest.raises(ConfigError, match=r"budget\.flops \(0\.7 -> 0\.5\)"):
        run(compose_cfg(changed, cache_dir), tmp_path)
    # What does not change the result may differ.
    ok = run(compose_cfg([*overrides, "resume=true", "log_every_n_steps=3", "latency.repeats=2"], cache_dir),
             tmp_path)
    assert ok["budget"] == {"flops": 0.7}


def test_cascaded_selects_features_then_compresses_the_rest_to_the_final_budget(tmp_path, cache_dir):
    cfg = compose_cfg(["mode=cascaded", "budget.flops=0.5", "phases.finetune_epochs=1", TINY_ROWS], cache_dir)
    summary = run(cfg, tmp_path)
    assert summary["budget_met"] is True and summary["flops_ratio"] <= 0.5
    select, compress = summary["stages"]["select"], summary["stages"]["compress"]
    assert select["budget_of_input_model"] == {"flops": pytest.approx(0.9)}  # 1 - 0.2 * (1 - 0.5)
    assert compress["budget_of_input_model"]["flops"] > 0.5  # relative to the smaller stage-1 model
    select_model = load_compressed(tmp_path / "checkpoints" / "select" / "extracted.pt")
    dense_top = 16
    # Stage 1 only removes inputs: every hidden layer keeps its width.
    assert select_model.structure.top[0] == dense_top
    assert select_model.structure.num_features < 26 or not select_model.structure.use_dense
    final = load_compressed(tmp_path / "compressed.pt")
    assert final.structure.feature_ids == select_model.structure.feature_ids
    assert (tmp_path / "sparsity_curves_select.png").exists() and (tmp_path / "sparsity_curves.png").exists()
    # The composed structure is in the dense model's numbering and names the removed features.
    kept = json.loads(json.dumps(summary["kept"]))
    expected = (["dense"] if final.structure.use_dense else []) + final.structure.feature_names
    assert set(kept["features"]) == set(expected)


class StatusRecorder(Logger):
    """A real (if minimal) Lightning logger that remembers how it was finalised."""

    def __init__(self):
        super().__init__()
        self.status = None

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def finalize(self, status):
        self.status = status


def test_loggers_are_finalised_with_the_real_status():
    ok, bad = StatusRecorder(), StatusRecorder()
    close_loggers([ok], "success")
    close_loggers([bad], "failed")
    assert (ok.status, bad.status) == ("success", "failed")


def test_interrupted_run_finalises_its_loggers_as_failed(tmp_path, cache_dir, monkeypatch):
    import umec_lightning.run as run_module

    seen = []
    real = run_module.close_loggers
    monkeypatch.setattr(run_module, "close_loggers", lambda loggers, status: (seen.append(status),
                                                                              real(loggers, status)))
    cfg = compose_cfg(["mode=prediction", "budget.flops=0.7", TINY_ROWS, "debug.interrupt={phase:compress,epoch:0}"],
                      cache_dir)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run(cfg, tmp_path)
    assert seen == ["failed"]


def test_method_state_follows_the_model_to_float64():
    """The mechanism that makes a compress stage work on a GPU: after the model moves (dtype here), the
    method rebuilds its grid where the parameters are and keeps its state."""
    from umec_lightning.compression.umec import UMECMethod

    from ..compression.conftest import tiny

    model = tiny("cat")
    method = UMECMethod(["feature", "dim", "neuron"], admm={})
    method.setup(model, {"flops": 0.5})
    method.after_step(model, 0.1)
    before = method.umec.state.flat().clone()
    model.double()
    method.to(torch.device("cpu"))
    assert method.umec.packed._slices.dtype == torch.float64
    assert torch.equal(method.umec.state.flat(), before)
    method.after_step(model, 0.1)
    assert int(method.umec.state.step) == 2
    outcome = method.finish(model)
    assert outcome.kept.feature_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_umec_state_follows_the_model_to_cuda_and_back():
    from umec_lightning.compression.extract import extract
    from umec_lightning.compression.umec import UMECMethod

    from ..compression.conftest import tiny

    model = tiny("dot")
    method = UMECMethod(["feature", "dim", "neuron", "pair"], admm={})
    method.setup(model, {"flops": 0.5})  # built on CPU, as after a pretrain fit's teardown
    model.cuda()
    method.to("cuda")
    assert not method.umec._host and method.umec.state.s.is_cuda
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dense = torch.rand(32, 3, device="cuda")
    sparse = torch.stack([torch.randint(0, n, (32,), device="cuda") for n in model.structure.table_sizes], 1)
    for _ in range(5):
        opt.zero_grad()
        model(dense, sparse).square().mean().backward()
        opt.step()
        method.after_step(model, 0.1)
    model.cpu()  # Lightning's teardown
    outcome = method.finish(model)
    assert method.umec._host
    slim = extract(model, outcome.kept)
    assert measure(slim).flops <= 0.5 * measure(model).flops + 1e-9


def test_extraction_builds_the_agreed_structure_not_the_local_one():
    """Under DDP the extraction callback passes a broadcast from rank 0 as `agree`: every rank builds rank
    0's structure even when its own decision differs (here: rank 0 kept half the neurons)."""
    from umec_lightning.compression.method import finish_and_extract

    from ..compression.conftest import tiny

    model = tiny("cat")
    rank0 = HalveTopLayer().finish(model)

    def agree(obj):
        return rank0.kept.to_dict(), rank0.info, None

    class KeepEverything(HalveTopLayer):
        def finish(self, model):
            return Outcome(kept=Kept.everything(model), info={})

    result = finish_and_extract(KeepEverything(), model, agree=agree)
    assert result.local_kept == Kept.everything(model)
    assert result.kept == rank0.kept
    assert result.model.structure.top[0] == model.structure.top[0] // 2
