"""Synthetic, categorical-only CTR data in Frappe_x1's layout (BARS), with a planted ground truth.

    python bench/frappe_like.py --out DIR [--seed 0] [--rows-train 52000 --rows-val 5800 --rows-test 28900]
                                [--layout csv|libfm]

Writes, in the layout of `--layout`:
  * csv (default; BARS's Frappe_x1, data=frappe_x1): DIR/train.csv, DIR/valid.csv, DIR/test.csv with the header
    ``label,user,item,daytime,weekday,isweekend,homework,cost,weather,country,city``;
  * libfm (the NFM/AFM release, data=frappe): DIR/frappe.train.libfm, DIR/frappe.validation.libfm,
    DIR/frappe.test.libfm, lines ``-1 266:1 1244:1 ...``: label -1/1, one index per field in the order above,
    indices global across fields (each field's ids after the previous field's);
and DIR/truth.json with the planted oracle AUC (the AUC of the true click probabilities on each split), the
positive rates and the generator's settings. Both layouts hold the same rows (Frappe_x1's columns and about its
cardinalities). numpy only; the same --seed gives the same rows.

What it plants, and why. Real Frappe is small, categorical, with a heavy-tailed user and item popularity
and ~33% positives; a big unregularized model memorizes it and overfits, which is what the compression
study needs to be tested against. Here every row is (user, item, context) with
  * user and item drawn from Zipf-like popularity laws (ids shuffled), so most items are seen a few times;
  * a user's country and city fixed per user (city -> country), cost fixed per item (~15% paid),
    isweekend derived from weekday, daytime / homework / weather drawn per row;
  * label ~ Bernoulli(sigmoid(logit)), logit = intercept + alpha * <u_user, v_item>   (user x item)
                                           + <v_item, c_daytime + c_weekday + c_homework + c_weather>
                                           + user / item biases + small context main effects,
    latent rank 2, the item bias rising with the item's log popularity (popular items are clicked more, as
    in real Frappe where negatives are sampled items), the intercept solved for ~33% positives in train.
The user x item term can only be learned through the embeddings of both fields (a second-order
interaction), the tail ids have few rows each, so fitting it well needs regularization of the embeddings.
Seed 0's oracle AUC, and FuxiCTR's DLRM and ours on it with and without BARS's regularization: docs/
regularization.md, "Side by side with FuxiCTR".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CARD = dict(user=950, item=4000, daytime=7, weekday=7, isweekend=2, homework=3, cost=2, weather=9,
            country=80, city=230)
COLUMNS = ["label", *CARD]
RANK = 2             # latent rank of the user x item and item x context interactions
ALPHA = 4.0          # weight of the user x item dot product
CONTEXT_SCALE = 0.6  # size of the item x context interactions
POPULARITY = 1.0     # item bias grows with log popularity (times its standard deviation), as in real Frappe
POSITIVE_RATE = 0.33
LIBFM_FILES = {"train": "frappe.train.libfm", "valid": "frappe.validation.libfm", "test": "frappe.test.libfm"}


def popularity(rng, n: int, s: float) -> np.ndarray:
    """Zipf-like probabilities over n ids (1 / rank**s), assigned to the ids in a random order."""
    p = 1.0 / np.arange(1, n + 1) ** s
    return rng.permutation(p / p.sum())


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    order = np.argsort(p, kind="mergesort")
    _, first, counts = np.unique(p[order], return_index=True, return_counts=True)
    ranks = np.empty(len(p))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def make_world(rng) -> dict:
    """The planted parameters: latent factors, biases, per-user location, per-item cost."""
    w = {k: rng.normal(0.0, RANK ** -0.25, (CARD[k], RANK)) for k in ("user", "item")}
    for k in ("daytime", "weekday", "homework", "weather"):
        w["ctx_" + k] = rng.normal(0.0, CONTEXT_SCALE / 2.0, (CARD[k], RANK))
    for k, sd in (("user", 1.0), ("item", 1.5), ("daytime", 0.2), ("homework", 0.3), ("weather", 0.2),
                  ("cost", 0.4), ("country", 0.2)):
        w["bias_" + k] = rng.normal(0.0, sd, CARD[k])
    w["p_user"], w["p_item"] = popularity(rng, CARD["user"], 1.0), popularity(rng, CARD["item"], 1.05)
    log_pop = np.log(w["p_item"])
    w["bias_item"] += POPULARITY * (log_pop - log_pop.mean()) / log_pop.std()
    city_country = rng.choice(CARD["country"], CARD["city"], p=popularity(rng, CARD["country"], 1.2))
    w["user_city"] = rng.choice(CARD["city"], CARD["user"], p=popularity(rng, CARD["city"], 1.0))
    w["user_country"] = city_country[w["user_city"]]
    w["item_cost"] = (rng.random(CARD["item"]) < 0.15).astype(np.int64)
    return w


def sample(rng, w: dict, n: int) -> tuple[dict, np.ndarray]:
    """n rows of features and their planted logits (before the intercept)."""
    u = rng.choice(CARD["user"], n, p=w["p_user"])
    i = rng.choice(CARD["item"], n, p=w["p_item"])
    x = dict(user=u, item=i, daytime=rng.integers(0, 7, n), weekday=rng.integers(0, 7, n),
             homework=rng.choice(3, n, p=[0.6, 0.3, 0.1]), weather=rng.choice(9, n, p=popularity(rng, 9, 1.0)))
    x.update(isweekend=(x["weekday"] >= 5).astype(np.int64), cost=w["item_cost"][i],
             country=w["user_country"][u], city=w["user_city"][u])
    ctx = sum(w["ctx_" + k][x[k]] for k in ("daytime", "weekday", "homework", "weather"))
    v = w["item"][i]
    logit = ALPHA * np.einsum("nk,nk->n", w["user"][u], v) + np.einsum("nk,nk->n", v, ctx)
    for k in ("user", "item", "daytime", "homework", "weather", "cost", "country"):
        logit += w["bias_" + k][x[k]]
    return x, logit


def write_split(out: Path, name: str, layout: str, label: np.ndarray, x: dict) -> None:
    """One split's rows as Frappe_x1's CSV or as the libFM release's lines (see the module docstring)."""
    if layout == "csv":
        table = np.column_stack([label] + [x[k] for k in CARD])
        np.savetxt(out / f"{name}.csv", table, fmt="%d", delimiter=",", header=",".join(COLUMNS), comments="")
        return
    offsets = np.cumsum([0, *CARD.values()])[:-1]
    index = np.column_stack([x[k] + offset for k, offset in zip(CARD, offsets)])
    lines = [" ".join(["1" if y else "-1", *(f"{i}:1" for i in row)]) for y, row in zip(label, index)]
    tmp = out / f".{LIBFM_FILES[name]}.tmp"  # numpy only (umec_lightning.io is not importable in FuxiCTR's venv)
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / LIBFM_FILES[name])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows-train", type=int, default=52000)
    ap.add_argument("--rows-val", type=int, default=5800)
    ap.add_argument("--rows-test", type=int, default=28900)
    ap.add_argument("--layout", choices=["csv", "libfm"], default="csv")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    world = make_world(rng)
    splits = {name: sample(rng, world, n) for name, n in
              (("train", args.rows_train), ("valid", args.rows_val), ("test", args.rows_test))}
    lo, hi = -30.0, 30.0  # intercept: bisection on the mean training probability
    for _ in range(100):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(splits["train"][1] + mid)))) < POSITIVE_RATE else (lo, mid)
    truth = dict(seed=args.seed, intercept=lo, rank=RANK, alpha=ALPHA, context_scale=CONTEXT_SCALE,
                 popularity=POPULARITY, cardinality=CARD, oracle_auc={}, positive_rate={}, rows={})
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (x, logit) in splits.items():
        prob = 1.0 / (1.0 + np.exp(-(logit + lo)))
        label = (rng.random(len(prob)) < prob).astype(np.int64)
        write_split(args.out, name, args.layout, label, x)
        truth["oracle_auc"][name] = auc(label, prob)
        truth["positive_rate"][name] = float(label.mean())
        truth["rows"][name] = len(label)
    (args.out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    print(json.dumps({k: truth[k] for k in ("oracle_auc", "positive_rate")}))


if __name__ == "__main__":
    main()
