#include "kvcrush/pooling.hpp"

#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvcrush/parallel.hpp"

namespace kvcrush {

namespace {

void check_window(int64_t rows, int64_t n, int64_t before, int64_t after) {
  if (rows < 0 || n < 0) throw std::invalid_argument("values: allowed a [rows, n] array");
  if (before < 0 || after < 0)
    throw std::invalid_argument("window: allowed before >= 0 and after >= 0, got " +
                                std::to_string(before) + ", " + std::to_string(after));
}

/// numpy's maximum: NaN if either is NaN.
inline float nan_max(float a, float b) { return (a >= b || a != a) ? a : b; }

}  // namespace

void sliding_max(const float* v, int64_t rows, int64_t n, int64_t before, int64_t after,
                 float* out) {
  check_window(rows, n, before, after);
  const int64_t w = before + after + 1;
  parallel_for(rows, n * 8, [&](int64_t r) {
    // x[j + before] = v[j], -inf around; x[i] becomes the max of x[i .. i + 2 span - 1]
    std::vector<float> x(n + w - 1, -std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < n; ++j) x[before + j] = v[r * n + j];
    int64_t span = 1, len = n + w - 1;
    while (span * 2 <= w) {
      len -= span;
      for (int64_t i = 0; i < len; ++i) x[i] = nan_max(x[i], x[i + span]);
      span *= 2;
    }
    for (int64_t j = 0; j < n; ++j) out[r * n + j] = nan_max(x[j], x[j + w - span]);
  });
}

void window_sums(const float* v, int64_t rows, int64_t n, int64_t before, int64_t after,
                 float* out) {
  check_window(rows, n, before, after);
  const int64_t w = before + after + 1;
  int levels = 1;  // spans of 2^0 .. 2^(levels - 1)
  while ((int64_t{1} << levels) <= w) ++levels;
  parallel_for(rows, n * levels, [&](int64_t r) {
    std::vector<std::vector<float>> spans(levels);
    spans[0].assign(n + w - 1, 0.0f);
    for (int64_t j = 0; j < n; ++j) spans[0][before + j] = v[r * n + j];
    for (int b = 1; b < levels; ++b) {
      const int64_t half = int64_t{1} << (b - 1);
      const std::vector<float>& prev = spans[b - 1];
      spans[b].resize(prev.size() - half);
      for (size_t i = 0; i < spans[b].size(); ++i) spans[b][i] = prev[i] + prev[i + half];
    }
    float* row = out + r * n;
    int64_t start = 0;
    bool first = true;
    for (int b = levels - 1; b >= 0; --b) {
      if (!((w >> b) & 1)) continue;
      const float* part = spans[b].data() + start;
      for (int64_t j = 0; j < n; ++j) row[j] = first ? part[j] : row[j] + part[j];
      first = false;
      start += int64_t{1} << b;
    }
  });
}

}  // namespace kvcrush
