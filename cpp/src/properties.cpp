#include "kvcrush/properties.hpp"

#include <algorithm>

#include "kvcrush/config.hpp"
#include "kvcrush/parallel.hpp"

namespace kvcrush {

bool one_core_bf16(ov::Core& core, const std::string& device) {
  if (device.rfind("CPU", 0) != 0 || available_cores() != 1) return false;
  try {
    const auto caps = core.get_property("CPU", ov::device::capabilities);
    return std::find(caps.begin(), caps.end(), ov::device::capability::BF16) != caps.end();
  } catch (const ov::Exception&) {
    return false;
  }
}

ov::AnyMap kv_cache_properties(ov::Core& core, const std::string& device,
                               const std::string& precision) {
  ov::AnyMap props;
  if (precision == "u4") {
    props = {{"KEY_CACHE_PRECISION", "u4"}, {"VALUE_CACHE_PRECISION", "u8"}};
  } else {
    props = {{"KV_CACHE_PRECISION", precision}};
    if (precision == "f32") props["INFERENCE_PRECISION_HINT"] = "f32";  // f32 cache, f32 inference
  }
  if (one_core_bf16(core, device)) {  // upstream defect: bf16 compile dies on one core
    if (precision == "bf16")
      throw ConfigError("kv_cache.precision", repr(precision),
                        "u8, u4 or f32 in a process limited to one CPU core",
                        "OpenVINO 2026.4's CPU plugin dies with a floating-point exception "
                        "compiling a model for bf16 inference in a process limited to one core");
    props["INFERENCE_PRECISION_HINT"] = "f32";
  }
  return props;
}

}  // namespace kvcrush
