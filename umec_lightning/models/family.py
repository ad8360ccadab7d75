"""Model families behind one interface: a family is one module of `umec_lightning.models` (its structure as plain
data, its nn.Module, `FAMILY`) and one `conf/model/*.yaml` that names it (`family: <module>`, default `dlrm`).
The run, the stages, `compressed.pt` and `pretrained=` ask the family, never which one it is.

    FAMILY.name             the module's name, as `model.family` spells it
    FAMILY.config_schema    the dataclass (`schema.spec` fields) `config.validate_config` reads `model` with
    FAMILY.check_config(m)  the rules across its keys (m: the typed config), ConfigError naming the key
    FAMILY.dense_structure(model_cfg, meta)  the dense model of this data (ConfigError on a config that does not fit)
    FAMILY.build(structure, sparse_grad=, seed=, hold_tables=, init=)   the nn.Module
    FAMILY.structure_from_dict(d)   a structure back from `structure.to_dict()` (checkpoints, compressed.pt)

A family that compresses also gives the parts every group method works through (`compression.groups`,
`compression.resource`, `compression.extract` call them; their docstrings say the contracts, DLRM's are there):

    FAMILY.kinds            the group kinds it has (a subset of `compression.groups.KINDS`)
    FAMILY.offers           what its parts can do, against a method's `needs`: "groups" (group sets, resource
                            model, structure from masks, surgery by kept indices), "factorise" (surgery that takes
                            ranks and bases: the low-rank and mixed-dimension methods)
    FAMILY.group_sets(model, kinds, dim_block)            -> [GroupSet]
    FAMILY.resource_model(model, sets, device)            -> a `compression.resource.ResourceModel`
    FAMILY.kept_from_masks(model, sets, pruned)           -> Kept
    FAMILY.extracted_structure(model, kept, bases, factor_activation)   -> the structure `extract` builds
    FAMILY.extract(model, kept, bases, factor_activation) -> the physically smaller model
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass

from ..schema import ModelConfig, spec


class ModelFamily:
    name = "family"
    kinds: frozenset[str] = frozenset()
    offers: frozenset[str] = frozenset()
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

    # ---- compression parts (a family that offers "groups" overrides them) -------------------------------
    def _none(self, what: str):
        raise NotImplementedError(f"model family {self.name} has no {what} yet")

    def group_sets(self, model, kinds, dim_block: int = 1):
        self._none("group sets")

    def resource_model(self, model, sets, device=None):
        self._none("resource model")

    def kept_from_masks(self, model, sets, pruned):
        self._none("structure from masks")

    def extracted_structure(self, model, kept, bases=None, factor_activation=None):
        self._none("surgery")

    def extract(self, model, kept, bases=None, factor_activation=None):
        self._none("surgery")


@dataclass(kw_only=True)
class DeepModelConfig(ModelConfig):
    """The `model` keys every embedding + deep-network family shares: every family's and these (`schema.spec`
    fields; a family's config dataclass extends it with its own)."""

    family: str = spec(nonempty=True)
    deep: list[int] = spec([], gt=0)


class PartsFamily(ModelFamily):
    """A family whose compression parts are modules beside its own, found by name: `<name>_groups`
    (`<name>_group_sets`, `<name>_kept_from_masks`), `<name>_resources` (the class `resource_model_class`) and
    `<name>_surgery` (`<name>_extracted_structure`, `<name>_extract`, which take ranks and bases too). It offers the
    group methods and the factorising ones; as DLRM's, the group sets of a factorised model (projected tables or
    factored layers) are refused: factorising methods run as the last compress stage."""

    kinds = frozenset({"feature", "dim", "neuron"})
    offers = frozenset({"groups", "factorise"})
    resource_model_class: str

    def _part(self, module: str, attr: str):
        return getattr(importlib.import_module(f"umec_lightning.models.{self.name}_{module}"), attr)

    def group_sets(self, model, kinds, dim_block: int = 1):
        s = model.structure
        if s.table_ranks is not None:  # as `compression.groups.dlrm_group_sets`
            # A projected table's columns are factors, not its original dims, and R does not prune projections.
            raise ValueError("group sets of a model with projected (factorised) tables are not supported: "
                             "run factorising methods (mixed_dim) as the last compress stage")
        if s.layer_ranks is not None:
            # A factored layer has no single weight whose rows are its neurons' groups.
            raise ValueError("group sets of a model with factored (low-rank) Linear layers are not supported: "
                             "run factorising methods (lowrank) as the last compress stage")
        return self._part("groups", f"{self.name}_group_sets")(model, kinds, dim_block)

    def kept_from_masks(self, model, sets, pruned):
        return self._part("groups", f"{self.name}_kept_from_masks")(model, sets, pruned)

    def resource_model(self, model, sets, device=None):
        return self._part("resources", self.resource_model_class)(model, sets, device=device)

    def extracted_structure(self, model, kept, bases=None, factor_activation=None):
        return self._part("surgery", f"{self.name}_extracted_structure")(model, kept, bases, factor_activation)

    def extract(self, model, kept, bases=None, factor_activation=None):
        return self._part("surgery", f"{self.name}_extract")(model, kept, bases, factor_activation)


@contextmanager
def config_errors():
    """A ValueError raised while building a structure from `model` becomes a ConfigError naming the key (the
    message's own `config key ...`, else `model`)."""
    from ..config import ConfigError

    try:
        yield
    except ValueError as err:
        raise ConfigError(str(err) if "config key" in str(err) else f"config key `model`: {err}") from None


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


def family_of_model(model) -> ModelFamily:
    """The family of a built model (its structure's `family`; DLRM's is a class attribute)."""
    return family_named(getattr(model.structure, "family", "dlrm"))


def family_of_structure(d: dict) -> ModelFamily:
    """The family of a structure saved by `to_dict()` (a DLRM's has no `family` key)."""
    return family_named(d.get("family", "dlrm"))


def structure_from_dict(d: dict):
    return family_of_structure(d).structure_from_dict(d)
