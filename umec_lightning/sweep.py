"""Hydra multirun support: short member directory names, failed members that do not stop the sweep, and
an exit status that still says when one failed.

- ``${umec_member_dir:}`` (``hydra.sweep.subdir``): ``<job number>-<swept key>=<value>,...``, e.g.
  ``3-budget.flops=0.5,seed=1``. Only the keys the sweep varies are named (not every override, which is
  what made ``override_dirname`` exceed the 255-byte file name limit); a long value is shortened (a path
  to its last component) and the whole name is at most ``MAX_NAME`` characters (else truncated, with a
  hash of the full name). The job number alone keeps member names unique.
- :func:`run_member`: one member of a multirun. An error (bad input or a bug) is logged, written to
  ``<member dir>/failed.json`` and the member returns NaN, so the sweep goes on with the next member.
- :class:`SweepStatus` (a Hydra callback in ``hydra.callbacks``): at the end of a multirun in which a
  member failed, prints ``error: ...`` and exits 1. When the multirun starts, it drops the budgets of an
  experiment's sweep that the command line does not name if it names another (:func:`drop_unasked_budgets`).
- :func:`null_unasked_budgets`: the same rule for one run (train.py): a budget set by a config file (an
  experiment, an arm) is dropped when the run's overrides name another budget. A sweep over one resource
  compresses to that resource alone.

A key is *swept* when its value on the launching command line is a sweep (``a,b``, ``range()``,
``choice()``, ``glob()``, ...), as Hydra's own override parser decides, or when it is a key of
``hydra.sweeper.params``. The command line is the multirun's task overrides (recorded by
:class:`SweepStatus` when the multirun starts) or, where that callback did not run in this process
(a launcher that runs jobs in other processes), ``sys.argv``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("umec_lightning")

RESOLVER = "umec_member_dir"
MAX_NAME = 100   # characters in a member directory name (the file system allows 255 bytes)
MAX_VALUE = 32   # characters of one shortened value
FAILED = "failed.json"

# Keys swept by the multirun running in this process (set by SweepStatus.on_multirun_start).
_swept_keys: set[str] | None = None
# Members of this process's multirun refused their dir (another run's; `run_dir.RunDirError`): they write no
# failed.json into it, so the sweep's end counts them here (members in processes of their own only log it).
_refused: list[str] = []
SWEPT_ENV = "UMEC_SWEPT_KEYS"  # the swept keys, for members that run in processes of their own
BUDGET_KEYS = ("budget.flops", "budget.params", "budget.bytes")


def _digest(text: str, n: int) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def _parse(overrides: Iterable[str]) -> list:
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.append(parser.parse_override(str(text)))
        except Exception:  # not an override (e.g. a flag's value): Hydra would have refused a bad one
            continue
    return parsed


def swept_keys_of(overrides: Iterable[str]) -> set[str]:
    """Keys (as written: ``+key``, ``group@pkg``) whose value in ``overrides`` is a sweep."""
    return {o.get_key_element() for o in _parse(overrides) if o.is_sweep_override()}


def _argv_overrides() -> list[str]:
    return [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]


def short_value(value: str) -> str:
    """A path becomes its last component; anything longer than MAX_VALUE is cut, with a hash."""
    short = value
    if "/" in short:
        short = short.rstrip("/").rsplit("/", 1)[-1] or short.replace("/", "_")
    if len(short) > MAX_VALUE:
        short = f"{short[:MAX_VALUE - 7]}~{_digest(value, 6)}"
    return short


def member_name(num: Any, overrides: Iterable[str], swept: set[str]) -> str:
    """``<num>-<key>=<short value>,...`` for the swept keys of one job's ``overrides``, ≤ MAX_NAME chars."""
    parts = []
    for o in _parse(overrides):
        key = o.get_key_element()
        if key not in swept:
            continue
        value = "" if o.value() is None else short_value(o.get_value_element_as_str())
        parts.append(f"{key}={value}" if o.value() is not None else key)
    parts.sort()
    name = f"{num}-{','.join(parts)}" if parts else str(num)
    name = name.replace("/", "_").replace("\0", "")
    if len(name) > MAX_NAME:
        full = f"{num}-{','.join(sorted(map(str, overrides)))}"
        name = f"{name[:MAX_NAME - 9]}~{_digest(full, 8)}"
    return name


