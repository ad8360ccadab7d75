"""Model families behind one interface: a family is one module of `umec_lightning.models` (its structure as plain
data, its nn.Module, `FAMILY`) and one `conf/model/*.yaml` that names it (`family: <module>`, default `dlrm`).
The run, the stages, `compressed.pt` and `pretrained=` ask the family, never which one it is.

    FAMILY.name             the module's name, as `model.family` spells it
    FAMILY.config_schema    the dataclass (`schema.spec` fields) `config.validate_config` reads `model` with
    FAMILY.check_config(m)  the rules across its keys (m: the typed config), ConfigError naming the key
    FAMILY.dense_structure(model_cfg, meta)  the dense model of this data (ConfigError on a config that does not fit)
    FAMILY.build(structure, sparse_grad=, seed=, hold_tables=, init=)   the nn.Module
    FAMILY.structure_from_dict(d)   a structure back from `structure.to_dict()` (checkpoints, compressed.pt)
    FAMILY.compressible     whether the compression methods know its groups, resources and surgery yet
"""

from __future__ import annotations

import importlib


class ModelFamily:
    name = "family"
    compressible = False
    config_schema: type
    structure_type: type
    model_type: type

    def check_config(self, model) -> None:
        pass

    def dense_structure(self, model_cfg, meta):
        raise NotImplementedError

    def build(self, structure, **kwargs):
        return self.model_type(structure, **kwargs)

    def structure_from_dict(self, d: dict):
        return self.structure_type.from_dict(d)


def family_named(name: str) -> ModelFamily:
    """The family of module `umec_lightning.models.<name>`; ValueError naming `model.family` when there is none."""
    try:
        module = importlib.import_module(f"umec_lightning.models.{name}")
    except ModuleNotFoundError:
        module = None
    family = getattr(module, "FAMILY", None)
    if not isinstance(family, ModelFamily):
        raise ValueError(f"config key `model.family`: no model family {name!r} (a module umec_lightning/models/"
                         f"{name}.py with a FAMILY)")
    return family


def family_of(model_cfg) -> ModelFamily:
    """The family a model config names (`model.family`, default dlrm)."""
    return family_named(str(model_cfg.get("family", "dlrm") or "dlrm"))


def family_of_structure(d: dict) -> ModelFamily:
    """The family of a structure saved by `to_dict()` (a DLRM's has no `family` key)."""
    return family_named(d.get("family", "dlrm"))


def structure_from_dict(d: dict):
    return family_of_structure(d).structure_from_dict(d)
