"""The device a model runs on: what OpenVINO sees here, which KV-cache precisions it can hold,
which precision it computes in (CPU: bf16 with AVX512-BF16 / AMX, f32 on CPUs without BF16)."""

from __future__ import annotations

from kvcrush_ov import _core
from kvcrush_ov.errors import ConfigError

#: Why a one-core process computes in f32 (an upstream defect, guarded against in the C++
#: core's kv_cache_properties, cpp/src/properties.cpp, which the runners of both languages use)
ONE_CORE_BF16 = ("OpenVINO 2026.4's CPU plugin dies with a floating-point exception compiling a "
                 "model for bf16 inference in a process limited to one core")


def _available_devices() -> list[str]:
    import openvino as ov

    return list(ov.Core().available_devices)


def proc_kib(path: str, key: str) -> int | None:
    """The ``key:`` line of a Linux /proc file in KiB (e.g. ``/proc/meminfo``, MemAvailable);
    None where the file or the line is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_device(device: object) -> str:
    """Validate ``device`` against the devices OpenVINO sees on this machine."""
    available = _available_devices()
    if not isinstance(device, str) or not device:
        raise ConfigError("device", device, f"one of {', '.join(available)}")
    base = device.split(".")[0].upper()
    if device.upper() not in {d.upper() for d in available} and base not in available:
        raise ConfigError("device", device, f"one of {', '.join(available)} on this machine")
    return device.upper() if "." not in device else device


def device_capabilities(device: str) -> list[str]:
    """The device's OPTIMIZATION_CAPABILITIES (e.g. FP32, INT8, BF16); [] if it does not say."""
    import openvino as ov

    try:
        return [str(c) for c in ov.Core().get_property(device.split(".")[0],
                                                          "OPTIMIZATION_CAPABILITIES")]
    except RuntimeError:
        return []


def inference_settings(device: str, kv_precision: str) -> dict[str, str]:
    """What the device runs a model with here: its name and inference precision (an f32 cache
    forces f32 inference; see compile_properties). Results from machines whose
    inference precision differs (bf16 on AVX512-BF16 / AMX CPUs, f32 on others) differ slightly."""
    import openvino as ov

    core, base = ov.Core(), device.split(".")[0]
    try:
        name = str(core.get_property(base, "FULL_DEVICE_NAME"))
        hint = core.get_property(base, "INFERENCE_PRECISION_HINT")
        precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    except RuntimeError:
        name, precision = base, "unknown"
    f32 = kv_precision == "f32" or one_core_bf16(device)  # see compile_properties
    return {"device_name": name, "inference_precision": "f32" if f32 else precision}


def one_core_bf16(device: str) -> bool:
    """Whether OpenVINO would compile for bf16 inference on ``device`` in a process limited to
    one core: a CPU with BF16 (AVX512-BF16 / AMX) and an affinity mask of one core, where
    compile_model dies with SIGFPE (any LLM, paged or not; OpenVINO 2026.4, a Xeon with AMX,
    ``taskset -c 0``). ``kvcrush::one_core_bf16``."""
    return bool(_core.one_core_bf16(device))


def compile_properties(device: str, precision: str,
                       extra: dict | None = None) -> dict[str, object]:
    """OpenVINO compile properties of a KV-cache precision on ``device``
    (``kvcrush::kv_cache_properties``: f32 inference with an f32 cache, and in a process where
    :func:`one_core_bf16`; a bf16 cache is refused there before, by :func:`check_kv_precision`),
    then ``extra`` (properties a caller adds). ``INFERENCE_NUM_THREADS`` 1 on a CPU with BF16
    is the same defect: f32 inference then too, unless ``extra`` names a precision itself."""
    props: dict[str, object] = {**_core.kv_cache_properties(device, precision), **(extra or {})}
    if "INFERENCE_PRECISION_HINT" in (extra or {}):
        return props
    if str(props.get("INFERENCE_NUM_THREADS", "")) == "1" and (
            device.upper().startswith("CPU") and "BF16" in device_capabilities(device)):
        props["INFERENCE_PRECISION_HINT"] = "f32"
    return props


def check_kv_precision(device: str, precision: str) -> None:
    """A bf16 KV cache needs BF16 support (on CPU: AVX512-BF16 or AMX). On a CPU without it
    (AVX2-only, or AVX-512 without BF16), OpenVINO's PagedAttention takes only f32 or quantized
    (u8 / u4) caches and would fail at compile time with a kernel assertion; this names the
    field first."""
    if precision != "bf16" or not device.upper().startswith("CPU"):
        return
    if one_core_bf16(device):
        raise ConfigError("kv_cache.precision", precision,
                          "u8, u4 or f32 in a process limited to one CPU core", ONE_CORE_BF16)
    caps = device_capabilities(device)
    if caps and "BF16" not in caps:
        raise ConfigError("kv_cache.precision", precision,
                          f"u8, u4 or f32 on {device} here: it has no BF16 support "
                          f"(OPTIMIZATION_CAPABILITIES: {', '.join(caps)})")
