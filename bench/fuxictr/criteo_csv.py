"""python bench/fuxictr/criteo_csv.py <criteo_kaggle_head10k.tsv> <out dir>

Raw Criteo Kaggle head -> train/valid/test CSVs for FuxiCTR, split and transformed like umec_lightning.

Split: 7 "days" by line order, N//7 each with the first N%7 days +1 line; train = days 1-6,
last day: first ceil(half) -> test, rest -> valid.  Dense: log(1+max(x,0)), empty -> 0 (float).
Categorical: the hex value as a decimal uint32 string, empty -> "0" (its own value, as in our reader);
FuxiCTR builds the vocabulary from train (min count 1) and maps unseen values to its OOV id.
"""
import csv
import math
import sys
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
lines = src.read_bytes().decode().splitlines()
n, days = len(lines), 7
base, extra = divmod(n, days)
sizes = [base + (1 if d < extra else 0) for d in range(days)]
train_end = sum(sizes[:-1])
test_end = train_end + (sizes[-1] + 1) // 2
out.mkdir(parents=True, exist_ok=True)
header = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
files = {s: open(out / f"{s}.csv", "w", newline="") for s in ("train", "test", "valid")}
writers = {s: csv.writer(f) for s, f in files.items()}
for w in writers.values():
    w.writerow(header)
for k, line in enumerate(lines):
    f = line.split("\t")
    assert len(f) == 40, (k, len(f))
    dense = [repr(math.log1p(max(int(x), 0))) if x else "0.0" for x in f[1:14]]
    cat = [str(int(x, 16)) if x else "0" for x in f[14:]]
    split = "train" if k < train_end else "test" if k < test_end else "valid"
    writers[split].writerow([f[0]] + dense + cat)
for fh in files.values():
    fh.close()
print({"sizes": sizes, "train": train_end, "test": test_end - train_end, "valid": n - test_end})
