"""Constants shared by the data tests."""

from pathlib import Path

# tests/data/common.py -> repo root is parents[2]; the shared folder sits next to the repo.
SAMPLE = Path(__file__).resolve().parents[2].parent / "shared/data/criteo/criteo_kaggle_head10k.tsv"
SMALL_ROWS = {"train": 20_000, "val": 5_000, "test": 5_000}
# small tables keep the generator cheap in tests that do not look at the default sizes
SMALL_CARDS = [3, 4, 10, 24, 50, 100, 300, 600, 1000, 2000, 5000, 20] * 2 + [7, 70]
