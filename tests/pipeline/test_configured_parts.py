"""The parts of a Trainer the config builds by `_target_`: the Trainer's own arguments (`trainer`), the loggers
(`logger.<name>`) and extra callbacks (`callbacks.<name>`), each reaching a real run."""

from __future__ import annotations

import csv

import pytest

from umec_lightning.config import ConfigError
from umec_lightning.run import check_config, run

from .conftest import compose_cfg

DENSE = ["mode=dense", "phases.pretrain_epochs=1", "data.rows.train=4000", "data.rows.val=1000", "data.rows.test=1000"]


def _columns(path) -> list[str]:
    with open(path, newline="") as file:
        return next(csv.reader(file))


def test_a_configured_callback_and_trainer_argument_reach_every_fit(tmp_path, cache_dir):
    cfg = compose_cfg([*DENSE, "+callbacks.lr._target_=pytorch_lightning.callbacks.LearningRateMonitor",
                       "+callbacks.lr.logging_interval=step", "+trainer.max_time=00:01:00:00"], cache_dir)
    run(cfg, tmp_path)
    columns = _columns(tmp_path / "csv" / "metrics.csv")
    assert any(c.startswith("lr-SGD") for c in columns), columns  # LearningRateMonitor logged the optimizer's lr


def test_a_logger_set_to_null_is_off(tmp_path, cache_dir):
    run(compose_cfg([*DENSE, "logger.csv=null"], cache_dir), tmp_path)
    assert (tmp_path / "summary.json").exists() and not (tmp_path / "csv").exists()


@pytest.mark.parametrize("override, message", [
    ("+callbacks.bad._target_=torch.nn.Linear", "config key `callbacks.bad`"),
    ("+callbacks.bad._target_=pytorch_lightning.callbacks.NoSuchCallback", "config key `callbacks.bad`"),
    ("+callbacks.bad._target_=collections.OrderedDict", "config key `callbacks.bad._target_`"),
])
def test_a_bad_callback_is_a_one_line_error_before_work(tmp_path, cache_dir, override, message):
    cfg = compose_cfg([*DENSE, override], cache_dir)
    with pytest.raises(ConfigError, match=message.replace("`", ".").replace("(", r"\(")) as err:
        check_config(cfg)
    assert "\n" not in str(err.value)
