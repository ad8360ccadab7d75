"""`trainer.sharding` read against the model's tables: per-table types, the default, and the names."""

import pytest

pytest.importorskip("torchrec")
pytest.importorskip("fbgemm_gpu")

from umec_lightning.config import ConfigError  # noqa: E402
from umec_lightning.sharded.ebc import padded_width  # noqa: E402
from umec_lightning.sharded.plan import sharding_types  # noqa: E402

DATA = ["C1", "C2", "C3", "C4"]


def test_per_table_types_with_a_default():
    assert sharding_types({"default": "row_wise", "C2": "table_wise"}, DATA) == \
        {"C1": "row_wise", "C2": "table_wise", "C3": "row_wise", "C4": "row_wise"}
    assert sharding_types(None, ["C1"]) == {"C1": "table_wise"}


def test_a_table_compression_removed_is_ignored_an_unknown_one_refused():
    kept = ["C1", "C3"]  # the extracted model of a later stage: C2 and C4 are gone
    assert sharding_types({"C2": "row_wise", "C3": "column_wise"}, kept, DATA) == \
        {"C1": "table_wise", "C3": "column_wise"}
    with pytest.raises(ConfigError, match=r"trainer.sharding`: no table named C9"):
        sharding_types({"C9": "row_wise"}, kept, DATA)
    with pytest.raises(ConfigError, match=r"trainer.sharding.C3` must be one of"):
        sharding_types({"C3": "diagonal"}, kept, DATA)


def test_stored_widths_round_up_to_what_fbgemm_shards():
    assert [padded_width(d) for d in (1, 3, 4, 5, 8, 13)] == [4, 4, 4, 8, 8, 16]


def test_fused_table_optimizer_follows_optim_and_refuses_what_it_cannot_match():
    import functools

    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    from umec_lightning.sharded.plan import fused_params

    assert fused_params(None, 0.1) == {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}
    ada = fused_params(functools.partial(torch.optim.Adagrad, eps=1e-6), 0.05)
    assert ada == {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.05, "eps": 1e-6}
    for factory in (functools.partial(torch.optim.SGD, momentum=0.9), torch.optim.Adam,
                    functools.partial(torch.optim.Adagrad, lr_decay=0.1)):
        with pytest.raises(ValueError, match="plain SGD or plain Adagrad"):
            fused_params(factory, 0.1)
