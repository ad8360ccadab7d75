import pytest

from umec_lightning.models import DLRM, dense_structure

ALL = {"feature", "neuron", "dim", "pair"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (tests/conftest.py)."""


def tiny(interaction="dot", sizes=(10, 20, 30), bottom=(8, 4), top=(8, 1), self_interaction=False, seed=0):
    s = dense_structure(sparse_names=[f"C{i + 1}" for i in range(len(sizes))], table_sizes=list(sizes),
                        embedding_dim=bottom[-1], bottom=list(bottom), top=list(top), num_dense=3,
                        interaction=interaction, self_interaction=self_interaction)
    return DLRM(s, seed=seed)


def kinds_for(model):
    return ALL if model.structure.interaction == "dot" else ALL - {"pair"}
