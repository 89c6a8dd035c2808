"""The device a model runs on: what OpenVINO sees here, which KV-cache precisions it can hold,
which precision it computes in (CPU: bf16 with AVX512-BF16 / AMX, f32 on CPUs without BF16)."""

from __future__ import annotations

from kvcrush_ov.errors import ConfigError


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
    forces f32 inference; see config.kv_cache_properties). Results from machines whose
    inference precision differs (bf16 on AVX512-BF16 / AMX CPUs, f32 on others) differ slightly."""
    import openvino as ov

    core, base = ov.Core(), device.split(".")[0]
    try:
        name = str(core.get_property(base, "FULL_DEVICE_NAME"))
        hint = core.get_property(base, "INFERENCE_PRECISION_HINT")
        precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    except RuntimeError:
        name, precision = base, "unknown"
    return {"device_name": name,
            "inference_precision": "f32" if kv_precision == "f32" else precision}


def check_kv_precision(device: str, precision: str) -> None:
    """A bf16 KV cache needs BF16 support (on CPU: AVX512-BF16 or AMX). On a CPU without it
    (AVX2-only, or AVX-512 without BF16), OpenVINO's PagedAttention takes only f32 or quantized
    (u8 / u4) caches and would fail at compile time with a kernel assertion; this names the
    field first."""
    if precision != "bf16" or not device.upper().startswith("CPU"):
        return
    caps = device_capabilities(device)
    if caps and "BF16" not in caps:
        raise ConfigError("kv_cache.precision", precision,
                          f"u8, u4 or f32 on {device} here: it has no BF16 support "
                          f"(OPTIMIZATION_CAPABILITIES: {', '.join(caps)})")
