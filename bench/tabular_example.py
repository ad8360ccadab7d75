"""The shipped example of a CSV read by schema, data/example.csv (conf/data/tabular_example.yaml), and how it was made.

    python bench/tabular_example.py [--out data/example.csv] [--rows 500] [--seed 0]

Columns ``clicked,age,price,country,device,campaign``: a 0/1 label, two dense columns (age in years, price), three
categorical ones. Some ages are empty (missing: read as 0), and one country code is "NA" (Namibia: a category, not a
gap, unless data.null_values says so). The click depends on campaign, device, age and price through a planted
logistic model, so a model trained on it learns something. Only ``random.Random(seed).random()`` draws the values,
whose sequence Python keeps from version to version: the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from umec_lightning.io import write_text

COLUMNS = ["clicked", "age", "price", "country", "device", "campaign"]
COUNTRIES = ["US", "DE", "FR", "GB", "IN", "BR", "JP", "NA"]
DEVICES = {"mobile": 0.6, "desktop": 0.0, "tablet": -0.3}  # device -> its effect on the click logit
CAMPAIGNS = 12
MISSING_AGE = 0.05


def rows(n: int, seed: int) -> list[str]:
    """n CSV lines (no header) drawn from the planted model."""
    rng = random.Random(seed)
    campaign_effect = [2.0 * rng.random() - 1.0 for _ in range(CAMPAIGNS)]
    lines = []
    for _ in range(n):
        country = COUNTRIES[min(int(rng.random() ** 2 * len(COUNTRIES)), len(COUNTRIES) - 1)]  # skewed to the first
        device = list(DEVICES)[int(rng.random() * len(DEVICES))]
        campaign = int(rng.random() * CAMPAIGNS)
        age = 18 + int(rng.random() * 53)
        price = round(1.0 + 199.0 * rng.random() ** 2, 2)
        logit = -0.8 + campaign_effect[campaign] + DEVICES[device] + (0.7 if age < 30 else 0.0) - 0.01 * price
        clicked = int(rng.random() < 1.0 / (1.0 + math.exp(-logit)))
        age_field = "" if rng.random() < MISSING_AGE else str(age)
        lines.append(f"{clicked},{age_field},{price:.2f},{country},{device},c{campaign + 1:02d}")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "example.csv")
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    write_text(args.out, "\n".join([",".join(COLUMNS), *rows(args.rows, args.seed)]) + "\n")
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
