"""Where fetched models live on disk, and how a finished model is told from a half-written one.

Layout under :func:`home` (``$KVCRUSH_OV_HOME``, else ``$XDG_CACHE_HOME/kvcrush-ov``, else
``~/.cache/kvcrush-ov``)::

    downloads/<gguf file>            joined, sha256-verified GGUF
    models/<name>/hf/                Hugging Face checkpoint converted from the GGUF
    models/<name>/ov-<format>/       OpenVINO IR written by ``optimum-cli export openvino``

A folder is complete only when it holds :data:`MARKER`, written last; every stage works in a
``*.partial`` sibling and renames it into place, so an interrupted fetch never leaves a folder that
looks usable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MARKER = "kvcrush_model.json"
PARTIAL = ".partial"


def home() -> Path:
    env = os.environ.get("KVCRUSH_OV_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvcrush-ov"


def downloads_dir() -> Path:
    return home() / "downloads"


def model_root(name: str) -> Path:
    return home() / "models" / name


def hf_dir(name: str) -> Path:
    return model_root(name) / "hf"


def ov_dir(name: str, weight_format: str) -> Path:
    return model_root(name) / f"ov-{weight_format}"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def read_marker(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text())


def partial_of(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL)


def start_partial(final: Path) -> Path:
    """Return a fresh, empty ``*.partial`` directory next to ``final`` (left-overs are removed)."""
    tmp = partial_of(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_partial(tmp: Path, final: Path, marker: dict) -> Path:
    """Write the marker into ``tmp`` and atomically move it to ``final``."""
    (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
