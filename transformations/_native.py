"""Hand an ``openvino.Model`` to the C++ graph passes of :mod:`kvcrush_ov._core`.

The passes (``cpp/include/kvcrush/passes.hpp``) run on the C++ ``ov::Model`` behind the Python
object: :func:`model_address` returns its address (``Model._get_raw_address()``), and
``_core`` takes shared ownership of it for the call (``shared_from_this``), so the Python object
and the C++ pass see the same graph. This is only sound when ``_core`` runs on the very
``libopenvino`` the ``openvino`` package loaded; :func:`model_address` checks that once per
process (same build number) and checks the argument's type on every call.
"""

from __future__ import annotations

import functools

import openvino as ov  # first: loads the wheel's libopenvino before kvcrush_ov._core

from kvcrush_ov import _core


@functools.cache
def _check_same_runtime() -> None:
    """Raise ImportError when ``_core`` and ``openvino`` run on different libopenvino builds."""
    python_build, native_build = ov.get_version(), _core.openvino_build()
    if python_build != native_build:
        raise ImportError(
            f"kvcrush_ov._core runs on OpenVINO {native_build} (compiled against "
            f"{_core.openvino_compiled_version()}) but the openvino package is {python_build}: "
            "reinstall kvcrush-ov against the installed openvino (scripts/setup.sh)"
        )


def model_address(model: ov.Model) -> int:
    """The address of ``model``'s C++ ``ov::Model`` for a ``_core`` pass (checked handoff)."""
    if not isinstance(model, ov.Model):
        raise TypeError(f"expected an openvino.Model, got {type(model).__name__}")
    _check_same_runtime()
    raw = getattr(model, "_get_raw_address", None)
    if raw is None:  # a private openvino API: fail clearly should a release drop it
        raise RuntimeError(f"openvino {ov.get_version()}: Model has no _get_raw_address(); the "
                           "C++ passes cannot reach the model")
    return int(raw())
