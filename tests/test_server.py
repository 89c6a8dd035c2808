"""``kvcrush-ov serve``: a real server process on 127.0.0.1, driven with the official ``openai``
client (and raw HTTP for what the client cannot send). The tiny model, an f32 cache (so batched
output equals one-by-one output exactly) and a cache smaller than the concurrent requests need."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import openai  # the test extra installs it (scripts/setup.sh)
import pytest

from kvcrush_ov import CacheEvictionConfig, KVCacheConfig, Pipeline, SchedulerConfig
from kvcrush_ov.fuzz import prompt_text

KEY = "test-key-123"
BLOCKS = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "kvcrush_ov.cli", "serve", "--model", str(model), "--port",
           str(port), "--precision", "f32", "--num-kv-blocks", str(BLOCKS), "--budget", "0.5",
           "--served-model-name", "tiny", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not answer /health within 120 s")


@pytest.fixture(scope="module")
def server(tiny_model):
    proc, url = _start(tiny_model, "--api-key", KEY)
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    """The same configuration in this process: the reference for every output."""
    return Pipeline(tiny_model, kv_cache=KVCacheConfig(precision="f32", num_kv_blocks=BLOCKS),
                    eviction=CacheEvictionConfig(max_cache_size=0.5),
                    scheduler=SchedulerConfig())


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _post(url: str, path: str, data: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


PROMPT = "The quick brown fox jumps over the lazy dog and then"


def test_completions_equal_pipeline_generate(client, pipe):
    want = pipe.generate(PROMPT, max_new_tokens=12, apply_chat_template=False).text
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_chat_completions_equal_pipeline_generate(client, pipe):
    want = pipe.generate(PROMPT, max_new_tokens=12).text  # the chat template, one user turn
    msgs = [{"role": "user", "content": PROMPT}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12,
                                       temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(server + "/health", timeout=5) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_32_concurrent_streams_under_cache_pressure_equal_their_sequential_runs(
        client, server, pipe):
    """32 streams of 20..380 words at once on a cache of 120 blocks (they need several times
    that): all complete, none lost or duplicated, each equal to its run alone."""
    rng = np.random.default_rng(4)
    prompts = [prompt_text(int(n), 100 + i) for i, n in enumerate(rng.integers(20, 380, 32))]
    need = sum(-(-len(pipe.backend.encode(p, False)[0]) // 32) for p in prompts)
    assert need > 3 * BLOCKS

    def one(i: int) -> tuple[int, str, str | None]:
        s = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=10,
                                      temperature=0, stream=True)
        text, reason = "", None
        for c in s:
            text += c.choices[0].text
            reason = c.choices[0].finish_reason or reason
        return i, text, reason

    with cf.ThreadPoolExecutor(32) as ex:
        got = list(ex.map(one, range(32)))
    assert sorted(i for i, _, _ in got) == list(range(32))
    for i, text, reason in got:
        want = pipe.generate(prompts[i], max_new_tokens=10, apply_chat_template=False)
        assert text == want.text, f"prompt {i}"
        assert reason == want.finish_reasons[0]
    m = _metrics(server)
    assert m["kvcrush_requests_running"] == 0 and m["kvcrush_kv_blocks_used"] == 0


def test_a_closed_stream_cancels_its_request_and_frees_its_blocks(client, server):
    before = _metrics(server)
    s = client.completions.create(model="tiny", prompt=prompt_text(200, 7), max_tokens=1200,
                                  temperature=0, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(s):
        if i == 3:
            break
    s.close()
    deadline = time.time() + 30
    while time.time() < deadline:
        m = _metrics(server)
        cancelled = m.get('kvcrush_requests_finished_total{finish_reason="cancelled"}', 0)
        if m["kvcrush_kv_blocks_used"] == 0 and cancelled > before.get(
                'kvcrush_requests_finished_total{finish_reason="cancelled"}', 0):
            break
        time.sleep(0.2)
    assert m["kvcrush_kv_blocks_used"] == 0 and m["kvcrush_requests_running"] == 0
    assert cancelled == before.get(
        'kvcrush_requests_finished_total{finish_reason="cancelled"}', 0) + 1


BAD = [
    ("unknown-model", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ("no-model", {"prompt": "hi"}, 400, "model"),
    ("temperature-nan", {"model": "tiny", "prompt": "hi", "temperature": math.nan}, 400,
     "temperature"),
    ("temperature-negative", {"model": "tiny", "prompt": "hi", "temperature": -1}, 400,
     "temperature"),
    ("top-p", {"model": "tiny", "prompt": "hi", "top_p": 2}, 400, "top_p"),
    ("max-tokens", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-huge", {"model": "tiny", "prompt": "hi", "max_tokens": 10**9}, 400,
     "max_tokens"),
    ("n", {"model": "tiny", "prompt": "hi", "n": 2}, 400, "n"),
    ("stop-type", {"model": "tiny", "prompt": "hi", "stop": 5}, 400, "stop"),
    ("unknown-field", {"model": "tiny", "prompt": "hi", "tempreature": 1}, 400, "tempreature"),
    ("empty-prompt", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("too-long-prompt", {"model": "tiny", "prompt": "word " * 5000}, 400, "prompt"),
    ("eviction-budget", {"model": "tiny", "prompt": "hi",
                         "kv_cache_eviction": {"max_cache_size": 2.5}}, 400,
     "kv_cache_eviction.max_cache_size"),
    ("eviction-unknown-field", {"model": "tiny", "prompt": "hi",
                                "kv_cache_eviction": {"budget": 0.5}}, 400, "kv_cache_eviction"),
    ("eviction-kvcrush", {"model": "tiny", "prompt": "hi",
                          "kv_cache_eviction": {"kvcrush": {"budget": 3}}}, 400,
     "kv_cache_eviction.kvcrush.budget"),
    ("eviction-upstream", {"model": "tiny", "prompt": "hi",
                           "kv_cache_eviction": {"importance": "upstream"}}, 400,
     "kv_cache_eviction.importance"),
]
BAD_CHAT = [
    ("empty-messages", {"model": "tiny", "messages": []}, 400, "messages"),
    ("bad-role", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("content-type", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
]


@pytest.mark.parametrize("body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_completion_requests_are_named(server, client, pipe, body, status, param):
    code, err = _post(server, "/v1/completions", json.dumps(body).encode())
    assert code == status, err
    assert err["error"]["param"] == param, err
    assert param.split(".")[-1] in err["error"]["message"]
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == pipe.generate(PROMPT, max_new_tokens=4,
                                              apply_chat_template=False).text


@pytest.mark.parametrize("body,status,param", [b[1:] for b in BAD_CHAT],
                         ids=[b[0] for b in BAD_CHAT])
def test_bad_chat_requests_are_named(server, body, status, param):
    code, err = _post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert (code, err["error"]["param"]) == (status, param), err


def test_bad_json_and_missing_key(server):
    code, err = _post(server, "/v1/completions", b"{not json")
    assert code == 400 and err["error"]["param"] == "body"
    code, err = _post(server, "/v1/completions", b'{"model": "tiny", "prompt": "hi"}', key=None)
    assert code == 401 and err["error"]["code"] == "invalid_api_key"
    code, err = _post(server, "/v1/completions", b'{"model": "tiny", "prompt": "hi"}',
                      key="wrong")
    assert code == 401


def test_per_request_eviction_budget(client, tiny_model):
    """``kv_cache_eviction`` in the body: that request keeps its own budget."""
    prompt = prompt_text(300, 9)
    ref = Pipeline(tiny_model, kv_cache=KVCacheConfig(precision="f32"),
                   eviction=CacheEvictionConfig(max_cache_size=0.25))
    want = ref.generate(prompt, max_new_tokens=8, apply_chat_template=False).text
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                  extra_body={"kv_cache_eviction": {"max_cache_size": 0.25}})
    assert r.choices[0].text == want


def test_sigterm_lets_a_running_request_finish_and_exits_0(tiny_model):
    proc, url = _start(tiny_model)
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    s = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=0,
                             stream=True, extra_body={"ignore_eos": True})
    first = next(iter(s))
    proc.send_signal(signal.SIGTERM)
    rest = list(s)
    assert first.choices[0].text is not None and rest[-1].choices[0].finish_reason == "length"
    assert proc.wait(timeout=60) == 0


def test_bench_serve_table_reports_ratios_against_the_full_cache():
    from kvcrush_ov.bench_serve import ServeRow, table

    rows = [ServeRow("full", 8, 8, 10.0, 48.0, 1.0, 2.0, 10.0, 50.0),
            ServeRow("default", 8, 8, 5.0, 96.0, 0.5, 1.0, 9.0, 100.0)]
    lines = table(rows).splitlines()
    assert lines[2].startswith("| 8 | full | 48.0 |") and lines[2].endswith("|  |  |")
    assert lines[3].endswith("| 2.00x | 0.50x |")


def test_bench_serve_runs_a_real_fastkv_server(tiny_model):
    """bench-serve's default side with ``--fastkv``: a real ``serve --fastkv`` process, every
    request completed with its tokens."""
    from kvcrush_ov.bench_serve import bench_serve

    rows = bench_serve(str(tiny_model), [3], prompt_tokens=300, max_tokens=4, num_kv_blocks=64,
                       per_client=1, modes=("default",), fastkv=True, log=lambda _: None)
    assert [(r.mode, r.clients, r.requests) for r in rows] == [("default", 3, 3)]
    assert rows[0].total_tok_s > 0 and rows[0].ttft_p50_s > 0


def test_bench_serve_rejects_bad_numbers_by_name():
    out = subprocess.run([sys.executable, "-m", "kvcrush_ov.cli", "bench-serve", "--clients",
                          "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--clients" in out.stderr + out.stdout


def test_ray_serve_spreads_requests_over_two_replicas(tiny_model, pipe):
    """``serve --ray --replicas 2``: a local Ray cluster, the same app in two replicas behind
    Ray Serve's HTTP proxy; concurrent requests are answered by both processes, with the same
    output as the Pipeline; SIGTERM shuts Ray down and exits 0."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvcrush_ov.cli", "serve", "--ray", "--replicas", "2", "--model",
         str(tiny_model), "--port", str(port), "--precision", "f32", "--num-kv-blocks",
         str(BLOCKS), "--budget", "0.5", "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 180
        while not any("replicas" in ln for ln in lines):  # printed once every replica is up
            assert time.time() < deadline and proc.poll() is None, "".join(lines[-20:])
            lines.append(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        want = pipe.generate(PROMPT, max_new_tokens=6, apply_chat_template=False).text
        body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 6,
                           "temperature": 0}).encode()

        def one(_: int) -> tuple[str, str]:
            req = urllib.request.Request(url + "/v1/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.headers["x-kvcrush-process"], json.loads(r.read())["choices"][0]["text"]

        with cf.ThreadPoolExecutor(8) as ex:
            got = list(ex.map(one, range(24)))
        assert {text for _, text in got} == {want}
        assert len({who for who, _ in got}) == 2, got
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    assert rc == 0