def current_swept_keys(hydra_cfg: DictConfig) -> set[str]:
    """The keys swept by the running multirun; ``hydra_cfg`` is a job's ``hydra`` node."""
    if _swept_keys is not None:
        swept = set(_swept_keys)
    else:
        # A launcher that runs members in other processes (submitit: local or SLURM) loses the sweep's command
        # line; `register_resolvers` left its swept keys in the environment those processes inherit.
        swept = swept_keys_of(_argv_overrides()) or {k for k in os.environ.get(SWEPT_ENV, "").split(",") if k}
    params = OmegaConf.select(hydra_cfg, "sweeper.params", default=None)
    if isinstance(params, DictConfig):
        swept |= {str(k) for k in params.keys()}
    return swept


def swept_overrides(overrides: Iterable[str], swept: set[str]) -> list[str]:
    """The overrides (as written) of the swept keys, or all of them if none is swept."""
    overrides = [str(o) for o in overrides]
    mine = [str(o.input_line) for o in _parse(overrides) if o.get_key_element() in swept]
    return mine or overrides


def budgets_named(overrides: Iterable[str]) -> set[str]:
    """The budget keys that ``overrides`` set (``budget.flops=0.5``, ``+budget.params=0.3``, ``budget.flops=null``;
    ``budget={...}`` sets both)."""
    named: set[str] = set()
    for o in _parse(overrides):
        if o.key_or_group == "budget":
            named.update(BUDGET_KEYS)
        elif o.key_or_group in BUDGET_KEYS and not o.is_delete():
            named.add(o.key_or_group)
    return named


