"""``${umec_data_name:PATH,NAME[,DEFAULT_PATH]}``: a data config's ``name`` that follows its file.

``data.name`` labels run directories (``run_name``), summaries and cache directories, so it should say
which data a run used. A data config writes::

    path: ${oc.env:CRITEO_KAGGLE,data/criteo/train.txt}
    name: ${umec_data_name:${.path},criteo_kaggle,${oc.env:CRITEO_KAGGLE,data/criteo/train.txt}}

and gets ``NAME`` while ``path`` is ``DEFAULT_PATH`` (the config's own file, compared after resolving
``..`` and symlinks; for a mapping of split files, its ``train`` file), and a name derived from the
path otherwise (``data.path=/d/avazu_small.csv.gz`` -> ``avazu_small``). Without ``DEFAULT_PATH`` the
name is always derived; ``NAME`` is the fallback when nothing can be derived. Setting ``data.name``
explicitly overrides all this.

Derived names: a file's stem without ``.gz``/``.csv``/``.tsv``/``.txt`` (a generic stem such as
``train`` gets its directory in front: ``/d/kaggle/train.txt`` -> ``kaggle_train``); a directory's
name; for a mapping of split files, the directory holding the train file (``/d/frappe/train.csv`` ->
``frappe``). Characters other than letters, digits, ``.``, ``_``, ``-`` become ``_``.

Registered on import of ``umec_lightning`` (this module is imported by its ``__init__``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

RESOLVER = "umec_data_name"
_SUFFIXES = (".gz", ".csv", ".tsv", ".txt")
_GENERIC = {"train", "training", "data", "dataset", "full", "all", "sample", "raw", "input"}


def _key_file(path) -> str:
    """The file that identifies ``path``: itself, or the train file of a mapping."""
    if isinstance(path, Mapping):
        return str(path.get("train", next(iter(path.values()), "")))
    return str(path)


def _abs(path: str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))


def same_path(a, b) -> bool:
    ka, kb = _key_file(a), _key_file(b)
    return ka == kb or os.path.realpath(_abs(ka)) == os.path.realpath(_abs(kb))


def _stem(p: Path) -> str:
    name = p.name
    for suffix in _SUFFIXES:  # a.csv.gz -> a.csv -> a
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def derive_name(path) -> str:
    """A name for ``path`` (a file, a directory or a mapping of split files); '' if none."""
    if isinstance(path, Mapping):
        p = _abs(_key_file(path))
        base = p.parent.name or _stem(p)
    else:
        p = _abs(str(path))
        if p.is_dir():
            base = p.name
        else:
            base = _stem(p)
            if base.lower() in _GENERIC and p.parent.name:
                base = f"{p.parent.name}_{base}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-")


def data_name(path, name, default_path=None) -> str:
    """The resolver: ``name`` while ``path`` is ``default_path``, else derived from ``path``."""
    if default_path is not None and same_path(path, default_path):
        return str(name)
    return derive_name(path) or str(name)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver(RESOLVER, data_name, replace=True)


register_resolvers()
