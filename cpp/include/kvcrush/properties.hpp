// OpenVINO compile properties for a KV-cache precision, with the guard against an upstream
// defect: OpenVINO 2026.4's CPU plugin dies with SIGFPE compiling a model for bf16 inference
// in a process limited to one core. One implementation for the C++ runners and Python
// (kvcrush_ov.device.compile_properties calls it through kvcrush_ov._core).
#pragma once

#include <string>

#include <openvino/runtime/core.hpp>

namespace kvcrush {

/// Whether OpenVINO would compile for bf16 inference on ``device`` in a process limited to one
/// core (a CPU with BF16, an affinity of one core), where compile_model dies with SIGFPE.
bool one_core_bf16(ov::Core& core, const std::string& device);

/// Compile properties of a KV cache precision (u8 / u4 / bf16 / f32) on ``device``: f32
/// inference with an f32 cache, and where one_core_bf16() (a bf16 cache there throws
/// ConfigError naming kv_cache.precision).
ov::AnyMap kv_cache_properties(ov::Core& core, const std::string& device,
                               const std::string& precision);

}  // namespace kvcrush
