"""Hostile-input fuzzing at scale (issue 26): the families of `tests/test_fuzz_inputs.py` (annotation parsers,
media decoders, RLE, the pipeline's per-record step) at thousands of seeded cases.

    JAX_PLATFORMS=cpu python benchmarks/bench_fuzz.py --cases 5000 [--families format:mc,rle] [--seed 0] [--json out.json]

`--cases` is per family. Prints, per family: cases, accepted, rejected with a project error (RecordError /
DataError, message naming the input), uncaught (foreign exceptions: must be 0), hangs (over the per-case time
limit), problems (a rejection not naming its input, an accepted result breaking an invariant), over-memory
cases, the largest tracemalloc peak of one case and the slowest case. Exit status 1 if any case is not ok.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the families live with their test

import test_fuzz_inputs as F  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=5000, help="cases per family")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", help="comma-separated family names (default: all)")
    p.add_argument("--json", help="write the per-family counts here")
    args = p.parse_args(argv)
    families = F.FAMILIES
    if args.families:
        wanted = args.families.split(",")
        unknown = sorted(set(wanted) - {f.name for f in families})
        if unknown:
            p.error(f"unknown families {unknown}; known: {[f.name for f in families]}")
        families = [f for f in families if f.name in wanted]
    print(f"# bench_fuzz: {args.cases} cases per family, seed {args.seed}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}")
    header = (f"{'family':22} {'cases':>6} {'accepted':>9} {'rejected':>9} {'uncaught':>9} {'hangs':>6} "
              f"{'problems':>9} {'over_mem':>9} {'max_peak_MiB':>13} {'max_case_s':>11} {'total_s':>8}")
    print(header)
    rows, failures, ok = [], [], True
    for fam in families:
        t0 = time.perf_counter()
        results = F.run_family(fam, args.cases, seed=args.seed)
        status = collections.Counter(r.status for _, r in results)
        row = {
            "family": fam.name, "cases": len(results),
            "accepted": sum(r.outcome.accepted for _, r in results if r.outcome),
            "rejected": sum(r.outcome.rejected for _, r in results if r.outcome),
            "uncaught": status["uncaught"], "hangs": status["hang"], "problems": status["problem"],
            "over_memory": status["over_memory"],
            "max_peak_mib": max(r.peak for _, r in results) / 2 ** 20,
            "max_case_s": max(r.seconds for _, r in results), "total_s": time.perf_counter() - t0,
        }
        rows.append(row)
        failures += [f"{fam.name}: {c.label}: {r.status}: {r.detail}" for c, r in results if r.status != "ok"]
        ok &= status["ok"] == len(results)
        print(f"{row['family']:22} {row['cases']:6d} {row['accepted']:9d} {row['rejected']:9d} {row['uncaught']:9d} "
              f"{row['hangs']:6d} {row['problems']:9d} {row['over_memory']:9d} {row['max_peak_mib']:13.2f} "
              f"{row['max_case_s']:11.3f} {row['total_s']:8.1f}", flush=True)
    total = {k: sum(r[k] for r in rows) for k in ("cases", "accepted", "rejected", "uncaught", "hangs", "problems",
                                                   "over_memory")}
    print(f"{'total':22} {total['cases']:6d} {total['accepted']:9d} {total['rejected']:9d} {total['uncaught']:9d} "
          f"{total['hangs']:6d} {total['problems']:9d} {total['over_memory']:9d}")
    for line in failures[:20]:
        print("FAIL", line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases_per_family": args.cases, "seed": args.seed, "families": rows, "total": total,
                       "failures": failures[:200]}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
