"""Entry point: `python train.py [hydra overrides]`. Composes the config, runs the phases, returns the
**validation** AUC: the value a Hydra sweeper optimises (never the test AUC, which is held out for the final
report and must not steer a search; both are in each run's summary.json).

Single run: bad input (umec_lightning.errors.USER_ERRORS) prints one line `error: ...` and exits 2.
Multirun (`-m`): a member that fails (bad input or a bug) is logged, writes `<member dir>/failed.json` and
returns NaN; the sweep goes on, and at its end the process exits 1 if any member failed
(umec_lightning/sweep.py, the `hydra.callbacks.sweep_status` callback in conf/config.yaml).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from umec_lightning.sweep import null_unasked_budgets, objective, register_resolvers, run_member

# W&B has no network here: offline unless the user says otherwise.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

log = logging.getLogger("umec_lightning")

# ${umec_member_dir:} names multirun member directories (hydra.sweep.subdir): before Hydra composes.
register_resolvers()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from umec_lightning.errors import USER_ERRORS
    from umec_lightning.run import run

    hydra_cfg = HydraConfig.get()
    null_unasked_budgets(cfg, hydra_cfg.overrides.task)  # a command line naming a budget means it alone
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return run_member(run, cfg, hydra_cfg, USER_ERRORS)
    try:
        summary = run(cfg, Path(hydra_cfg.runtime.output_dir))
    except USER_ERRORS as err:
        # Bad input: one line naming what was wrong and where, no traceback wall.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return objective(summary)


if __name__ == "__main__":
    main()
