// Eviction selection kernels: per-row top-k and KVCrush's representative picking.
//
// Every array is dense and row-major, passed as a pointer plus its dimensions (the Python
// bindings and C++ callers own the memory). Booleans are one byte each (0 or 1), as numpy's.
// Notation as in kvcrush_ov/eviction: L layers, H KV heads, N candidates, M units (tokens or
// blocks) of a layer, D bits per unit, A anchors.
//
// Invalid arguments throw std::invalid_argument with a message that names the field and what
// is allowed (the bindings turn it into Python's ValueError).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace kvcrush {

/// out[r, :] = 1 on the ``k[r]`` largest entries of ``values[r, :]`` (``k`` clipped to
/// ``[0, n]``); ties go to the lower index first, NaN ranks below every number. This is the
/// first ``k[r]`` entries of numpy's ``argsort(-values[r], kind="stable")``.
/// values: [rows, n]; k: [rows]; out: [rows, n]. Parallel over rows.
template <class T>
void top_k_mask(const T* values, int64_t rows, int64_t n, const int64_t* k, uint8_t* out);

extern template void top_k_mask<float>(const float*, int64_t, int64_t, const int64_t*, uint8_t*);
extern template void top_k_mask<double>(const double*, int64_t, int64_t, const int64_t*,
                                        uint8_t*);
extern template void top_k_mask<int64_t>(const int64_t*, int64_t, int64_t, const int64_t*,
                                         uint8_t*);

/// dist[a, l, m] = Hamming distance of vectors[l, m, :] to anchors[a, l, :].
/// vectors: [L, M, D]; anchors: [A, L, D]; dist: [A, L, M]. Parallel over layers.
void hamming(const uint8_t* vectors, const uint8_t* anchors, int64_t num_anchors,
             int64_t num_layers, int64_t m, int64_t d, int64_t* dist);

/// The anchor kinds of KVCrush (``KVCrush.anchor``).
enum class AnchorKind { kRandom, kZeros, kOnes, kMean, kAlternating };

/// "random, zeros, ones, mean, alternating": what ``anchor`` allows.
const char* anchor_kinds();

/// Parses an anchor name; throws std::invalid_argument naming ``anchor`` for anything else.
AnchorKind parse_anchor(std::string_view name);

/// out[l, :] = the anchor of layer l (D bits).
/// zeros / ones / alternating (0101... starting with 0): constant; mean: the strict majority bit
/// of each coordinate over the layer's valid units (a tie gives 0); random: ``random_bits``
/// [L, D] as given (drawn by the caller, so that its random stream decides them).
/// vectors: [L, M, D]; valid: [L, M]; random_bits: [L, D] (only read for kRandom, may be null
/// otherwise; null for kRandom throws). Parallel over layers.
void make_anchor(AnchorKind kind, const uint8_t* vectors, const uint8_t* valid,
                 int64_t num_layers, int64_t m, int64_t d, const uint8_t* random_bits,
                 uint8_t* out);

/// ``floor((2 i + 1) n / (2 k))``: the i-th of k even-stride picks in a list of n (the middle
/// of the i-th of k equal buckets; distinct and increasing in i for 0 <= i < k <= n).
inline int64_t stride_index(int64_t n, int64_t k, int64_t i) {
  return ((2 * i + 1) * n) / (k > 0 ? 2 * k : 1);
}

/// out[g] = ``total`` split over groups of ``sizes[g]`` (g < A) in proportion to size: floors
/// of ``total * size / sum(sizes)``, then one more to the largest remainders (ties: first
/// group). Never above a group's size when ``total <= sum(sizes)``.
void split_largest_remainder(int64_t total, const int64_t* sizes, int64_t num_groups,
                             int64_t* out);

/// chosen[l, m] = 1 on ``min(k[l], valid units)`` representatives of every layer: each valid
/// unit joins the group of its nearest anchor (ties: first anchor), ``k[l]`` is split over the
/// groups by split_largest_remainder, and inside a group the units sorted by (distance to the
/// group's anchor, index) are taken at stride_index.
/// vectors: [L, M, D]; valid: [L, M]; anchors: [A, L, D]; k: [L] (>= 0); chosen: [L, M].
/// Parallel over layers.
void pick_representatives(const uint8_t* vectors, const uint8_t* valid, const uint8_t* anchors,
                          const int64_t* k, int64_t num_anchors, int64_t num_layers, int64_t m,
                          int64_t d, uint8_t* chosen);

}  // namespace kvcrush
