"""The wheel holds every module of the source tree (it used to lack backends/, engine/ and
eviction/, so ``import kvcrush_ov`` failed from an installed wheel)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> its package in the wheel (pyproject.toml [tool.setuptools.package-dir])
TREES = {"kvcrush_ov": "kvcrush_ov", "models": "kvcrush_ov/models",
         "transformations": "kvcrush_ov/transformations"}


def test_the_wheel_holds_every_module(tmp_path):
    src = tmp_path / "src"  # a clean copy: a build/ folder left by an earlier build would hide
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(  # a missing package
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(src)], check=True, timeout=300)
    wheel = next(tmp_path.glob("kvcrush_ov-*.whl"))
    inside = set(zipfile.ZipFile(wheel).namelist())
    want = {f"{pkg}/{p.relative_to(ROOT / src).as_posix()}"
            for src, pkg in TREES.items() for p in (ROOT / src).rglob("*.py")}
    missing = sorted(want - inside)
    assert not missing, missing
    assert any(n.endswith("entry_points.txt") for n in inside)
