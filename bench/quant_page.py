"""The quantization results of docs/quantization.md, measured on what a server loads (never typed by hand).

    python bench/quant_page.py --page docs/quantization.md --block NAME [--threads 1] "<data label>|<sweep dir>[,...]"

For every run below the sweep dirs (each `summary.json` with a `compressed.pt`, and the dense_control runs), one
row per (data, mode, budget), aggregated over seeds (mean ± sample std):
- ΔAUC: test AUC against the equal-epochs dense model of the same seed (`delta_test_auc_same_epochs`);
- paired: umec-report's significance test of the same comparison (`report.rows.build_rows`): the seed-mean exact
  ΔAUC against the equal-epochs dense model with its DeLong 95 % interval and p, from the runs' test predictions;
- stored: the saved model's bytes by storage type over the fp32 dense model's (`bytes_ratio` of summary.json);
- files: compressed.pt, TorchScript, ONNX and torchrec's file over the fp32 dense model's stored bytes: the run's
  own files (`file_bytes` of summary.json, what `budget.bytes` is met on) where it wrote them, else written here
  from `compressed.pt` (TorchScript and ONNX, batch norm folded, each checked against the eager model);
- latency: the exported TorchScript model against the dense model's TorchScript export (its pretrained weights, from
  the shared reference's checkpoint), timed interleaved (`latency.compare_latency`) at batch 1 and 2048, median
  per-round ratio, at `--threads` threads;
- met: seeds whose run met the budget (`budget_met`: the stored model and, where the run reported them, its files).
The page's `<!-- table:NAME -->` block is rewritten; each run's figures are kept in `<run>/quant_export.json` (a
second pass reads them back) and gathered in `<sweep dir>/quant_exports.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.pages import fill_block, mean_sd  # noqa: E402
from umec_lightning import load_compressed  # noqa: E402
from umec_lightning.compression.export import export_onnx, export_torchscript  # noqa: E402
from umec_lightning.io import write_json, write_text  # noqa: E402
from umec_lightning.latency import Loaded, compare_latency  # noqa: E402
from umec_lightning.models.family import family_of  # noqa: E402
from umec_lightning.report.markdown import paired_cell  # noqa: E402
from umec_lightning.report.rows import build_rows  # noqa: E402
from umec_lightning.report.runs import load_runs  # noqa: E402
from umec_lightning.run import build_datamodule, dense_structure_for  # noqa: E402
from umec_lightning.stages.pretrained import load_pretrained  # noqa: E402

MODE_ORDER = ["dense_control", "quant_int8", "quant_int4", "qat_int4", "joint_int8", "joint_quant", "lowrank_quant"]
BATCHES = (1, 2048)


def dense_model(run: Path):
    """The run's pretrained dense model (its config, its data's cache, the reference checkpoint it loaded)."""
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    summary = json.loads((run / "summary.json").read_text())
    dm = build_datamodule(cfg)
    dm.ensure_ready()
    model = family_of(cfg.model).build(dense_structure_for(cfg.model, dm.meta), sparse_grad=False)
    load_pretrained(model, summary["pretrain"]["pretrained"], cfg.model.name, cfg.data.name)
    return model.eval()


def measure_run(run: Path, threads: int, dense_cache: dict) -> dict:
    """The run's figures, measured once: kept in `<run>/quant_export.json` and read back from there after."""
    cached = run / "quant_export.json"
    if cached.exists():
        return json.loads(cached.read_text())
    figures = _measure_run(run, threads, dense_cache)
    write_json(cached, figures)
    return figures


