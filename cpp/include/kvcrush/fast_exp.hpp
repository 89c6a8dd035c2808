// Branch-free e^x for the kernels' softmax and log-sum-exp loops (so that loops over it
// vectorize; compile them with reassociation allowed, see CMakeLists.txt).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvcrush {

/// e^x for |x| <= 87, relative error below 2e-7:
/// x = n ln2 + r, e^r by a degree-6 polynomial on |r| <= ln2 / 2, 2^n from the exponent bits.
inline float exp_core(float x) {
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

/// e^x for x <= 0 (shifted logits): exp_core, exactly 0 below -87.
inline float exp_nonpositive(float x) {
  const float under = x < -87.0f ? 0.0f : 1.0f;
  return exp_core(x < -87.0f ? -87.0f : x) * under;
}

}  // namespace kvcrush