def drop_unasked_budgets(config: DictConfig) -> list[str]:
    """Remove from a multirun's ``hydra.sweeper.params`` the budgets the command line does not name, when it names
    a budget; return the removed ``key=value`` items.

    An experiment's sweep sets its own budget (``budget.params: 0.5``); a command line that sweeps another
    resource (``-m experiment=frappe budget.flops=0.5``) means that resource alone, not both. Naming both keeps
    both (``budget.flops=0.5 budget.params=0.5``). ``config`` is the multirun's config before the sweeper is made
    (``SweepStatus.on_multirun_start``): its ``hydra.overrides.task`` is the command line, without the sweeper's
    params, which Hydra adds to each member's overrides later.
    """
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    named = budgets_named(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    if not named or not isinstance(params, DictConfig):
        return []
    unasked = [str(k) for k in params if str(k).lstrip("+") in BUDGET_KEYS and str(k).lstrip("+") not in named]
    dropped = [f"{k}={params[k]}" for k in unasked]
    with open_dict(params):
        for key in unasked:
            del params[key]
    if dropped:
        log.info("the sweep's %s dropped: the command line names %s (name both to keep both)",
                 " ".join(dropped), ", ".join(sorted(named)))
    return dropped


def null_unasked_budgets(cfg: DictConfig, overrides: Iterable[str]) -> list[str]:
    """Set to null the budgets of ``cfg`` that ``overrides`` (a run's ``hydra.overrides.task``) do not name, when
    they name a budget; return the dropped ``key=value`` items. Such a budget comes from a config file: the root
    config has none (``python train.py experiment=quickstart budget.params=0.5`` compresses to the params budget
    alone, not also to the experiment's ``budget.flops``)."""
    named = budgets_named(str(o) for o in overrides)
    if not named:
        return []
    dropped = []
    for key in BUDGET_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if key not in named and value is not None:
            OmegaConf.update(cfg, key, None)
            dropped.append(f"{key}={value}")
    if dropped:
        log.info("%s (from the config) dropped: the command line names %s (name both to keep both)",
                 " ".join(dropped), ", ".join(sorted(named)))
    return dropped


def _member_dir(*, _root_: DictConfig) -> str:
    num = OmegaConf.select(_root_, "hydra.job.num", default=0)
    overrides = OmegaConf.select(_root_, "hydra.overrides.task", default=None) or []
    return member_name(num, [str(o) for o in overrides], current_swept_keys(_root_.hydra))


def register_resolvers() -> None:
    """Register ``${umec_member_dir:}``; must run before Hydra composes the config (train.py does)."""
    OmegaConf.register_new_resolver(RESOLVER, _member_dir, replace=True)
    swept = swept_keys_of(_argv_overrides())
    if swept:
        os.environ[SWEPT_ENV] = ",".join(sorted(swept))


def run_member(run: Callable[[DictConfig, Path], dict], cfg: DictConfig, hydra_cfg: DictConfig,
               user_errors: tuple[type[BaseException], ...]) -> float:
    """Run one multirun member (``hydra_cfg``: its ``hydra`` node); return its validation AUC, or NaN
    (with ``failed.json``) if it failed."""
    from .run_dir import RunDirError

    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = [str(o) for o in OmegaConf.to_container(hydra_cfg.overrides.task)]
    failed = run_dir / FAILED
    try:
        summary = run(cfg, run_dir)
    except RunDirError as err:  # the dir is another run's (in use, or an earlier sweep's outputs): nothing is written
        swept = swept_overrides(overrides, current_swept_keys(hydra_cfg))
        _refused.append(run_dir.name)
        log.error("sweep member #%s (%s) refused: %s", hydra_cfg.job.num, " ".join(swept), err)
        return math.nan
    except Exception as err:  # noqa: BLE001 - a failed member must not stop the sweep
        from .io import write_json

        user_error = isinstance(err, user_errors)
        swept = swept_overrides(overrides, current_swept_keys(hydra_cfg))
        error = f"{type(err).__name__}: {err}"
        record = {"job": hydra_cfg.job.num, "swept": swept, "overrides": overrides, "error": error,
                  "user_error": user_error}
        if not user_error:
            record["traceback"] = traceback.format_exc()
        write_json(failed, record)
        log.error("sweep member #%s (%s) failed: %s [%s]", hydra_cfg.job.num, " ".join(swept), error,
                  failed, exc_info=not user_error)
        return math.nan
    return objective(summary)


def objective(summary: dict) -> float:
    """What a run returns to Hydra's sweeper: its validation AUC; NaN on a rank that evaluated nothing (under
    trainer=torchrec a quantized model is evaluated on rank 0 alone, the other ranks' summaries hold no metrics)."""
    value = summary.get("val_auc")
    return math.nan if value is None else float(value)


class SweepStatus(Callback):
    """At the start of a multirun, drop the experiment budgets the command line does not ask for
    (:func:`drop_unasked_budgets`); at its end, exit 1 if any member wrote ``failed.json``."""

    def __init__(self) -> None:
        self._start = 0.0
        self._sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _swept_keys
        self._start = time.time() - 1.0  # file times are coarser than time.time()
        # Resolving it now pins ${now:...} (cached) to the value the launcher will use.
        self._sweep_dir = Path(str(config.hydra.sweep.dir))
        task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
        _swept_keys = swept_keys_of(task)
        drop_unasked_budgets(config)  # Hydra makes the sweeper from this config after this hook

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _swept_keys
        _swept_keys = None
        if self._sweep_dir is None or not self._sweep_dir.is_dir():
            return
        failed = sorted({p.parent.name for p in self._sweep_dir.glob(f"*/{FAILED}") if p.stat().st_mtime >= self._start}
                        | set(_refused))
        _refused.clear()
        if failed:
            names = ", ".join(failed)
            log.error("%d sweep member(s) failed: %s", len(failed), names)
            print(f"error: {len(failed)} sweep member(s) failed: {names} (see {self._sweep_dir}/<member>/{FAILED})",
                  file=sys.stderr)
            sys.exit(1)  # SystemExit passes Hydra's callback error handling (it only catches Exception)
