import gzip
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from umec_lightning.data import CriteoTSV, LibFMText, SyntheticCriteo, TabularCSV, build_cache, load_meta  # registers
from umec_lightning.data.naming import data_name, derive_name

CONF_ROOT = Path(__file__).resolve().parents[2] / "conf"
CONF = CONF_ROOT / "data"


def _load(name):
    return OmegaConf.load(CONF / f"{name}.yaml")


def _compose(overrides):
    """The root config as train.py composes it (the ${umec_data_name:} resolver comes with umec_lightning)."""
    with initialize_config_dir(config_dir=str(CONF_ROOT), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_synthetic_config():
    src = instantiate(_load("synthetic"))
    assert isinstance(src, SyntheticCriteo) and src.num_noise == 6 and src.rows["train"] >= 500_000


def test_criteo_sample_config(sample_path, tmp_path, monkeypatch):
    monkeypatch.delenv("UMEC_SHARED", raising=False)
    monkeypatch.chdir(tmp_path)  # the relative default resolves against the project root
    src = instantiate(_load("criteo_sample"), progress=False)
    # like with like: ../shared may be a symlink, so resolve both sides
    assert isinstance(src, CriteoTSV) and src.path.resolve() == sample_path.resolve()
    assert src.name == "criteo_sample"
    assert load_meta(build_cache(src, tmp_path)).rows["train"] == 8572


@pytest.mark.parametrize(
    "name, cls",
    [
        ("criteo_kaggle", CriteoTSV),
        ("criteo_terabyte", CriteoTSV),
        ("tabular_example", TabularCSV),
        ("avazu", TabularCSV),
        ("avazu_x1", TabularCSV),
        ("criteo_x1", TabularCSV),
        ("frappe", LibFMText),
        ("frappe_x1", TabularCSV),
        ("movielens", TabularCSV),
        ("movielens_tag", LibFMText),
    ],
)
def test_other_configs_instantiate(name, cls):
    src = instantiate(_load(name))  # files need not exist until the cache is built
    assert isinstance(src, cls) and src.name == name  # the default path keeps the config's name


# --- data.name follows the file ---------------------------------------------------------------------


def test_name_follows_the_path(tmp_path, monkeypatch):
    monkeypatch.delenv("UMEC_SHARED", raising=False)
    cfg = _compose(["data=criteo_sample"])
    assert cfg.data.name == "criteo_sample" and cfg.run_name.endswith("-criteo_sample")
    cfg = _compose(["data=criteo_sample", "data.path=/data/kaggle/train.txt"])
    assert cfg.data.name == "kaggle_train" and cfg.run_name.endswith("-kaggle_train")
    cfg = _compose(["data=criteo_kaggle", "data.path=/d/day_0.gz"])
    assert cfg.data.name == "day_0"
    cfg = _compose(["data=criteo_sample", "data.path=/data/kaggle/train.txt", "data.name=mine"])
    assert cfg.data.name == "mine"
    cfg = _compose(["data=tabular_example", "data.path={train:/d/shop/a.csv,test:/d/shop/b.csv}"])
    assert cfg.data.name == "shop"
    assert _compose([]).data.name == "synthetic"
    # the same file spelled differently is still the config's own file
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    assert data_name("d/../x.csv", "own", "x.csv") == "own"
    assert data_name(str(tmp_path / "x.csv"), "own", "x.csv") == "own"
    assert data_name("y.csv", "own", "x.csv") == "y"
    assert derive_name("/a/b c/Data Set!.tsv.gz") == "Data_Set"
    assert derive_name(str(tmp_path / "d")) == "d"
    assert data_name("/", "fallback") == "fallback"


# --- example configs for public CTR layouts: composed, then built from a tiny file of each layout ----

AVAZU_COLUMNS = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
    "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21"
).split(",")
FRAPPE_COLUMNS = "label,user,item,daytime,weekday,isweekend,homework,cost,weather,country,city".split(",")
MOVIELENS_COLUMNS = "user_id,item_id,tag_id,label".split(",")
AVAZU_X1_COLUMNS = ["label", *(f"feat_{i}" for i in range(1, 23))]


def _value(col, i):
    if col in ("click", "label"):
        return str(i % 2)
    if col == "id":
        return str(10_000_000_000_000_000 + i)
    if col == "hour":
        return str(14102100 + i % 24)
    return f"{col[:3]}{i % 3:x}"


def _table(columns, n, offset=0):
    lines = [",".join(columns)] + [",".join(_value(c, offset + i) for c in columns) for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def _check_built(cfg, expect_categorical, rows):
    src = instantiate(cfg.data, progress=False)
    meta = load_meta(build_cache(src, cfg.loader.cache_root))
    assert meta.dense_names == [] and meta.sparse_names == expect_categorical
    assert meta.rows == rows
    assert all(size >= 1 for size in meta.table_sizes)
    return src, meta


def test_avazu_config(tmp_path):
    train = tmp_path / "train.gz"  # gzip'd, as Avazu ships it
    train.write_bytes(gzip.compress(_table(AVAZU_COLUMNS, 40)))
    cfg = _compose(["data=avazu", f"data.path='{train}'", f"loader.cache_root='{tmp_path / 'c'}'"])
    assert cfg.data.name == f"{tmp_path.name}_train"  # not the config's own default file
    expect = [c for c in AVAZU_COLUMNS if c not in ("id", "click", "hour")]
    assert len(expect) == 21
    _check_built(cfg, expect, {"train": 32, "val": 4, "test": 4})


@pytest.mark.parametrize("layout, columns", [("frappe_x1", FRAPPE_COLUMNS), ("movielens", MOVIELENS_COLUMNS),
                                             ("avazu_x1", AVAZU_X1_COLUMNS)])
def test_three_file_configs(tmp_path, monkeypatch, layout, columns):
    for name, n in (("train", 30), ("valid", 8), ("test", 5)):
        (tmp_path / f"{name}.csv").write_bytes(_table(columns, n))
    env = {"frappe_x1": "FRAPPE_DIR", "movielens": "MOVIELENS_DIR", "avazu_x1": "AVAZU_X1_DIR"}[layout]
    monkeypatch.setenv(env, str(tmp_path))
    cfg = _compose([f"data={layout}", f"loader.cache_root='{tmp_path / 'c'}'"])
    assert cfg.data.name == layout  # the config's own files (via its environment variable)
    expect = [c for c in columns if c != "label"]
    _check_built(cfg, expect, {"train": 30, "val": 8, "test": 5})
    # without the valid file, validation is carved from train.csv (val_fraction)
    cfg = _compose([f"data={layout}", "~data.path.val", f"loader.cache_root='{tmp_path / 'c'}'"])
    _check_built(cfg, expect, {"train": 27, "val": 3, "test": 5})
