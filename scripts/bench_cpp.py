"""Decode speed of the C++ Pipeline vs the Python Pipeline, same model, prompt and config.

    python scripts/bench_cpp.py build/samples [--model SmolLM2-135M-Instruct] [--tokens 64]

The prompt is the demo's document and question (kvcrush_ov.demo, ~3.3K tokens on SmolLM2, no
chat template on either side); each configuration (full cache, the default KVCrush eviction,
the same with ``plain_prefill``) runs ``--repeats`` times alternating C++ and Python, and the
median decode tokens/s (after the first token) and TTFT are printed. Both sides are warm:
each C++ repeat is a ``benchmark_generate`` process that runs the prompt once untimed, then
once timed; the Python Pipeline runs it once untimed before its repeats. Both sides also print
their greedy text's equality.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
from pathlib import Path

from kvcrush_ov.config import CacheEvictionConfig
from kvcrush_ov.demo import build_prompt
from kvcrush_ov.pipeline import Pipeline, resolve_model

#: (label, benchmark_generate's mode, the Python Pipeline's eviction)
CONFIGS = [("full cache", "full", None), ("KVCrush 25%", "eviction", CacheEvictionConfig()),
           ("plain prefill", "plain", CacheEvictionConfig(plain_prefill=True))]


def run_cpp(sample: Path, model: Path, prompt: str, tokens: int, mode: str) -> tuple:
    args = [str(sample), str(model), prompt, str(tokens), mode, "1", "1"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    text, _, stats = out.rpartition("\n--\n")
    text = text.split("\n", 1)[1]  # after the one timed run's line
    tps = float(re.search(r"decode ([\d.]+) tokens/s", stats).group(1))
    ttft = float(re.search(r"TTFT ([\d.]+) s", stats).group(1))
    return tps, ttft, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", type=Path, help="the samples' build folder (README)")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    model = resolve_model(a.model)
    prompt = build_prompt()
    print(f"{'config':<13} {'side':<7} {'decode tok/s':>12} {'TTFT s':>7}  same text")
    for label, mode, eviction in CONFIGS:
        pipe = Pipeline(model, eviction=eviction)
        pipe.generate(prompt, max_new_tokens=a.tokens, apply_chat_template=False)  # warm-up
        runs: dict[str, list[tuple[float, float]]] = {"C++": [], "Python": []}
        texts = {}
        for _ in range(a.repeats):
            tps, ttft, texts["C++"] = run_cpp(a.build / "benchmark_generate", model, prompt,
                                              a.tokens, mode)
            runs["C++"].append((tps, ttft))
            out = pipe.generate(prompt, max_new_tokens=a.tokens, apply_chat_template=False,
                                ignore_eos=False)
            m = out.metrics[0]
            runs["Python"].append((1.0 / m.tpot_s if m.tpot_s else 0.0, m.ttft_s))
            texts["Python"] = out.texts[0]
        for side, r in runs.items():
            print(f"{label:<13} {side:<7} {statistics.median(x[0] for x in r):>12.1f} "
                  f"{statistics.median(x[1] for x in r):>7.2f}  "
                  f"{texts['C++'] == texts['Python']}")
        del pipe


if __name__ == "__main__":
    main()
