"""Every eviction policy of the native engine on one long document, at the same memory.

    python samples/eviction_policies.py [--budget 0.25] [--model SmolLM2-135M-Instruct]

Prints, per policy (with and without KVCrush), the answer to a needle question, the KV bytes the
request held after eviction and the time per output token.
"""

from __future__ import annotations

import argparse

import kvcrush_ov as kv
from kvcrush_ov.demo import ANSWER, build_prompt

POLICIES = ["streaming", "h2o", "snapkv", "pyramidkv", "adakv"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--budget", type=float, default=0.25)
    args = ap.parse_args()
    prompt = build_prompt(0.5)
    print(f"{'policy':<22} {'answer ok':>9} {'KV held':>10} {'TPOT':>8}")
    for name in POLICIES:
        for crush in (None, kv.KVCrushConfig(budget=0.25)):
            pipe = kv.Pipeline(args.model, eviction=kv.CacheEvictionConfig(
                max_cache_size=args.budget, importance=name, kvcrush=crush))
            out = pipe.generate(prompt, max_new_tokens=24)
            m = out.metrics[0]
            label = name + (" + kvcrush" if crush else "")
            print(f"{label:<22} {str(ANSWER in out.text):>9} {m.kv_bytes / 2**20:>7.2f} MiB "
                  f"{1e3 * m.tpot_s:>5.1f} ms")


if __name__ == "__main__":
    main()