def _measure_run(run: Path, threads: int, dense_cache: dict) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    model = load_compressed(run / "compressed.pt").eval()
    ref = summary["pretrain"]["pretrained"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        script = run / "compressed.torchscript.pt"
        if not script.exists():
            script = export_torchscript(model, tmp / "q.pt", atol=1e-5)
        sizes = dict(summary.get("file_bytes") or {"model": (run / "compressed.pt").stat().st_size})
        sizes.setdefault("torchscript", script.stat().st_size)
        if "onnx" not in sizes:
            sizes["onnx"] = export_onnx(model, tmp / "q.onnx", atol=1e-5).stat().st_size
        if ref not in dense_cache:
            dense = dense_model(run)
            dense_cache[ref] = torch.jit.load(str(export_torchscript(dense, tmp / "d.pt", atol=1e-5))), dense.structure
        dense_script, dense_structure = dense_cache[ref]
        served = {"dense": Loaded(dense_script, dense_structure),
                  "quantized": Loaded(torch.jit.load(str(script)), model.structure)}
        timing = compare_latency(served, BATCHES, repeats=15, threads=threads, seed=0)
    dense_bytes = summary["dense_stored_bytes"]["total"]
    return {"run": str(run), "mode": summary["mode"], "seed": summary["seed"], "budget": summary.get("budget") or {},
            "delta_auc": summary.get("delta_test_auc_same_epochs"), "test_auc": summary["test_auc"],
            "stored_ratio": summary["bytes_ratio"], "budget_met": summary.get("budget_met"),
            "file_ratio": {fmt: size / dense_bytes for fmt, size in sizes.items()},
            "files_from_run": "file_bytes" in summary, "export_bytes": sizes,
            "latency_ratio": {k: v["median"] for k, v in timing["ratio"]["quantized"].items()},
            "threads": timing["threads"]}


FILES = ("model", "torchscript", "onnx", "torchrec")


def paired_cells(roots: list[str]) -> dict[tuple[str, str], str]:
    """{(mode, budget): umec-report's paired-test cell} for the runs below `roots` (`report.rows.build_rows`: each
    run against its seed's equal-epochs dense model, from the test predictions the runs wrote)."""
    runs = [run for root in roots for run in load_runs(Path(root))]
    return {(row.mode, ", ".join(f"{k} {v:g}" for k, v in sorted(row.budget)) or "–"): paired_cell(row)
            for row in build_rows(runs)}


def rows(specs: list[str], threads: int) -> list[str]:
    head = ["| data | mode | budget | seeds | test AUC | ΔAUC vs dense | paired ΔAUC [95 %] p | stored / dense | "
            "files / dense: compressed.pt · TorchScript · ONNX · torchrec | latency b1 | latency b2048 | met |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    out = []
    for spec in specs:
        label, roots = spec.split("|")
        paired = paired_cells(roots.split(","))
        measured, dense_cache = [], {}
        for root in roots.split(","):
            found = []
            for path in sorted(Path(root).rglob("summary.json")):
                summary = json.loads(path.read_text())
                if summary["mode"] == "dense_control":
                    found.append({"mode": "dense_control", "seed": summary["seed"], "budget": {},
                                  "test_auc": summary["test_auc"]})
                elif (path.parent / "compressed.pt").exists():
                    found.append(measure_run(path.parent, threads, dense_cache))
            write_json(Path(root) / "quant_exports.json", found)
            measured += found
        groups = defaultdict(list)
        for m in measured:
            budget = ", ".join(f"{k} {v:g}" for k, v in sorted(m["budget"].items())) or "–"
            groups[(m["mode"], budget)].append(m)
        order = {m: i for i, m in enumerate(MODE_ORDER)}
        for (mode, budget), runs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
            seeds = ",".join(str(r["seed"]) for r in runs)
            auc = mean_sd([r["test_auc"] for r in runs])
            if mode == "dense_control":
                out.append(f"| {label} | {mode} | – | {seeds} | {auc} | reference | reference | 1 | – | – | – | – |")
                continue

            def cell(key, sub=None, digits=3, runs=runs):
                values = [r[key][sub] if sub else r[key] for r in runs
                          if r.get(key) is not None and (sub is None or sub in r[key])]
                return mean_sd(values, digits)

            met = sum(bool(r["budget_met"]) for r in runs) if any(r["budget"] for r in runs) else None
            files = " · ".join(cell("file_ratio", fmt) if any(fmt in r.get("file_ratio", {}) for r in runs) else "–"
                               for fmt in FILES)
            out.append(f"| {label} | {mode} | {budget} | {seeds} | {auc} | "
                       f"{mean_sd([r['delta_auc'] for r in runs if r['delta_auc'] is not None], sign=True)} | "
                       f"{paired.get((mode, budget), '–')} | {cell('stored_ratio')} | {files} | "
                       f"{cell('latency_ratio', 'batch_1', 2)} | {cell('latency_ratio', 'batch_2048', 2)} | "
                       f"{'–' if met is None else f'{met}/{len(runs)}'} |")
    return head + out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--page", type=Path, required=True)
    ap.add_argument("--block", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("sweeps", nargs="+", help="data label|sweep dir[,sweep dir...]")
    args = ap.parse_args(argv)
    table = rows(args.sweeps, args.threads)
    write_text(args.page, fill_block(args.page.read_text(), args.block, "\n".join(table)))
    print("\n".join(table))


if __name__ == "__main__":
    main()
