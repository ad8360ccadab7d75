"""Latency of the row-wise quantized tables as served: the float DLRM of the Criteo sample's shape against its int8
and int4 copies (`quant.quantize_tables`), each exported to TorchScript and read back, timed interleaved
(`latency.compare_latency`: median ms, and the median per-round ratio to the float model) at batch 1 and 2048.

    OMP_NUM_THREADS=1 python bench/quant_lookup.py [--threads 1] [--repeats 20] [--json out.json] [--fbgemm]

`--fbgemm` adds the int8 and int4 models with their tables served by torchrec's quantized EmbeddingBagCollection
(fbgemm's int-N TBE inside; `quant.fbgemm.serve_with_fbgemm`), timed eager: the lookup around fbgemm's op is Python
(not scriptable), the rest of the model is the same eager DLRM.

The model: 26 tables of 1,000 to 50,000 rows (geometric), embedding dim 16, 13 dense inputs, bottom MLP
[512, 256, 64, 16], top MLP [512, 256, 1], `dot` interaction.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from umec_lightning.compression.export import export_torchscript  # noqa: E402
from umec_lightning.latency import Loaded, compare_latency  # noqa: E402
from umec_lightning.models import DLRM, dense_structure  # noqa: E402
from umec_lightning.quant import quantize_tables  # noqa: E402

BATCHES = (1, 2048)
NUM_TABLES = 26


def table_sizes(count: int = NUM_TABLES, low: int = 1000, high: int = 50000) -> list[int]:
    """`count` sizes from `low` to `high`, geometric."""
    return [round(low * (high / low) ** (i / (count - 1))) for i in range(count)]


def float_model(seed: int = 0) -> DLRM:
    structure = dense_structure(sparse_names=[f"C{i}" for i in range(1, NUM_TABLES + 1)], table_sizes=table_sizes(),
                                embedding_dim=16, bottom=[512, 256, 64, 16], top=[512, 256, 1], num_dense=13,
                                dense_names=[f"I{i}" for i in range(1, 14)])
    return DLRM(structure, seed=seed).eval()


def served(models: dict[str, nn.Module], tmp: Path) -> dict[str, nn.Module]:
    """{name: the TorchScript export of the model, read back} (export checks it against the eager model)."""
    out = {}
    for name, model in models.items():
        path = export_torchscript(model, tmp / f"{name}.pt")
        out[name] = Loaded(torch.jit.load(str(path)), model.structure)
    return out


def measure(models: dict[str, nn.Module], threads: int = 1, repeats: int = 20,
            eager: dict[str, nn.Module] | None = None) -> dict:
    """compare_latency of the TorchScript exports of `models` (the first is the reference) and of the `eager`
    models as they are, interleaved in one comparison."""
    with tempfile.TemporaryDirectory() as tmp:
        return compare_latency(served(models, Path(tmp)) | (eager or {}), BATCHES, repeats=repeats, threads=threads,
                               seed=0)


def report(timing: dict) -> str:
    names = list(timing["ms"])
    lines = [f"threads {timing['threads']}, {timing['repeats']} repeats (TorchScript, median ms; ratio: median "
             f"per-round time over {names[0]}'s, [p25, p75])"]
    for batch in BATCHES:
        key = f"batch_{batch}"
        for name in names:
            line = f"  batch {batch:>5}  {name:<13} {timing['ms'][name][key]:9.3f} ms"
            if name in timing["ratio"]:
                r = timing["ratio"][name][key]
                line += f"   x{r['median']:.3f} [{r['p25']:.3f}, {r['p75']:.3f}]"
            lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--fbgemm", action="store_true",
                    help="also the int8/int4 tables served by torchrec's quantized modules (eager)")
    args = ap.parse_args(argv)
    model = float_model()
    models = {"float": model, "int8": quantize_tables(model, 8), "int4": quantize_tables(model, 4)}
    eager = None
    if args.fbgemm:
        from umec_lightning.quant.fbgemm import serve_with_fbgemm

        eager = {"int8 torchrec": serve_with_fbgemm(models["int8"]), "int4 torchrec": serve_with_fbgemm(models["int4"])}
    timing = measure(models, args.threads, args.repeats, eager)
    print(report(timing))
    if args.json is not None:
        args.json.write_text(json.dumps(timing, indent=1))
    return timing


if __name__ == "__main__":
    main()
