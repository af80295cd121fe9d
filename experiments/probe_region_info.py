"""How much of the target box survives each step of the untrained model's visual pathway: ridge-regression
(linear) probes from the ViT tokens, the Q-Former tokens and the LLM's final hidden state at `<boxes>` to
the ground-truth box of synthetic region records.

    python experiments/probe_region_info.py                                   # the default run's model
    python experiments/probe_region_info.py --set qformer.num_query_tokens=4 --set qformer.num_extra_query_tokens=4
    python experiments/probe_region_info.py --objects 1,2 --examples 2048

The model is random (no training). Each probe is fitted on the first 3/4 of the examples and scored on the
rest with the region metrics (Acc@0.5, mean IoU); the ridge strength is the best of a small grid, so the
numbers are optimistic upper bounds of what a linear read-out could get. "mean box" predicts the training
examples' mean box for every example. Prints one JSON line per feature.
"""

from __future__ import annotations

import argparse
import ast
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax.data.pipeline import DataConfig, make_train_iterator
from tpo_jax.data.synthetic import SyntheticConfig
from tpo_jax import config as C
from tpo_jax.model import TPOModel
from tpo_jax.train import metrics as M
from tpo_jax.train.run_config import tiny_train_model

RIDGE = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4)


@nnx.jit
def _forward(m: TPOModel, b: dict):
    vit, qformer = m.encode_visual(b["frames"], return_features=True)[::-1]
    out = m(b["input_ids"], attention_mask=b["attention_mask"], visual_mask=b["visual_mask"], frames=b["frames"],
            logits=False)
    return vit, qformer, out.hidden


def features(model: TPOModel, batch: dict) -> dict[str, np.ndarray]:
    """(B, F) features of each example: ViT tokens, Q-Former tokens (flattened), LLM hidden at `<boxes>`."""
    vit, qformer, hidden = jax.device_get(_forward(model, {k: jnp.asarray(v) for k, v in batch.items()}))
    rows = np.argmax(batch["input_ids"] == C.BOXES_ID, axis=1)
    n = len(rows)
    return {"vit tokens": vit.reshape(n, -1), "qformer tokens": qformer.reshape(n, -1),
            "llm hidden at <boxes>": hidden[np.arange(n), rows]}


def probe(x: np.ndarray, y: np.ndarray, n_train: int) -> tuple[float, dict]:
    """Best ridge probe x → y (fit on the first n_train rows); (lambda, test metrics)."""
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mu) / sd
    a, b = x[:n_train], y[:n_train] - y[:n_train].mean(0)
    best = None
    for lam in RIDGE:
        w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ b)
        m = score(x[n_train:] @ w + y[:n_train].mean(0), y[n_train:])
        if best is None or m["miou"] > best[1]["miou"]:
            best = (lam, m)
    return best


def score(pred: np.ndarray, target: np.ndarray) -> dict:
    m = M.rec_metrics(pred, target)
    return {"acc@0.5": round(m["acc@0.5"], 3), "miou": round(m["miou"], 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", action="append", default=[], help="model override, e.g. qformer.num_query_tokens=4")
    p.add_argument("--objects", default="1,1", help="objects per clip, an inclusive range lo,hi")
    p.add_argument("--examples", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg = tiny_train_model()
    if a.set:
        cfg = C.replace(cfg, **{k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in a.set)}).validate()
    lo, hi = (int(v) for v in a.objects.split(","))
    data = DataConfig(batch_size=64, seq_len=128, weights={"region": 1.0},
                      synthetic=SyntheticConfig(num_objects=(lo, hi)))
    it = make_train_iterator(data, cfg, "stage3")
    model = TPOModel(cfg, rngs=nnx.Rngs(a.seed))
    feats, boxes = [], []
    for _ in range(-(-a.examples // data.batch_size)):
        batch = next(it)
        feats.append(features(model, batch))
        boxes.append(batch["region_boxes"][:, 0])
    y = np.concatenate(boxes)
    n_train = 3 * len(y) // 4
    common = {"visual_tokens": cfg.num_visual_tokens, "objects": [lo, hi], "examples": len(y), "overrides": a.set}
    print(json.dumps({**common, "feature": "mean box", **score(np.broadcast_to(y[:n_train].mean(0), y[n_train:].shape),
                                                                 y[n_train:])}))
    for name in feats[0]:
        x = np.concatenate([f[name] for f in feats]).astype(np.float64)
        lam, m = probe(x, y, n_train)
        print(json.dumps({**common, "feature": name, "dims": x.shape[1], "ridge": lam, **m}))


if __name__ == "__main__":
    main()
