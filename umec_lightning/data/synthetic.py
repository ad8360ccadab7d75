"""A Criteo-like synthetic click log with a planted ground-truth model and a known oracle AUC.

Rows have Criteo's schema: ``num_dense`` count-like integer features and ``num_sparse`` categorical
features whose ids are Zipf-distributed over per-feature cardinalities. The label is
Bernoulli(sigmoid(logit)), with

    logit = bias + sum_{f informative} effect_f[id_f]                        (main effects)
                 + sum_{(f, g) pairs} s_fg * <u_f[id_f], v_g[id_g]>            (rank-R interactions)
                 + sum_{(f, g) pairs} h_fg * sum_k w_k relu(a_k.u_f[id_f] + b_k.v_g[id_g] + c_k)
                 + dense_term(log1p(max(x, 0)))                               (small nonlinear function)

with u_f, v_g in R^R (R = ``interaction_rank``) and k = 1..H (H = ``interaction_hidden``; 0: no
relu term). A model needs embedding width >= R to represent the bilinear part and about H hidden
neurons per pair for the relu part, which is how the ``synthetic_capacity`` preset makes capacity
matter. Importance is graded: with ``importance_decay`` d > 0 the informative feature of importance
rank r (a random order) has main-effect scale ``main_effect_scale * exp(-d r)``, else a uniform
U(0.5, 1.5) multiple; likewise pair k of a random order has s = ``interaction_scale * exp(-d_i k)`` and
h = ``interaction_hidden_scale * exp(-d_i k)`` with d_i = ``interaction_decay``. The defaults (rank 2,
no relu term, no decay) are the original generator, bit for bit: what they add is drawn from a
second generator stream, never from the one the original draws come from.

``num_noise`` sparse features carry no signal at all (their names are in ``meta.noise_features``).
The planted importance of each sparse feature, the std over the calibration rows of its main effect
plus half of each of its pairs' terms (0 for noise features), goes to ``meta.feature_importance``.
Effects of rare ids are shrunk towards 0 (a learner cannot estimate what it sees a few times); the
bias is calibrated so the positive rate is ``positive_rate``. The oracle AUC (the AUC of the true
probability, computed exactly) is written to the cache meta for val and test, and the true
probabilities to ``<split>_prob.npy``. Everything is a deterministic function of ``seed``: rows are
generated in fixed-size chunks, each with its own seeded generator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umec_lightning.data.cache import NpyAppender, SplitWriter, make_fingerprint, meta_fields
from umec_lightning.data.core import NUM_DENSE, NUM_SPARSE, SPLITS, DataError
from umec_lightning.data.text import log1p_clamped

# Kaggle's vocabulary sizes (method.md §2), capped at 100k so the default tables stay small.
DEFAULT_CARDINALITIES = [
    1460, 583, 100000, 60000, 305, 24, 12517, 633, 3, 93145, 5683, 80000, 3194,
    27, 14992, 50000, 10, 5652, 2173, 4, 70000, 18, 15, 28618, 105, 14257,
]  # fmt: skip
DEFAULT_ROWS = {"train": 1_500_000, "val": 100_000, "test": 100_000}
CHUNK_ROWS = 1 << 17
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
_CALIBRATION_ROWS = 100_000


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by ranking (Mann-Whitney U), ties counted one half; exact, no sampling."""
    scores = np.asarray(scores)
    labels = np.asarray(labels).astype(bool)
    pos = int(labels.sum())
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # 1-based rank of the last element of each tie group
    avg_rank = upper - (counts - 1) / 2.0
    rank_sum = float(avg_rank[inverse][labels].sum())
    return (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)


