"""Multiple-choice accuracy of a trained run, broken down by question kind, letter form against cloze form.

Evaluates a work directory's checkpoint as `tpo-eval` does (synthetic validation split, the run's
`config.json`) and prints, per question kind (`tpo_jax.data.synthetic.CONVERSATION_KINDS`): the letter-form
accuracy (`mc/acc`), the cloze-form accuracy (`mc_cloze/acc`) and uniform guessing, then how often the
model emits each option letter next to how often each letter is right, and what always answering the
most common right letter would score. A letter accuracy far below cloze on a kind means the model
knows the answer but does not emit its letter; a letter histogram piled on one letter means it learned
the letter prior, not the binding.

    python experiments/mc_by_kind.py runs/tiny                 # the last stage's latest checkpoint
    python experiments/mc_by_kind.py runs/tiny --stage stage1

Measured numbers: docs/training.md, "Letter-form MC by question kind".
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from tpo_jax.data.synthetic import SyntheticSource, question_kind  # noqa: E402
from tpo_jax.data.templates import OPTION_LETTERS  # noqa: E402
from tpo_jax.train.metric_accumulator import MetricAccumulator  # noqa: E402
from tpo_jax.train.run_config import load_run_config  # noqa: E402
from tpo_jax.train.load import evaluate_checkpoint  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir")
    p.add_argument("--stage", default=None, help="stage1, stage2 or stage3 (default: the last one present)")
    p.add_argument("--init", action="store_true", help="the untrained model instead of a checkpoint")
    a = p.parse_args(argv)

    cfg = load_run_config(os.path.join(a.workdir, "config.json"))
    if cfg.data.source != "synthetic":
        raise SystemExit(f"{a.workdir}: question kinds exist for the synthetic dataset only, not {cfg.data.source!r}")
    acc = MetricAccumulator()
    out = evaluate_checkpoint(cfg, a.workdir, stage=a.stage, init=a.init, accumulator=acc)
    per_q = acc.mc_questions()
    letter, cloze = per_q["mc"], per_q["mc_cloze"]
    source = SyntheticSource(cfg.data.synthetic, "mc", "validation", cfg.data.seed)
    records = [source[i] for i in range(len(letter["answer"]))]
    # evaluation reads records 0, 1, 2, ... of the split; the synthetic source has no bad ones to skip
    if [r.mc_answer for r in records] != letter["answer"].tolist():
        raise SystemExit("the evaluated MC questions are not the validation records 0, 1, 2, ... of this config")

    print(f"{a.workdir}: {'init' if a.init else out['stage']} step {out['step']}, {len(records)} questions: "
          f"letter {letter['correct'].mean():.3f}, cloze {cloze['correct'].mean():.3f}")
    rows = collections.defaultdict(list)
    for r, lc, cc in zip(records, letter["correct"], cloze["correct"]):
        rows[question_kind(r.question)].append((lc, cc, 1.0 / len(r.options)))
    print(f"{'kind':9s} {'n':>4s} {'letter':>7s} {'cloze':>7s} {'chance':>7s}")
    for kind, v in sorted(rows.items()):
        v = np.asarray(v, np.float64)
        print(f"{kind:9s} {len(v):4d} {v[:, 0].mean():7.3f} {v[:, 1].mean():7.3f} {v[:, 2].mean():7.3f}")
    k = max(len(r.options) for r in records)
    emitted, right = np.bincount(letter["chosen"], minlength=k), np.bincount(letter["answer"], minlength=k)
    print("letter    " + " ".join(f"{c:>5s}" for c in OPTION_LETTERS[:k]))
    print("emitted   " + " ".join(f"{n:5d}" for n in emitted))
    print("right     " + " ".join(f"{n:5d}" for n in right))
    print(f"always {OPTION_LETTERS[int(np.argmax(right))]!r}: {right.max() / len(records):.3f}")


if __name__ == "__main__":
    main()
