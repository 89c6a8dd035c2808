// Score pooling along the candidates (SnapKV and the policies built on it): window maxima and
// window sums over ``[j - before, j + after]`` of every row, outside the row counting as -inf
// (max) or 0 (sum). Both are bit for bit what kvcrush_ov.eviction.snapkv documents.
#pragma once

#include <cstdint>

namespace kvcrush {

/// out[r, j] = max of v[r, j - before .. j + after] (NaN anywhere in the window gives NaN).
/// v, out: [rows, n] f32; before, after >= 0. Parallel over rows.
void sliding_max(const float* v, int64_t rows, int64_t n, int64_t before, int64_t after,
                 float* out);

/// out[r, j] = f32 sum of v[r, j - before .. j + after] in a fixed order: sums of power-of-two
/// spans (``s_b[i] = s_{b-1}[i] + s_{b-1}[i + 2^(b-1)]``), then one span per set bit of the width
/// ``w = before + after + 1``, the widest first, each added to the running sum. Every window is
/// summed on its own (no prefix-sum differences), so it is accurate relative to itself.
/// v, out: [rows, n] f32; before, after >= 0. Parallel over rows.
void window_sums(const float* v, int64_t rows, int64_t n, int64_t before, int64_t after,
                 float* out);

}  // namespace kvcrush
