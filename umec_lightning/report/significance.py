"""Significance on the test rows: DeLong intervals and paired tests over the runs' per-row test predictions.

Every run writes the label and predicted probability of every test row (`umec_lightning/predictions.py`), for its
reported model, its dense pretrain point and the shared reference's control. The test split does not depend on
`seed` in this project (the data's own `data.seed` and split settings make it, and runs that differ in those are
separate rows of the table), so the runs of one row and their controls are scored on the *same* rows: their AUCs
are correlated through the rows, and DeLong's covariance (`delong.py`) takes that into account.

How the seeds are combined: over the n runs (seeds) of a row, the quantity is the seed-mean
    Δ̄ = (1/n) Σ_s [AUC(run_s) − AUC(control_s)],
a linear contrast of the 2n models' AUCs (the same model counted once with its summed weight when several runs
share a control). Its DeLong variance w S w^T, with S the covariance of all those AUCs on the shared rows, gives a
95 % interval and the two-sided p of Δ̄ = 0 (DeLong et al. 1988 test contrasts of correlated AUCs exactly so).
With one seed this is DeLong's paired test of the two models. This measures what the *test rows* make uncertain,
for these trained models; it says nothing of another seed's training, which the seed std measures. The report's
tie rule asks for both (markdown.py): a difference beyond the seed std of the per-seed differences *and* p < 0.05
on the test rows.

Paired only on the same rows: two predictions files are on the same rows when data fingerprint, split, row count
and labels agree (`Predictions.rows_key`). A run whose control's predictions are on other rows is left out of the
test (and counted in its note); if seeds were evaluated on different row sets (a data setting that makes the test
split per seed), each set's contrast is computed on its own rows and the sets are added as independent. A
comparison of two rows of the table (best per budget) is made only where each set of rows it touches holds both
sides with equal total weight, i.e. a paired comparison; otherwise none is made and the note says why.

AUCs here are exact (Mann–Whitney on the per-row probabilities); the table's `test AUC` is the summary's
`test_auc`, binned (`eval.auroc_bins`), so the two may differ in the fifth decimal.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..predictions import Predictions, read_predictions
from .delong import Contrast, contrast

ALPHA = 0.05  # two-sided level of the paired test in the tie rule


class PredictionStore:
    """Reads predictions files by path, keeping the last `keep` loaded (files of large test splits are large)."""

    def __init__(self, keep: int = 16):
        self.keep = keep
        self._cache: OrderedDict[Path, Predictions | str] = OrderedDict()

    def resolve(self, path: str | None, run_dir: Path | None) -> Path | None:
        """The file a summary names: the path itself, else a file of that name in the run's dir (a moved sweep)."""
        if not path:
            return None
        p = Path(path)
        if p.is_file():
            return p.resolve()
        if run_dir is not None and (run_dir / p.name).is_file():
            return (run_dir / p.name).resolve()
        return None

    def load(self, path: Path) -> Predictions | str:
        """The predictions, or a one-line reason why not (unreadable file)."""
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        try:
            value: Predictions | str = read_predictions(path)
        except ValueError as err:
            value = str(err)
        self._cache[path] = value
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return value


@dataclass
class RowTest:
    """A DeLong contrast over the runs of a row (None when none could be made), how many runs it used of how
    many, over how many distinct sets of test rows, and why runs were left out."""

    contrast: Contrast | None
    used: int
    total: int
    row_sets: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def significant(self) -> bool | None:
        return None if self.contrast is None else self.contrast.p < ALPHA


def _combine(weighted: dict[str, dict[Path, float]], preds: dict[Path, Predictions]) -> Contrast:
    """Σ over row sets of each set's DeLong contrast (independent rows: values and variances add)."""
    total = Contrast(0.0, 0.0)
    for weights in weighted.values():
        kept = [(p, w) for p, w in weights.items() if abs(w) > 1e-12]
        if not kept:
            continue
        labels = preds[kept[0][0]].label
        total = total + contrast(labels, [preds[p].prob for p, _ in kept], [w for _, w in kept])
    return total


