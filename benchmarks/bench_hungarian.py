"""Our in-graph Hungarian matcher (`tpo_jax.heads.hungarian`) vs `optax.assignment.hungarian_algorithm`.

    python benchmarks/bench_hungarian.py                       # agreement, matcher timings, tiny stage-3 step
    python benchmarks/bench_hungarian.py --no-step --runs 200  # matcher only

1. Agreement (CG-DETR's use: `match_targets(cost (Q, G), target_valid (G,))`, batched with jit + vmap). For each
   (Q, G) and cost kind it draws `--problems` matrices with a random number of valid targets (padded targets get
   garbage costs, as in the loss), and compares the query chosen for every valid target by ours, by optax (wrapped
   with the same validity handling: padded target rows set to 0, then the (target → query) pairs scattered into a
   (G,) query index) and by scipy.optimize.linear_sum_assignment on the valid sub-matrix. Kinds: `normal`
   (continuous, unique optimum), `detr` (the §6.5 cost 10·L1 − GIoU − 4·p_fg from random spans and logits) and
   `ties` (integers 0..3: many optima; there only the total cost is comparable, so the line reports how often the
   assignment equals scipy's and whether the cost is optimal).
2. Matcher time: jit(vmap(matcher)) on (N, Q, G) with masks, median over `--runs` calls after warm-up, the two
   matchers called alternately (the machine is shared; alternation spreads the noise evenly). N = B·dec_layers
   problems per step: tiny (B 8 × 3 layers, Q 4, G 2) and 7B-like (B 8 × 3 layers, Q 10, G 4; and Q 10, G 10).
3. Step time (unless --no-step): the tiny stage-3 `train_step` (benchmarks/bench_train_step.py's setup) built
   twice, once with each matcher patched in as `hungarian.match_targets`, timed alternately.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

# same XLA:CPU setting as bench_train_step.py (classic fusion emitters: faster compile and step on CPU)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment as scipy_lsa

from tpo_jax.heads import hungarian
from tpo_jax.heads.box_ops import pairwise_l1, pairwise_span_giou, span_cw_to_xx

ours_match = hungarian.match_targets


def optax_match(cost, target_valid=None):
    """`match_targets` semantics on top of optax.assignment.hungarian_algorithm: (Q, G) cost → (G,) query index."""
    cost = jax.lax.stop_gradient(jnp.asarray(cost)).astype(jnp.float32)
    q, g = cost.shape
    c = cost.T                                                 # (G, Q): every target gets a query
    if target_valid is not None:
        c = jnp.where(jnp.asarray(target_valid, bool)[:, None], c, 0.0)
    rows, cols = optax.assignment.hungarian_algorithm(c)      # pairs (target, query), G of them
    return jnp.zeros((g,), jnp.int32).at[rows].set(cols.astype(jnp.int32))


def make_problems(kind, n, q, g, rng):
    """(costs (n, Q, G) float32, valid (n, G) bool) with 1..G valid targets each."""
    if kind == "normal":
        costs = rng.normal(size=(n, q, g)).astype(np.float32)
    elif kind == "ties":
        costs = rng.integers(0, 4, size=(n, q, g)).astype(np.float32)
    else:  # detr
        pred = np.concatenate([rng.uniform(0.05, 0.95, (n, q, 1)), rng.uniform(0.02, 0.6, (n, q, 1))], -1)
        tgt = np.concatenate([rng.uniform(0.1, 0.9, (n, g, 1)), rng.uniform(0.05, 0.5, (n, g, 1))], -1)
        logits = rng.normal(size=(n, q, 2))

        def cost(p, lg, t):
            prob_fg = jax.nn.softmax(lg, axis=-1)[:, 0]
            return (10.0 * pairwise_l1(p, t) - pairwise_span_giou(span_cw_to_xx(p), span_cw_to_xx(t))
                    - 4.0 * prob_fg[:, None])
        costs = np.asarray(jax.jit(jax.vmap(cost))(*(jnp.asarray(a, jnp.float32) for a in (pred, logits, tgt))))
    n_valid = rng.integers(1, g + 1, size=n)
    valid = np.arange(g)[None, :] < n_valid[:, None]
    costs = np.where(valid[:, None, :], costs, np.float32(-1e3))  # tempting garbage in padded targets
    return costs.astype(np.float32), valid


def agreement(q, g, kind, n, seed):
    rng = np.random.default_rng(seed)
    costs, valid = make_problems(kind, n, q, g, rng)
    got = {name: np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(costs), jnp.asarray(valid)))
           for name, fn in (("ours", ours_match), ("optax", optax_match))}
    same = {"ours_vs_scipy": 0, "optax_vs_scipy": 0, "ours_vs_optax": 0}
    optimal = {"ours": 0, "optax": 0}
    distinct = {"ours": 0, "optax": 0}
    for i in range(n):
        nv = int(valid[i].sum())
        c = costs[i, :, :nv].astype(np.float64)
        sr, sc = scipy_lsa(c)                                  # query sr[k] -> target sc[k]
        ref = np.empty(nv, np.int64)
        ref[sc] = sr
        best = c[sr, sc].sum()
        for name, qi in got.items():
            qi = qi[i]
            distinct[name] += int(len(set(qi.tolist())) == g)
            optimal[name] += int(abs(c[qi[:nv], np.arange(nv)].sum() - best) <= 1e-5 * max(1.0, abs(best)))
            same[f"{name}_vs_scipy"] += int(np.array_equal(qi[:nv], ref))
        same["ours_vs_optax"] += int(np.array_equal(got["ours"][i][:nv], got["optax"][i][:nv]))
    return {"bench": "hungarian_agreement", "Q": q, "G": g, "kind": kind, "problems": n,
            "same_assignment": same, "optimal_cost": optimal, "distinct_queries": distinct}


def time_alternating(fns, args, runs):
    """Median seconds per call of each jitted fn, calls interleaved; also the first-call (compile) time."""
    compile_s = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        compile_s[name] = time.perf_counter() - t0
    for _ in range(3):
        for fn in fns.values():
            jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, compile_s


def matcher_timing(label, n, q, g, runs, seed):
    rng = np.random.default_rng(seed)
    costs, valid = make_problems("detr", n, q, g, rng)
    args = (jnp.asarray(costs), jnp.asarray(valid))
    fns = {"ours": jax.jit(jax.vmap(ours_match)), "optax": jax.jit(jax.vmap(optax_match))}
    med, comp = time_alternating(fns, args, runs)
    return {"bench": "hungarian_time", "shape": label, "problems": n, "Q": q, "G": g, "runs": runs,
            "median_us": {k: round(v * 1e6, 1) for k, v in med.items()},
            "optax_over_ours": round(med["optax"] / med["ours"], 3),
            "first_call_s": {k: round(v, 2) for k, v in comp.items()}}


def step_timing(steps, batch_size):
    from flax import nnx

    from tpo_jax import config as C
    from tpo_jax.data.synthetic import synthetic_batch
    from tpo_jax.model import TPOModel
    from tpo_jax.train.step import TrainConfig, init_train_state, make_train_step

    cfg = C.get_config("tiny")
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, batch_size, seq_len=64).items()}
    train_cfg = TrainConfig(stage="stage3")
    runs, compile_s, losses = {}, {}, {}
    for name, matcher in (("ours", ours_match), ("optax", optax_match)):
        hungarian.match_targets = matcher                      # read at trace time by the temporal loss
        try:
            graphdef, state, frozen, tx = init_train_state(TPOModel(cfg, rngs=nnx.Rngs(0)), train_cfg)
            step = make_train_step(graphdef, tx, cfg, train_cfg)
            t0 = time.perf_counter()
            state, metrics = step(state, frozen, batch, jax.random.key(0))
            jax.block_until_ready(metrics)
            compile_s[name] = time.perf_counter() - t0
            losses[name] = float(metrics["loss/total"])
        finally:
            hungarian.match_targets = ours_match
        runs[name] = [step, state, frozen]
    times = {name: [] for name in runs}
    for i in range(2 + steps):
        for name, r in runs.items():
            step, state, frozen = r
            t0 = time.perf_counter()
            state, metrics = step(state, frozen, batch, jax.random.key(i + 1))
            jax.block_until_ready(metrics)
            r[1] = state
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"bench": "hungarian_train_step", "config": "tiny", "stage": "stage3", "batch": batch_size,
            "steps": steps, "median_step_s": {k: round(v, 4) for k, v in med.items()},
            "optax_over_ours": round(med["optax"] / med["ours"], 3),
            "first_step_loss": {k: round(v, 6) for k, v in losses.items()},
            "compile_s": {k: round(v, 1) for k, v in compile_s.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=500, help="matrices per (shape, kind) in the agreement check")
    p.add_argument("--runs", type=int, default=300, help="timed calls per matcher (after warm-up)")
    p.add_argument("--steps", type=int, default=20, help="timed train steps per matcher")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--no-step", action="store_true", help="skip the tiny stage-3 train-step timing")
    args = p.parse_args()
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
               "jax": jax.__version__, "optax": optax.__version__, "xla_flags": os.environ["XLA_FLAGS"]}
    print(json.dumps({"bench": "hungarian_machine", **machine}), flush=True)
    for i, (q, g) in enumerate([(4, 2), (10, 4), (10, 10), (10, 1)]):
        for j, kind in enumerate(("normal", "detr", "ties")):
            print(json.dumps(agreement(q, g, kind, args.problems, seed=100 * i + j)), flush=True)
    layers = 3  # dec_layers: the main layer + 2 aux layers, each with its own matching
    for label, q, g in (("tiny", 4, 2), ("7b", 10, 4), ("7b_full_targets", 10, 10)):
        print(json.dumps(matcher_timing(label, args.batch * layers, q, g, args.runs, seed=7)), flush=True)
    if not args.no_step:
        print(json.dumps(step_timing(args.steps, args.batch)), flush=True)


if __name__ == "__main__":
    main()
