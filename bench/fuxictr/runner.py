"""One FuxiCTR 2.3.10 DLRM run: build (once, cached) the feature map + npz of a CSV dataset, train with
FuxiCTR's BaseModel.fit (its early stopping / lr decay / best checkpoint), evaluate, append a JSON line.

    FUXICTR_DLRM=<dir holding DLRM.py> <fuxictr venv>/bin/python bench/fuxictr/runner.py --data DIR \
        --dataset criteo|frappe --config bars|ours --seed 0 --out results.jsonl

Runs in FuxiCTR's own venv (bench/vs_fuxictr.py says how to make it), never in this project's. DLRM class:
model_zoo/DLRM/src/DLRM.py of reczoo/FuxiCTR (not in the pip package; Apache-2.0, not copied into this
repository): put that file in a folder of its own and point FUXICTR_DLRM at the folder.
Data loading: FuxiCTR's FeatureProcessor (fit on train, min_categr_count 1) + NpzDataLoader (num_workers 0);
the Ray-based build_dataset/ParquetDataLoader of 2.3.10 are bypassed (2 cores, no Ray cluster).
"""
import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

torch.set_num_threads(1)
# Each model_zoo model's folder on the path (FUXICTR_DLRM, FUXICTR_DCNV2, FUXICTR_DEEPFM: a folder holding DLRM.py,
# DCNv2.py or DeepFM.py of FuxiCTR's model_zoo at commit 0245987; the pip package ships no model zoo).
for _var in ("FUXICTR_DLRM", "FUXICTR_DCNV2", "FUXICTR_DEEPFM"):
    if os.environ.get(_var):
        sys.path.insert(0, os.environ[_var])
import fuxictr  # noqa: E402 - after the thread settings and the model folders on the path
from DLRM import DLRM  # noqa: E402
from fuxictr.features import FeatureMap  # noqa: E402
from fuxictr.preprocess import FeatureProcessor  # noqa: E402
from fuxictr.pytorch.dataloaders.npz_dataloader import NpzDataLoader  # noqa: E402
from fuxictr.pytorch.torch_utils import seed_everything  # noqa: E402

DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = {"criteo": [f"C{i}" for i in range(1, 27)],
          "frappe": ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather",
                     "country", "city"]}

# BARS (reczoo/BARS ranking/ctr/DLRM/DLRM_{frappe,criteo}_x1/*.log, the tuned best run of each).
CONFIGS = {
    ("bars", "frappe"): dict(embedding_dim=10, top_mlp_units=[400, 400, 400], bottom_mlp_units=None,
                             top_mlp_dropout=0.4, bottom_mlp_dropout=0, batch_norm=True, interaction_op="cat",
                             embedding_regularizer=0.1, net_regularizer=0, batch_size=4096),
    ("bars", "criteo"): dict(embedding_dim=10, top_mlp_units=[400, 400, 400], bottom_mlp_units=[400, 400, 400],
                             top_mlp_dropout=0.2, bottom_mlp_dropout=0, batch_norm=True, interaction_op="dot",
                             embedding_regularizer=1e-5, net_regularizer=0, batch_size=4096),
    # "ours-like": no dropout / BN / regularizer, batch 1024, dot interaction.
    ("ours", "frappe"): dict(embedding_dim=10, top_mlp_units=[512, 256], bottom_mlp_units=None,
                             top_mlp_dropout=0, bottom_mlp_dropout=0, batch_norm=False, interaction_op="dot",
                             embedding_regularizer=0, net_regularizer=0, batch_size=1024),
    ("ours", "criteo"): dict(embedding_dim=10, top_mlp_units=[512, 256], bottom_mlp_units=[512, 256, 64],
                             top_mlp_dropout=0, bottom_mlp_dropout=0, batch_norm=False, interaction_op="dot",
                             embedding_regularizer=0, net_regularizer=0, batch_size=1024),
}
# DCNv2 and DeepFM as this project's shipped configs run under the BARS recipe (the dense controls of
# docs/results_families.md): 10-dim tables, a 400-400-400 deep network with batch norm, no dropout or regularizer,
# batch 1024; DCNv2 with 3 full-rank cross layers, parallel. FuxiCTR embeds each numeric feature as value x vector
# (ours feeds the raw values into x0): the one difference of model.
OTHER_MODELS = {
    ("DCNv2", "ours"): dict(embedding_dim=10, model_structure="parallel", use_low_rank_mixture=False,
                            num_cross_layers=3, parallel_dnn_hidden_units=[400, 400, 400], dnn_activations="relu",
                            net_dropout=0, batch_norm=True, embedding_regularizer=0, net_regularizer=0,
                            batch_size=1024),
    ("DeepFM", "ours"): dict(embedding_dim=10, hidden_units=[400, 400, 400], hidden_activations="relu", net_dropout=0,
                             batch_norm=True, embedding_regularizer=0, net_regularizer=0, batch_size=1024),
}
COMMON = dict(learning_rate=1e-3, optimizer="adam", loss="binary_crossentropy", metrics=["logloss", "AUC"],
              task="binary_classification", monitor="AUC", monitor_mode="max", early_stop_patience=2,
              save_best_only=True, verbose=0, gpu=-1)