def _get(store: PredictionStore, path: str | None, run_dir: Path | None, notes: Counter) -> Predictions | None:
    resolved = store.resolve(path, run_dir)
    if resolved is None:
        notes["no per-row test predictions"] += 1
        return None
    loaded = store.load(resolved)
    if isinstance(loaded, str):
        notes[f"unreadable predictions ({loaded})"] += 1
        return None
    positives = int(loaded.label.sum())
    if positives < 2 or len(loaded.label) - positives < 2:
        notes["fewer than 2 test rows of a class"] += 1
        return None
    return loaded


def _text(notes: Counter) -> list[str]:
    return [f"{n}× {what}" for what, n in notes.items()]


def mean_auc(runs, store: PredictionStore) -> RowTest:
    """The seed-mean exact AUC of the runs' reported models with its DeLong 95 % interval."""
    notes = Counter()
    found = [(p, r) for r in runs if (p := _get(store, r.summary.get("test_predictions"), r.path, notes))]
    if not found:
        return RowTest(None, 0, len(runs), 0, _text(notes))
    weighted: dict[str, dict[Path, float]] = defaultdict(lambda: defaultdict(float))
    preds = {}
    for p, _ in found:
        weighted[p.rows_key][p.path] += 1.0 / len(found)
        preds[p.path] = p
    return RowTest(_combine(weighted, preds), len(found), len(runs), len(weighted), _text(notes))


def versus_references(runs, refs, store: PredictionStore) -> RowTest | None:
    """The seed-mean exact ΔAUC of the runs against their references on the same rows, DeLong's contrast test;
    None when no run has a reference."""
    pairs, notes = [], Counter()
    total = sum(1 for ref in refs if ref is not None)
    if not total:
        return None
    for run, ref in zip(runs, refs):
        if ref is None:
            continue
        mine = _get(store, run.summary.get("test_predictions"), run.path, notes)
        theirs = _get(store, ref.predictions, ref.run_dir, notes) if mine is not None else None
        if mine is None or theirs is None:
            continue
        if mine.rows_key != theirs.rows_key:
            notes["run and control scored on different test rows"] += 1
            continue
        pairs.append((mine, theirs))
    if not pairs:
        return RowTest(None, 0, total, 0, _text(notes))
    weighted: dict[str, dict[Path, float]] = defaultdict(lambda: defaultdict(float))
    preds = {}
    for mine, theirs in pairs:
        weighted[mine.rows_key][mine.path] += 1.0 / len(pairs)
        weighted[mine.rows_key][theirs.path] -= 1.0 / len(pairs)
        preds[mine.path], preds[theirs.path] = mine, theirs
    return RowTest(_combine(weighted, preds), len(pairs), total, len(weighted), _text(notes))


def between(runs_a, runs_b, store: PredictionStore) -> RowTest:
    """Seed-mean exact AUC of runs_a minus that of runs_b, paired on the same rows (see the module docstring)."""
    notes = Counter()
    a = [p for r in runs_a if (p := _get(store, r.summary.get("test_predictions"), r.path, notes))]
    b = [p for r in runs_b if (p := _get(store, r.summary.get("test_predictions"), r.path, notes))]
    total = len(runs_a) + len(runs_b)
    if not a or not b:
        return RowTest(None, len(a) + len(b), total, 0, _text(notes))
    weighted: dict[str, dict[Path, float]] = defaultdict(lambda: defaultdict(float))
    balance: dict[str, float] = defaultdict(float)
    preds = {}
    for side, weight in ((a, 1.0 / len(a)), (b, -1.0 / len(b))):
        for p in side:
            weighted[p.rows_key][p.path] += weight
            balance[p.rows_key] += weight
            preds[p.path] = p
    if any(abs(v) > 1e-9 for v in balance.values()):
        return RowTest(None, len(a) + len(b), total, len(weighted),
                       [*_text(notes), "the two rows' runs were scored on different test rows: no paired test"])
    return RowTest(_combine(weighted, preds), len(a) + len(b), total, len(weighted), _text(notes))
