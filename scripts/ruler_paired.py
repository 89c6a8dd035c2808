"""Two RULER columns compared on the same samples, with a paired bootstrap interval.

Issue 20's comparisons (KVCrush on top of a policy against the policy alone, query-aware
against query-agnostic) are between columns of 20 samples per task, where one sample of one
task moves the 6-task average by about 1.5% of the full cache. This script says how large a
difference is against that noise::

    python scripts/ruler_paired.py \\
        docs/results/X/M.results.jsonl:kvzap:0.25 \\
        docs/results/Y/M.results.jsonl:kvzap+kvcrush-share10:0.25

Each side is ``RESULTS:METHOD:BUDGET`` (a results.jsonl of ``kvcrush-ov eval``, or of
``eval-report``; the budget as written there). Samples are paired by (task, index) and must
be the same samples (their per-sample seeds equal). Both sides are given as % of their own
file's full cache (the issue's measure: the average over the tasks both sides have, divided by
the full cache's); the difference A - B in points of that measure comes with a 95% interval
from resampling each task's samples with replacement (the same draw for both sides and their
full caches), and the number of samples each side wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def load(spec: str) -> tuple[dict, dict, str]:
    """``RESULTS:METHOD:BUDGET`` -> ({(task, index): score} of the column, of its file's full
    cache, a label); the per-sample seeds are checked by :func:`paired`."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3:
        raise SystemExit(f"{spec!r}: RESULTS:METHOD:BUDGET, e.g. run/results.jsonl:kvzap:0.25")
    path, method, budget = parts
    if not Path(path).is_file():
        raise SystemExit(f"{spec!r}: RESULTS:METHOD:BUDGET with RESULTS a results.jsonl file "
                         f"(no file {path!r})")
    try:
        want = float(budget)
    except ValueError:
        raise SystemExit(f"{spec!r}: BUDGET {budget!r} is not a number") from None
    col, full = {}, {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        key = (r["task"], r["index"])
        if r["method"] == "full":
            full[key] = (r["score"], r["seed"])
        elif r["method"] == method and r["budget"] is not None and \
                abs(float(r["budget"]) - want) < 1e-9:
            col[key] = (r["score"], r["seed"])
    if not col:
        raise SystemExit(f"{spec!r}: no records of method {method!r} at budget {want} in {path}")
    return col, full, f"{method} @ {budget}"


def paired(a: dict, fa: dict, b: dict, fb: dict) -> dict[str, list[tuple]]:
    """{task: [(a, full_a, b, full_b)]} over the samples all four have, in index order."""
    keys = sorted(set(a) & set(fa) & set(b) & set(fb))
    bad = [k for k in keys if len({a[k][1], fa[k][1], b[k][1], fb[k][1]}) > 1]
    if bad:
        raise SystemExit(f"sample {bad[0]}: the two files hold different samples (per-sample "
                         "seeds differ)")
    out: dict[str, list[tuple]] = {}
    for k in keys:
        out.setdefault(k[0], []).append((a[k][0], fa[k][0], b[k][0], fb[k][0]))
    return out


def compare(tasks: dict[str, list[tuple]], resamples: int = 10000, seed: int = 0) -> dict:
    """% of full of both sides, their difference and its 95% paired bootstrap interval."""
    arrays = {t: np.asarray(v, np.float64) for t, v in tasks.items()}  # [n, 4] each

    def pct(rows: list[np.ndarray]) -> tuple[float, float]:
        m = np.stack([r.mean(0) for r in rows])  # [tasks, 4]
        avg = m.mean(0)
        return 100 * avg[0] / avg[1], 100 * avg[2] / avg[3]

    pa, pb = pct(list(arrays.values()))
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for i in range(resamples):
        x, y = pct([v[rng.integers(0, len(v), len(v))] for v in arrays.values()])
        diffs[i] = x - y
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    allv = np.concatenate(list(arrays.values()))
    return {"a": pa, "b": pb, "diff": pa - pb, "low": float(lo), "high": float(hi),
            "a_wins": int((allv[:, 0] > allv[:, 2]).sum()),
            "b_wins": int((allv[:, 0] < allv[:, 2]).sum()), "samples": len(allv),
            "tasks": {t: (100 * v[:, 0].mean(), 100 * v[:, 2].mean())
                      for t, v in arrays.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="RESULTS:METHOD:BUDGET")
    p.add_argument("b", help="RESULTS:METHOD:BUDGET")
    p.add_argument("--resamples", type=int, default=10000)
    args = p.parse_args(argv)
    if args.resamples < 100:
        p.error(f"--resamples {args.resamples}: an integer >= 100")
    a, fa, la = load(args.a)
    b, fb, lb = load(args.b)
    tasks = paired(a, fa, b, fb)
    if not tasks:
        p.error("no sample is in both columns and both full caches")
    r = compare(tasks, args.resamples)
    print(f"| task | A: {la} | B: {lb} |\n|---|---|---|")
    for t, (x, y) in r["tasks"].items():
        print(f"| {t} | {x:.1f} | {y:.1f} |")
    print(f"\n{r['samples']} paired samples, {len(tasks)} tasks. % of full: A {r['a']:.1f}, "
          f"B {r['b']:.1f}; A - B {r['diff']:+.1f} points, 95% interval "
          f"[{r['low']:+.1f}, {r['high']:+.1f}]; samples A scores higher {r['a_wins']}, "
          f"B higher {r['b_wins']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
