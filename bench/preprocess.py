"""Benchmark: raw Criteo-format TSV -> cache (rows/s and peak RSS).

Generates TSV files with SyntheticCriteo.write_tsv into a temporary directory, then converts each
in a fresh subprocess (so the generator's memory does not count) and reports wall time, rows/s and
the converter's peak resident memory. Peak RSS should not grow with the file size.

    .venv/bin/python bench/preprocess.py --lines 1000000 2000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def convert(tsv: str, cache_root: str, block_bytes: int) -> dict:
    from umec_lightning.data import CriteoTSV, build_cache, load_meta

    baseline_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after imports (torch...)
    start = time.perf_counter()
    cache = build_cache(CriteoTSV(tsv, name="bench", block_bytes=block_bytes, progress=False), cache_root)
    seconds = time.perf_counter() - start
    rows = sum(load_meta(cache).rows.values())
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "peak_rss_mib": peak_mib,
        "rss_after_imports_mib": baseline_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--block-bytes", type=int, default=16 << 20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--convert", nargs=2, metavar=("TSV", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.convert:  # the child process
        print(json.dumps(convert(*args.convert, args.block_bytes)))
        return

    from umec_lightning.data import SyntheticCriteo

    results = []
    with tempfile.TemporaryDirectory(prefix="umec-bench-") as tmp:
        for lines in args.lines:
            tsv = Path(tmp) / f"criteo_{lines}.tsv"
            t0 = time.perf_counter()
            SyntheticCriteo(rows={"train": lines, "val": 1, "test": 1}, seed=args.seed).write_tsv(tsv, lines)
            gen_s = time.perf_counter() - t0
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--convert",
                    str(tsv),
                    str(Path(tmp) / "cache"),
                    "--block-bytes",
                    str(args.block_bytes),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(lines=lines, file_mib=tsv.stat().st_size / 2**20, generate_s=gen_s)
            results.append(r)
            tsv.unlink()
    print(
        f"{'lines':>10} {'file MiB':>9} {'seconds':>8} {'rows/s':>10} {'peak RSS MiB':>13} {'imports MiB':>12}"
    )
    for r in results:
        print(
            f"{r['lines']:>10} {r['file_mib']:>9.0f} {r['seconds']:>8.2f} {r['rows_per_s']:>10.0f} "
            f"{r['peak_rss_mib']:>13.0f} {r['rss_after_imports_mib']:>12.0f}"
        )
    print(json.dumps({"bench": "preprocess", "block_bytes": args.block_bytes, "results": results}))


if __name__ == "__main__":
    main()
