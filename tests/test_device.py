"""kvcrush_ov.device's guard against an upstream defect: OpenVINO 2026.4's CPU plugin dies with
SIGFPE compiling any LLM for bf16 inference in a process limited to one core (a Xeon with AMX,
``taskset -c 0``). Such a process computes in f32, and a bf16 cache is refused by name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import kvcrush_ov.device as device


def _one_core() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


_GUARD_CHILD = """
import pytest
from kvcrush_ov import ConfigError
from kvcrush_ov import device
bf16 = "BF16" in device.device_capabilities("CPU")
assert device.one_core_bf16("CPU") == bf16
assert not device.one_core_bf16("GPU")
hint = device.compile_properties("CPU", "u8").get("INFERENCE_PRECISION_HINT")
assert hint == ("f32" if bf16 else None), hint
assert device.compile_properties("CPU", "u4").get("INFERENCE_PRECISION_HINT") == hint
if bf16:
    with pytest.raises(ConfigError, match=r"kv_cache.precision='bf16'.*one CPU core"):
        device.check_kv_precision("CPU", "bf16")
    assert device.inference_settings("CPU", "u8")["inference_precision"] == "f32"  # as run
print("bf16" if bf16 else "no bf16")
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux affinity masks")
def test_one_core_with_bf16_computes_in_f32():
    """In a one-core child: f32 inference and a bf16 cache refused by name where the CPU has
    BF16 (where it has not, nothing changes); the device's own precision with more cores."""
    res = subprocess.run([sys.executable, "-c", _GUARD_CHILD], preexec_fn=_one_core,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    if len(os.sched_getaffinity(0)) > 1:
        assert not device.one_core_bf16("CPU")
        assert device.compile_properties("CPU", "u8") == {"KV_CACHE_PRECISION": "u8"}
        if res.stdout.strip() == "bf16":
            device.check_kv_precision("CPU", "bf16")  # allowed with more cores


def test_one_inference_thread_with_bf16_computes_in_f32(monkeypatch):
    """INFERENCE_NUM_THREADS=1 hits the same defect on any number of cores."""
    monkeypatch.setattr(device, "device_capabilities", lambda d: ["FP32", "BF16"])
    base = device.compile_properties("CPU", "u8").get("INFERENCE_PRECISION_HINT")
    one = {"INFERENCE_NUM_THREADS": 1}
    assert device.compile_properties("CPU", "u8", one)["INFERENCE_PRECISION_HINT"] == "f32"
    assert device.compile_properties(
        "CPU", "u8", {"INFERENCE_NUM_THREADS": 2}).get("INFERENCE_PRECISION_HINT") == base
    asked = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f16"}  # named: kept
    assert device.compile_properties("CPU", "u8", asked)["INFERENCE_PRECISION_HINT"] == "f16"
    monkeypatch.setattr(device, "device_capabilities", lambda d: ["FP32"])
    assert device.compile_properties("CPU", "u8", one).get("INFERENCE_PRECISION_HINT") == base


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux affinity masks")
def test_a_one_core_process_generates_with_both_backends(tiny_model):
    """In a child limited to one core (where, on a CPU with BF16, compile_model would kill
    the process without the guard), the native engine (plain and per-head graphs) and the
    GenAI backend load and generate."""
    code = (
        "import sys\n"
        "from kvcrush_ov import Pipeline, CacheEvictionConfig, GenerationConfig\n"
        "g = GenerationConfig(max_new_tokens=3, apply_chat_template=False)\n"
        "prompt = 'hello world ' * 200\n"
        "for backend, ev in (('native', None), ('native', CacheEvictionConfig(max_cache_size=256)),"
        " ('genai', None)):\n"
        "    out = Pipeline(sys.argv[1], eviction=ev, backend=backend).generate(prompt, g)\n"
        "    assert out.metrics[0].num_generated_tokens == 3, out\n"
        "from kvcrush_ov.engine.head_model_runner import HeadModelRunner\n"
        "HeadModelRunner(sys.argv[1], 'CPU', 'u8', {'INFERENCE_NUM_THREADS': 1})\n"
        "print('done')\n")
    res = subprocess.run([sys.executable, "-c", code, str(tiny_model)], preexec_fn=_one_core,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"rc {res.returncode}: {res.stderr[-3000:]}"
    assert res.stdout.strip().endswith("done")