class SyntheticCriteo:
    """Source: the synthetic Criteo-like generator (see module docstring)."""

    def __init__(
        self,
        name: str = "synthetic",
        rows: dict | None = None,
        num_dense: int = NUM_DENSE,
        num_sparse: int = NUM_SPARSE,
        cardinalities: list[int] | None = None,
        num_noise: int = 6,
        num_interactions: int = 4,
        zipf_exponent: float = 1.1,
        main_effect_scale: float = 0.36,
        interaction_scale: float = 0.45,
        dense_scale: float = 0.4,
        rare_shrink: float = 1000.0,
        positive_rate: float = 0.25,
        dense_missing_rate: float = 0.2,
        importance_decay: float = 0.0,
        interaction_decay: float = 0.0,
        interaction_rank: int = 2,
        interaction_hidden: int = 0,
        interaction_hidden_scale: float = 1.0,
        seed: int = 0,
    ):
        self.name = name
        self.rows = {s: int(n) for s, n in {**DEFAULT_ROWS, **(dict(rows) if rows else {})}.items()}
        unknown = set(self.rows) - set(SPLITS)
        if unknown:
            raise DataError(f"rows: unknown split(s) {sorted(unknown)}; expected train/val/test")
        cards = list(cardinalities) if cardinalities is not None else None
        if cards is None:
            cards = [DEFAULT_CARDINALITIES[i % NUM_SPARSE] for i in range(num_sparse)]
        if len(cards) != num_sparse:
            raise DataError(f"cardinalities: expected {num_sparse} values (num_sparse), got {len(cards)}")
        if min(cards) < 1:
            raise DataError("cardinalities: every cardinality must be >= 1")
        if not 0 <= num_noise <= num_sparse:
            raise DataError(f"num_noise: expected 0..{num_sparse}, got {num_noise}")
        if not 0.0 < positive_rate < 1.0:
            raise DataError(f"positive_rate: expected a value in (0, 1), got {positive_rate}")
        for key, value in (("importance_decay", importance_decay), ("interaction_decay", interaction_decay),
                           ("interaction_hidden_scale", interaction_hidden_scale)):
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise DataError(f"{key}: expected a finite number >= 0, got {value!r}")
        for key, value, low in (("interaction_rank", interaction_rank, 1),
                                ("interaction_hidden", interaction_hidden, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise DataError(f"{key}: expected an integer >= {low}, got {value!r}")
        self.num_dense, self.num_sparse = int(num_dense), int(num_sparse)
        self.cardinalities = [int(c) for c in cards]
        self.num_noise, self.num_interactions = int(num_noise), int(num_interactions)
        self.zipf_exponent = float(zipf_exponent)
        self.main_effect_scale = float(main_effect_scale)
        self.interaction_scale = float(interaction_scale)
        self.dense_scale = float(dense_scale)
        self.rare_shrink = float(rare_shrink)
        self.positive_rate = float(positive_rate)
        self.dense_missing_rate = float(dense_missing_rate)
        self.importance_decay = float(importance_decay)
        self.interaction_decay = float(interaction_decay)
        self.interaction_rank = int(interaction_rank)
        self.interaction_hidden = int(interaction_hidden)
        self.interaction_hidden_scale = float(interaction_hidden_scale)
        self.seed = int(seed)
        self.dense_names = [f"I{i}" for i in range(1, self.num_dense + 1)]
        self.sparse_names = [f"C{i}" for i in range(1, self.num_sparse + 1)]
        self._plant()

    def options(self) -> dict:
        keys = [
            "rows", "num_dense", "num_sparse", "cardinalities", "num_noise", "num_interactions",
            "zipf_exponent", "main_effect_scale", "interaction_scale", "dense_scale", "rare_shrink",
            "positive_rate", "dense_missing_rate", "importance_decay", "interaction_decay", "interaction_rank",
            "interaction_hidden", "interaction_hidden_scale", "seed",
        ]  # fmt: skip
        return {k: getattr(self, k) for k in keys}

    def fingerprint(self) -> str:
        return make_fingerprint("SyntheticCriteo", self.options())

    # --- the planted model ---------------------------------------------------------------------

    def _plant(self) -> None:
        rng = np.random.default_rng([self.seed, 0])
        # Everything the original generator did not have is drawn from here, so that the defaults leave
        # the draws of ``rng`` (and so every output) exactly as they were.
        extra = np.random.default_rng([self.seed, 1])
        F = self.num_sparse
        order = rng.permutation(F)
        self.noise_idx = sorted(int(i) for i in order[: self.num_noise])
        self.informative_idx = sorted(int(i) for i in order[self.num_noise :])
        importance_rank = {int(f): r for r, f in enumerate(extra.permutation(self.informative_idx))}
        # Zipf over ranks; the rank-to-id map is a random permutation so ids carry no order.
        self._cdf, self._rank_to_id, self._effects, self._weights = [], [], [], []
        expected = sum(self.rows.values())
        for f, card in enumerate(self.cardinalities):
            p = 1.0 / np.arange(1, card + 1) ** self.zipf_exponent
            p /= p.sum()
            cdf = np.cumsum(p)
            cdf[-1] = 1.0
            self._cdf.append(cdf)
            self._rank_to_id.append(rng.permutation(card).astype(np.int32))
            # Ids expected only a few times in the data get their effects shrunk (weight by id).
            weight = np.ones(card)
            if self.rare_shrink > 0:
                weight[self._rank_to_id[f]] = 1.0 - np.exp(-p * expected / self.rare_shrink)
            self._weights.append(weight)
            effect = np.zeros(card)
            if f in self.informative_idx:
                scale = self.main_effect_scale * rng.uniform(0.5, 1.5)
                if self.importance_decay > 0:  # the uniform draw is still made: it keeps rng's stream
                    scale = self.main_effect_scale * np.exp(-self.importance_decay * importance_rank[f])
                effect = scale * rng.standard_normal(card) * weight
            self._effects.append(effect)
        inf = self.informative_idx
        pairs = set()
        for _ in range(100 * max(1, self.num_interactions)):
            if len(pairs) >= self.num_interactions or len(inf) < 2:
                break
            a, b = sorted(rng.choice(inf, 2, replace=False).tolist())
            pairs.add((a, b))
        self.pairs = sorted(pairs)
        self._factors = {}
        for a, b in self.pairs:
            ua = self._factor(rng, extra, self.cardinalities[a]) * self._weights[a][:, None]
            vb = self._factor(rng, extra, self.cardinalities[b]) * self._weights[b][:, None]
            self._factors[(a, b)] = (ua, vb)
        self._plant_pair_grades(extra)
        # Dense: log-normal counts; a few columns have negatives (-1, like Criteo's I2).
        self._dense_mu = rng.uniform(0.3, 4.0, self.num_dense)
        self._dense_sigma = rng.uniform(0.7, 1.6, self.num_dense)
        self._dense_missing = rng.uniform(0.0, 2 * self.dense_missing_rate, self.num_dense)
        self._dense_negative = np.where(rng.random(self.num_dense) < 0.15, 0.05, 0.0)
        self._dense_cols = rng.choice(self.num_dense, size=min(3, self.num_dense), replace=False)
        self._dense_norm = (0.0, 1.0)
        self._sparse_empty = rng.random(F) < 0.2  # features whose id of rank 0 is written as empty
        self._hash_mult = (rng.integers(0, 1 << 31, F, dtype=np.int64) * 2 + 1).astype(np.uint64)
        self._bias = 0.0
        cal = self._generate(_CALIBRATION_ROWS, [self.seed, 99])
        terms = cal["dense_term_raw"]
        self._dense_norm = (float(terms.mean()), float(terms.std() + 1e-12))
        logit = self._logit(cal)
        lo, hi = -20.0, 20.0
        for _ in range(60):  # bisection: mean probability == positive_rate
            mid = (lo + hi) / 2
            if (1.0 / (1.0 + np.exp(-(logit + mid)))).mean() > self.positive_rate:
                hi = mid
            else:
                lo = mid
        self._bias = (lo + hi) / 2
        self.importance = self._importance(cal)

    def _factor(self, rng: np.random.Generator, extra: np.random.Generator, card: int) -> np.ndarray:
        """Interaction factors (card x R) whose inner products have variance 1/2 at every rank R.

        The first two columns come from ``rng`` as in the original rank-2 generator, the others from
        ``extra``; entries ~ N(0, 1/sqrt(2R)), which is the original 1/sqrt(2) scaling at R = 2.
        """
        R = self.interaction_rank
        z = rng.standard_normal((card, 2))
        if R == 2:
            return z / np.sqrt(2)
        z = np.concatenate([z[:, :R], extra.standard_normal((card, max(0, R - 2)))], axis=1)
        return z / (2.0 * R) ** 0.25

    def _plant_pair_grades(self, extra: np.random.Generator) -> None:
        """Pair strengths (graded by ``interaction_decay``) and the relu units of the nonlinear term."""
        order = extra.permutation(len(self.pairs))
        grade = {p: float(np.exp(-self.interaction_decay * order[k])) for k, p in enumerate(self.pairs)}
        # No decay: grade exp(-0.0) == 1.0 exactly, so the strength is interaction_scale, bit for bit.
        self._pair_scale = {p: self.interaction_scale * grade[p] for p in self.pairs}
        self._pair_hidden_scale = {p: self.interaction_hidden_scale * grade[p] for p in self.pairs}
        self._hidden = {}
        H, R = self.interaction_hidden, self.interaction_rank
        if H == 0:
            return
        for p in self.pairs:
            # a.u and b.v have variance 1/2 each (u, v entries have variance 1/sqrt(2R)), so the pre-activation
            # has unit variance before the rare-id shrinkage; offsets c move the kinks off zero, w mixes the
            # units (random signs, variance 2/H each) to a total variance of about 1.
            a = extra.standard_normal((R, H)) / (2.0 * R) ** 0.25
            b = extra.standard_normal((R, H)) / (2.0 * R) ** 0.25
            c = 0.5 * extra.standard_normal(H)
            w = extra.standard_normal(H) * np.sqrt(2.0 / H)
            self._hidden[p] = (a, b, c, w)

    def _pair_terms(self, ids: np.ndarray, pair: tuple[int, int]) -> np.ndarray:
        """The bilinear and relu terms of one pair, per row."""
        a, b = pair
        ua, vb = self._factors[pair]
        u, v = ua[ids[:, a]], vb[ids[:, b]]
        out = self._pair_scale[pair] * (u * v).sum(1)
        if pair in self._hidden:
            wa, wb, c, w = self._hidden[pair]
            out = out + self._pair_hidden_scale[pair] * (np.maximum(u @ wa + v @ wb + c, 0.0) @ w)
        return out

    def _importance(self, g: dict) -> dict[str, float]:
        """Per sparse feature: std of its main effect plus half of each of its pairs' terms (rows of g)."""
        ids = g["sparse"]
        contrib = np.zeros((len(ids), self.num_sparse))
        for f in self.informative_idx:
            contrib[:, f] += self._effects[f][ids[:, f]]
        for pair in self.pairs:
            term = self._pair_terms(ids, pair)
            contrib[:, pair[0]] += term / 2
            contrib[:, pair[1]] += term / 2
        return {name: float(contrib[:, f].std()) for f, name in enumerate(self.sparse_names)}

    def _dense_term(self, z: np.ndarray) -> np.ndarray:
        cols = list(self._dense_cols) + [0, 0, 0]
        a, b, c = z[:, cols[0]], z[:, cols[1]], z[:, cols[2]]
        return np.tanh(a - 1.5) + 0.3 * (b - 1.0) ** 2 * (b > 1.0) - 0.5 * np.tanh(a * c / 8.0)

    def _logit(self, g: dict) -> np.ndarray:
        ids = g["sparse"]
        out = np.full(len(ids), self._bias)
        for f in self.informative_idx:
            out += self._effects[f][ids[:, f]]
        for pair in self.pairs:
            out += self._pair_terms(ids, pair)
        mean, std = self._dense_norm
        out += self.dense_scale * (g["dense_term_raw"] - mean) / std
        return out

    def _generate(self, n: int, seed_key: list[int]) -> dict:
        """n rows; every array has its own keyed generator, so a shorter n gives a prefix."""

        def rng(stream: int) -> np.random.Generator:
            return np.random.default_rng([*seed_key, stream])

        sparse = np.empty((n, self.num_sparse), np.int32)
        for f in range(self.num_sparse):
            ranks = np.searchsorted(self._cdf[f], rng(100 + f).random(n), side="right")
            np.minimum(ranks, self.cardinalities[f] - 1, out=ranks)
            sparse[:, f] = self._rank_to_id[f][ranks]
        shape = (n, self.num_dense)
        normal = rng(1).standard_normal(shape)
        raw = np.floor(np.exp(self._dense_mu + self._dense_sigma * normal) - 0.5).clip(0).astype(np.int64)
        raw[rng(2).random(shape) < self._dense_negative] = -1
        missing = rng(3).random(shape) < self._dense_missing
        dense = log1p_clamped(np.where(missing, 0, raw))
        g = {"sparse": sparse, "dense_raw": raw, "dense_missing": missing, "dense": dense}
        g["dense_term_raw"] = self._dense_term(dense.astype(np.float64))
        g["u"] = rng(4).random(n)
        return g

    def _chunks(self, split: str, n_rows: int):
        """The rows of ``split`` in fixed chunks: dict with label, prob, dense, sparse, dense_raw..."""
        for c, start in enumerate(range(0, n_rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, n_rows - start)
            g = self._generate(n, [self.seed, _SPLIT_CODE[split], c])
            prob = 1.0 / (1.0 + np.exp(-self._logit(g)))
            g["prob"] = prob.astype(np.float32)
            g["label"] = (g["u"] < g["prob"]).astype(np.uint8)
            yield g

    def sample(self, n_rows: int, split: str = "train") -> dict:
        """The first ``n_rows`` rows of ``split`` (exactly those written to the cache), in memory."""
        parts = list(self._chunks(split, n_rows))
        keys = ("label", "prob", "dense", "sparse", "dense_raw", "dense_missing")
        return {k: np.concatenate([p[k] for p in parts]) for k in keys}

    # --- outputs -------------------------------------------------------------------------------

    def write(self, out_dir: Path) -> dict:
        out_dir = Path(out_dir)
        writer = SplitWriter(out_dir, self.num_dense, self.num_sparse)
        oracle = {}
        try:
            for split in SPLITS:
                probs = NpyAppender(out_dir / f"{split}_prob.npy", np.float32)
                keep_for_auc = split != "train"
                p_all, y_all = [], []
                for g in self._chunks(split, self.rows[split]):
                    writer.append(split, g["dense"], g["sparse"], g["label"])
                    probs.append(g["prob"])
                    if keep_for_auc:
                        p_all.append(g["prob"])
                        y_all.append(g["label"])
                probs.close()
                if keep_for_auc and p_all:
                    oracle[split] = exact_auc(np.concatenate(p_all), np.concatenate(y_all))
        finally:
            rows, rates = writer.close()
        return meta_fields(
            dense_names=list(self.dense_names),
            sparse_names=list(self.sparse_names),
            table_sizes=list(self.cardinalities),
            rows=rows,
            source={"kind": "SyntheticCriteo", **self.options()},
            oracle_auc=oracle or None,
            noise_features=[self.sparse_names[i] for i in self.noise_idx],
            informative_features=[self.sparse_names[i] for i in self.informative_idx],
            feature_importance=dict(self.importance),
            label_rate=rates,
        )

    def write_tsv(self, path: str | Path, rows: int, split: str = "train") -> Path:
        """Write the first ``rows`` rows of ``split`` as raw Criteo TSV (label, ints, 8-hex ids).

        Missing dense values are empty; for some features the most frequent id is written empty;
        every other id is written as ``((id + 1) * odd multiplier) mod 2**32``, a bijection, so a
        parse of the file recovers the same rows up to a per-feature relabelling of the ids.
        """
        path = Path(path)
        with open(path, "wb") as f:
            f.writelines(self._tsv_bytes(g) for g in self._chunks(split, rows))
        return path

    def _tsv_bytes(self, g: dict) -> bytes:
        n = len(g["label"])
        cols = [pa.array(g["label"].astype(np.int64)).cast(pa.string())]
        for j in range(self.num_dense):
            cols.append(pa.array(g["dense_raw"][:, j], mask=g["dense_missing"][:, j]).cast(pa.string()))
        for f in range(self.num_sparse):
            ids = g["sparse"][:, f].astype(np.uint64)
            h = ((ids + np.uint64(1)) * self._hash_mult[f]) & np.uint64(0xFFFFFFFF)
            cols.append(
                _hex8(
                    h.astype(np.uint32),
                    g["sparse"][:, f] == self._rank_to_id[f][0]
                    if self._sparse_empty[f]
                    else np.zeros(n, bool),
                )
            )
        joined = pc.binary_join_element_wise(*cols, "\t", null_handling="replace", null_replacement="")
        lines = pc.binary_join_element_wise(joined, pa.scalar("", pa.string()), "\n")
        offsets = np.frombuffer(lines.buffers()[1], np.int32, count=n + 1, offset=lines.offset * 4)
        data = lines.buffers()[2]
        return data.to_pybytes()[offsets[0] : offsets[-1]]


def _hex8(values: np.ndarray, empty: np.ndarray) -> pa.Array:
    """uint32 -> 8 lower-case hex digits (null where ``empty``), vectorised."""
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    chars = digits[(values[:, None] >> shifts[None, :]) & np.uint32(15)]
    n = len(values)
    offsets = np.arange(0, 8 * n + 1, 8, dtype=np.int32)
    arr = pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(chars.tobytes()))
    if empty.any():
        arr = pc.if_else(pa.array(empty), pa.scalar(None, pa.string()), arr)
    return arr
