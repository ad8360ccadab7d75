"""mean_ablation_scores: the held-out loss change of holding a feature at its mean."""

import torch

from umec_lightning.compression.ablation import mean_ablation_scores
from umec_lightning.models import DLRM, dense_structure


def test_a_feature_the_label_depends_on_scores_above_one_it_does_not():
    """Train a tiny DLRM where the label is feature `a`'s id parity; `b` is noise. Holding `a` at its mean
    costs loss, holding `b` costs (about) nothing; the model is left as it was."""
    torch.manual_seed(0)
    s = dense_structure(sparse_names=["a", "b"], table_sizes=[10, 10], embedding_dim=4, bottom=[8, 4],
                        top=[8, 1], num_dense=2, interaction="cat")
    model = DLRM(s, sparse_grad=False, seed=0)
    g = torch.Generator().manual_seed(0)

    def batch(n=256):
        sparse = torch.randint(0, 10, (n, 2), generator=g)
        dense = torch.rand(n, 2, generator=g)
        return dense, sparse, (sparse[:, 0] % 2).float()

    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        dense, sparse, label = batch()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = [batch() for _ in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    scores = mean_ablation_scores(model, held_out)
    assert set(scores) == {"dense", "a", "b"}
    assert scores["a"] > 0.3 and abs(scores["b"]) < 0.05 and abs(scores["dense"]) < 0.05
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