class DLRM2D(DLRM):
    """DLRM whose numeric inputs are (B, 1): FuxiCTR's loaders yield (B,) per scalar column, and the
    model_zoo DLRM concatenates them on dim -1, which flattens the batch (see report)."""

    def get_inputs(self, inputs, feature_source=None):
        X = super().get_inputs(inputs, feature_source)
        return {k: (v.float().view(-1, 1) if k in self.dense_feats else v) for k, v in X.items()}


def build(data: Path, dataset: str, work: Path) -> FeatureMap:
    dataset_id = f"{dataset}_{data.name}"
    ddir = work / dataset_id
    cols = [dict(name=SPARSE[dataset], active=True, dtype="str", type="categorical")]
    if dataset == "criteo":
        cols.insert(0, dict(name=DENSE, active=True, dtype="float", type="numeric"))
    if not (ddir / "feature_map.json").exists():
        fp = FeatureProcessor(feature_cols=cols, label_col=dict(name="label", dtype="float"),
                              dataset_id=dataset_id, data_root=str(work))
        splits = {s: fp.preprocess(fp.read_data(str(data / f"{s}.csv"))) for s in ("train", "valid", "test")}
        fp.fit(splits["train"], rebuild_dataset=True, min_categr_count=1)
        for s, ddf in splits.items():
            df = ddf.collect()
            batch = fp.transform({c: df[c].to_numpy() for c in df.columns})
            np.savez(ddir / f"{s}.npz", **{k: np.asarray(v) for k, v in batch.items()})
    fmap = FeatureMap(dataset_id, str(ddir))
    fmap.load(str(ddir / "feature_map.json"), {})
    return fmap


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--dataset", choices=["criteo", "frappe"], required=True)
    ap.add_argument("--config", choices=["bars", "ours"], required=True)
    ap.add_argument("--model", choices=["DLRM", "DCNv2", "DeepFM"], default="DLRM")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results.jsonl")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    fmap = build(args.data.resolve(), args.dataset, args.work)
    if args.model == "DLRM":
        cfg = dict(CONFIGS[(args.config, args.dataset)])
        if cfg["bottom_mlp_units"] is None:
            cfg["bottom_mlp_units"] = []
        model_class = DLRM2D
    else:
        cfg = dict(OTHER_MODELS[(args.model, args.config)])
        model_class = getattr(__import__(args.model), args.model)
    batch_size = cfg.pop("batch_size")
    fmap.default_emb_dim = cfg["embedding_dim"]  # what the model zoo's sum_emb_out_dim reads (load got no params)
    model_id = f"{args.model}_{args.dataset}_{args.config}_s{args.seed}"
    seed_everything(args.seed)
    (args.work / "checkpoints" / fmap.dataset_id).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = model_class(fmap, model_id=model_id, model_root=str(args.work / "checkpoints"), **COMMON, **cfg)
    ddir = Path(fmap.data_dir)

    def loader(split: str, shuffle: bool):
        return NpzDataLoader(fmap, str(ddir / f"{split}.npz"), batch_size=batch_size, shuffle=shuffle,
                             num_workers=0)

    train_gen, valid_gen, test_gen = loader("train", True), loader("valid", False), loader("test", False)
    epochs_run = []
    orig = model.train_epoch
    model.train_epoch = lambda gen: (epochs_run.append(1), orig(gen))[1]
    model.fit(train_gen, epochs=args.epochs, validation_data=valid_gen)
    fit_s = time.perf_counter() - t0
    val = model.evaluate(valid_gen)
    test = model.evaluate(test_gen)
    wall = time.perf_counter() - t0
    rec = dict(dataset=args.dataset, data=str(args.data), model=args.model, config=args.config, seed=args.seed,
               test_auc=test["AUC"], test_logloss=test["logloss"], val_auc=val["AUC"], val_logloss=val["logloss"],
               epochs_run=len(epochs_run), max_epochs=args.epochs, fit_s=round(fit_s, 2), wall_s=round(wall, 2),
               final_lr=model.optimizer.param_groups[0]["lr"], params=sum(p.numel() for p in model.parameters()),
               batch_size=batch_size, fuxictr=fuxictr.__version__, torch=torch.__version__,
               threads=torch.get_num_threads(), **{k: v for k, v in cfg.items()})
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
