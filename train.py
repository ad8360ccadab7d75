"""Entry point: `python train.py [hydra overrides]`. Composes the config, runs the phases, returns the
test AUC (the value a Hydra sweeper would optimise)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

# W&B has no network here: offline unless the user says otherwise.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

log = logging.getLogger("umec_lightning")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from umec_lightning.errors import USER_ERRORS
    from umec_lightning.run import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, run_dir)
    except USER_ERRORS as err:
        # Bad input: one line naming what was wrong and where, no traceback wall.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return float(summary.get("test_auc", float("nan")))


if __name__ == "__main__":
    main()
