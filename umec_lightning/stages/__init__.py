"""The phases of a run as data: a mode lists its stages (`plan`), each kind is a function that returns its result
(`runners`), on trainers and fits built in one place (`training`), with the shared settings checked first
(`settings`) and `pretrained=` weights read in `pretrained`."""

from .plan import EARLY_STOPPING_KINDS, STAGE_KINDS, Stage, parse_stages, relative_budget, stage_budget
from .runners import STAGE_RUNNERS, StageInput, StageResult, run_stage, train_and_evaluate
from .training import RunContext, holdout_batches, make_module, measure_metrics

__all__ = ["EARLY_STOPPING_KINDS", "STAGE_KINDS", "STAGE_RUNNERS", "RunContext", "Stage", "StageInput",
           "StageResult", "holdout_batches", "make_module", "measure_metrics", "parse_stages", "relative_budget",
           "run_stage", "stage_budget", "train_and_evaluate"]
