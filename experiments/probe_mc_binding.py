"""Can the tiny LLM learn letter-form multiple choice: bind each option's text to its letter and emit the
right letter?

Trains the default run's model from random weights on synthetic MC records only (stage-3 recipe, batch 16,
LR × 30) and reports letter accuracy (`mc/acc`, as `tpo-train` scores it) on 128 validation questions
every 100 steps. `--hint` appends the correct option's text to every question ("... Hint: Blue."), so
the model need not see the answer in the clip: only the text-to-letter binding is left to learn.
`--train-llm-base` also trains the LLM's base weights, input embeddings included, at `--llm-lr` (the
TPO stage-3 recipe keeps them frozen; this lifts that for the probe only). Uniform guessing scores ~0.35
on these questions.

    python experiments/probe_mc_binding.py --hint --train-llm-base --llm-lr 2e-3 --steps 1000
    python experiments/probe_mc_binding.py --train-llm-base --steps 1000 --objects 1 --set llm.num_layers=4

Measured numbers: docs/training.md, "How the default got here (MC)".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from tpo_jax.data.conversation import build_example, collate  # noqa: E402
from tpo_jax.data.pipeline import DataConfig, example_spec  # noqa: E402
from tpo_jax.data.synthetic import SyntheticConfig, SyntheticSource  # noqa: E402
from tpo_jax.data.video import load_media  # noqa: E402
from tpo_jax.model import TPOModel  # noqa: E402
from tpo_jax.tokenizer import MultimodalTokenizer  # noqa: E402
from tpo_jax.train import stages  # noqa: E402
from tpo_jax.train.evaluate import evaluate, make_predict_fn  # noqa: E402
from tpo_jax.train.optim import OptimConfig  # noqa: E402
from tpo_jax.overrides import apply_overrides  # noqa: E402
from tpo_jax.train.run_config import RunConfig, tiny_train_model  # noqa: E402
from tpo_jax.train.step import TrainConfig, init_train_state, make_train_step  # noqa: E402

BATCH = 16


def mc_examples(cfg, split: str, n: int, *, hint: bool, objects: int) -> list[dict]:
    spec = example_spec(DataConfig(seq_len=128), cfg)
    tok = MultimodalTokenizer(num_visual_tokens=spec.num_visual_tokens)
    source = SyntheticSource(SyntheticConfig(num_objects=(1, objects)), "mc", split)
    out = []
    for i in range(n):
        rec = source[i]
        if hint:
            rec = dataclasses.replace(rec, question=f"{rec.question} Hint: {rec.options[rec.mc_answer]}")
        out.append(build_example(rec, load_media(rec, spec.num_frames, spec.img_size), spec, tok))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--hint", action="store_true", help="state the correct option's text in the question")
    p.add_argument("--train-llm-base", action="store_true", help="train the LLM base weights too")
    p.add_argument("--llm-lr", type=float, default=0.03,
                   help="peak LR of the LLM base with --train-llm-base (0.03: what the first probes used)")
    p.add_argument("--lr-scale", type=float, default=30.0, help="multiplies the stage-3 recipe LRs")
    p.add_argument("--objects", type=int, default=2, help="1 to this many objects per clip")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="model config override, e.g. llm.num_layers=4")
    a = p.parse_args(argv)

    cfg = apply_overrides(RunConfig(model=tiny_train_model()), [f"model.{item}" for item in a.set]).model
    if a.train_llm_base:  # the probe only: the stage-3 recipe keeps the LLM base frozen
        r = stages.RECIPES["stage3"]
        stages.RECIPES["stage3"] = stages.StageRecipe("stage3", {**r.learning_rates, "llm": a.llm_lr / a.lr_scale,
                                                                     "llm_embed": a.llm_lr / a.lr_scale}, r.heads)

    train = mc_examples(cfg, "train", 3000, hint=a.hint, objects=a.objects)
    val = mc_examples(cfg, "validation", 128, hint=a.hint, objects=a.objects)
    val_batches = [collate(val[i:i + BATCH]) for i in range(0, len(val), BATCH)]

    tc = TrainConfig(stage="stage3", dropout=False, lm_rows=16,
                     optim=OptimConfig(total_steps=a.steps, warmup_ratio=0.1, lr_scale=a.lr_scale))
    graphdef, state, frozen, tx = init_train_state(TPOModel(cfg, rngs=nnx.Rngs(0)), tc)
    step = make_train_step(graphdef, tx, cfg, tc)
    full_graphdef, _ = nnx.split(nnx.merge(graphdef, state.params, frozen))
    predict_fn = make_predict_fn(full_graphdef)

    def letter_accuracy(state) -> float:
        full = nnx.split(nnx.merge(graphdef, state.params, frozen))[1]
        return evaluate(predict_fn, full, val_batches)["mc/acc"]

    print(f"{vars(a)}\nstep 0: mc/acc {letter_accuracy(state):.3f}", flush=True)
    rng, t0 = np.random.default_rng(0), time.time()
    for i in range(a.steps):
        batch = collate([train[j] for j in rng.choice(len(train), BATCH, replace=False)])
        state, m = step(state, frozen, batch, jax.random.key(i))
        if (i + 1) % 100 == 0:
            print(f"step {i + 1}: lm loss {float(m['loss/lm']):.3f}, mc/acc {letter_accuracy(state):.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
