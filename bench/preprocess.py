"""Benchmark: raw Criteo-format TSV -> cache (rows/s and peak RSS).

Generates TSV files with SyntheticCriteo.write_tsv into a temporary directory, then converts each
in a fresh subprocess (so the generator's memory does not count) and reports wall time, rows/s and
the converter's peak resident memory. Peak RSS should not grow with the file size.

    .venv/bin/python bench/preprocess.py --lines 1000000 2000000 [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def convert(tsv: str, cache_root: str, block_bytes: int, threads: int | None) -> dict:
    from umec_lightning.data import CriteoTSV, build_cache, load_meta

    source = CriteoTSV(tsv, name="bench", block_bytes=block_bytes, progress=False)
    if threads is not None:
        source.threads = threads
    baseline_mib = _status_mib("VmRSS")  # after imports (torch...)
    exact_peak = _reset_peak_rss()
    start = time.perf_counter()
    cache = build_cache(source, cache_root)
    seconds = time.perf_counter() - start
    rows = sum(load_meta(cache).rows.values())
    # The conversion's own peak: the import peak (torch) is wiped first where Linux allows it;
    # otherwise the lifetime peak, which can hide the conversion below the imports.
    peak_mib = _status_mib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "peak_rss_mib": peak_mib,
        "rss_after_imports_mib": baseline_mib,
        "peak_is_conversion_only": exact_peak,
        "threads": _threads(source),
        "load_avg_1min": os.getloadavg()[0],  # other work on the machine slows every figure
    }


def _threads(source) -> int:
    if not hasattr(source, "threads"):
        return 1  # code from before the thread pool
    from umec_lightning.data.text import available_cores

    return source.threads or available_cores()


def _reset_peak_rss() -> bool:
    """Reset the process's resident-memory high-water mark (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field in MiB (the lifetime peak where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--block-bytes", type=int, default=16 << 20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CriteoTSV threads (default: available cores)")
    parser.add_argument("--convert", nargs=2, metavar=("TSV", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.convert:  # the child process
        print(json.dumps(convert(*args.convert, args.block_bytes, args.threads)))
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
                    *(["--threads", str(args.threads)] if args.threads else []),
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
        f"{'lines':>10} {'file MiB':>9} {'threads':>7} {'seconds':>8} {'rows/s':>10} {'peak RSS MiB':>13}"
        f" {'imports MiB':>12} {'above imports':>14} {'load':>5}"
    )
    for r in results:
        print(
            f"{r['lines']:>10} {r['file_mib']:>9.0f} {r['threads']:>7} {r['seconds']:>8.2f} {r['rows_per_s']:>10.0f} "
            f"{r['peak_rss_mib']:>13.0f} {r['rss_after_imports_mib']:>12.0f}"
            f" {r['peak_rss_mib'] - r['rss_after_imports_mib']:>14.0f} {r['load_avg_1min']:>5.1f}"
        )
    print(json.dumps({"bench": "preprocess", "block_bytes": args.block_bytes, "results": results}))


if __name__ == "__main__":
    main()
