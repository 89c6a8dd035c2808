"""``kvcrush-ov bench-serve``: N concurrent streaming clients against a real ``kvcrush-ov serve``
process with a fixed KV cache, full cache vs the default eviction, in one run.

Each client sends ``requests_per_client`` completions one after another (distinct essay slices
of ``prompt_tokens`` tokens, ``max_tokens`` greedy tokens, EOS ignored). Printed per (mode,
clients): completed requests per minute, TTFT p50 / p99 (first streamed text), decode tokens/s
per request (median) and in total, and the ratios default / full.
"""

from __future__ import annotations

import concurrent.futures as cf
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import numpy as np


@dataclass
class ServeRow:
    mode: str
    clients: int
    requests: int
    wall_s: float
    req_per_min: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_tok_s: float  # median decode tokens/s of one request
    total_tok_s: float


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "kvcrush_ov.cli", "serve", "--model", model,
                             "--port", str(port), "--served-model-name", "bench", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError("the server did not start")


def prompts_of(model_dir: str, n: int, tokens: int) -> list[str]:
    """``n`` distinct essay slices of ``tokens`` tokens each (the model's own tokenizer)."""
    import openvino_genai as ov_genai

    from kvcrush_ov.data import essays

    tok = ov_genai.Tokenizer(model_dir)
    ids = list(tok.encode("\n\n".join(essays().values())).input_ids.data[0])
    step = max(1, (len(ids) - tokens) // max(1, n))
    return [tok.decode(ids[i * step:i * step + tokens]) for i in range(n)]


def _one(client, prompt: str, max_tokens: int) -> tuple[float, float, float, int]:
    t0 = time.perf_counter()
    first = end = 0.0
    n = 0
    s = client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens,
                                  temperature=0, stream=True, extra_body={"ignore_eos": True})
    for c in s:
        if c.choices and c.choices[0].text and not first:
            first = time.perf_counter()
        if getattr(c, "usage", None):
            n = c.usage.completion_tokens
    end = time.perf_counter()
    return t0, first or end, end, n


def run_clients(url: str, prompts: list[str], clients: int, per_client: int,
                max_tokens: int) -> tuple[float, list[tuple[float, float, float, int]]]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)

    def worker(k: int) -> list:
        return [_one(client, prompts[(k * per_client + j) % len(prompts)], max_tokens)
                for j in range(per_client)]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as ex:
        results = [r for rs in ex.map(worker, range(clients)) for r in rs]
    return time.perf_counter() - t0, results


def bench_serve(model: str, clients: list[int], prompt_tokens: int = 1024,
                max_tokens: int = 64, num_kv_blocks: int = 512, per_client: int = 2,
                budget: str = "25%", precision: str = "u8",
                modes: tuple[str, ...] = ("full", "default"), fastkv: bool = False,
                log=print) -> list[ServeRow]:
    """``fastkv``: the default-eviction server also runs FastKV's split prefill."""
    from kvcrush_ov.pipeline import resolve_model

    folder = str(resolve_model(model))
    prompts = prompts_of(folder, max(clients) * per_client, prompt_tokens)
    rows = []
    options = {"full": ["--no-eviction"],
               "default": ["--budget", budget, *(["--fastkv"] if fastkv else [])]}
    for mode in modes:
        extra = options[mode]
        proc, url = _start(folder, ["--num-kv-blocks", str(num_kv_blocks), "--precision",
                                    precision, *extra])
        try:
            run_clients(url, prompts[:1], 1, 1, 4)  # warm-up
            for n in clients:
                wall, res = run_clients(url, prompts, n, per_client, max_tokens)
                ttft = np.array([f - t for t, f, _, _ in res])
                tpot = [(k - 1) / (e - f) for _, f, e, k in res if k > 1 and e > f]
                row = ServeRow(mode, n, len(res), wall, 60 * len(res) / wall,
                               float(np.percentile(ttft, 50)), float(np.percentile(ttft, 99)),
                               float(np.median(tpot)) if tpot else 0.0,
                               sum(k for *_, k in res) / wall)
                rows.append(row)
                log(f"[bench-serve] {mode:<8} {n:3d} clients: {row.req_per_min:7.1f} req/min, "
                    f"TTFT p50 {row.ttft_p50_s:6.2f} s p99 {row.ttft_p99_s:6.2f} s, "
                    f"{row.tpot_tok_s:6.1f} tok/s per request, {row.total_tok_s:7.1f} total")
        finally:
            proc.terminate()
            proc.wait(60)
    return rows


def table(rows: list[ServeRow]) -> str:
    full = {r.clients: r for r in rows if r.mode == "full"}
    out = ["| clients | mode | req/min | TTFT p50 (s) | TTFT p99 (s) | tok/s per request | "
           "tok/s total | req/min vs full | TTFT p99 vs full |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = full.get(r.clients)
        ratio = f"{r.req_per_min / f.req_per_min:.2f}x" if f and r.mode != "full" else ""
        p99 = f"{r.ttft_p99_s / f.ttft_p99_s:.2f}x" if f and r.mode != "full" else ""
        out.append(f"| {r.clients} | {r.mode} | {r.req_per_min:.1f} | {r.ttft_p50_s:.2f} | "
                   f"{r.ttft_p99_s:.2f} | {r.tpot_tok_s:.1f} | {r.total_tok_s:.1f} | {ratio} | "
                   f"{p99} |")
    return "\n".join(out)
