#include "kvcrush/selection.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kvcrush/parallel.hpp"

namespace kvcrush {

namespace {

/// Order-preserving unsigned keys: a larger value has a larger key; -0.0 and 0.0 share one
/// key (numpy ranks them as ties) and every NaN has key 0, below every number. Branch-free, so
/// the loops over a row vectorize.
inline uint32_t rank_key(float x) {
  const float y = x + 0.0f;  // -0.0 -> +0.0
  int32_t i;
  std::memcpy(&i, &y, sizeof(i));
  const auto key = static_cast<uint32_t>(i) ^ (static_cast<uint32_t>(i >> 31) | 0x80000000u);
  return y != y ? 0u : key;  // NaN
}

inline uint64_t rank_key(double x) {
  const double y = x + 0.0;
  int64_t i;
  std::memcpy(&i, &y, sizeof(i));
  const auto key = static_cast<uint64_t>(i) ^ (static_cast<uint64_t>(i >> 63) |
                                               0x8000000000000000ull);
  return y != y ? 0u : key;
}

inline uint64_t rank_key(int64_t x) {
  return static_cast<uint64_t>(x) ^ 0x8000000000000000ull;
}

template <class T>
using KeyOf = decltype(rank_key(T{}));

/// Reusable buffers of one thread's rows.
template <class Key>
struct TopKScratch {
  std::vector<Key> keys, candidates;
};

/// out[j] = 1 on the k (0 < k < n) entries of v with the largest keys, ties in index order.
/// The k-th largest key by a most-significant-digit radix select (8-bit digits from the first
/// one where the keys differ; the candidates left are compacted after every digit), then the
/// keys above it and the first of its ties: no comparison-driven branching, fast on any
/// distribution of scores.
template <class T>
void top_k_row(const T* v, int64_t n, int64_t k, uint8_t* out, TopKScratch<KeyOf<T>>& scratch) {
  using Key = KeyOf<T>;
  constexpr int kBits = 8 * static_cast<int>(sizeof(Key));
  std::vector<Key>& keys = scratch.keys;
  keys.resize(n);
  Key lo = ~Key{0}, hi = 0;
  for (int64_t j = 0; j < n; ++j) {
    const Key key = rank_key(v[j]);
    keys[j] = key;
    lo = std::min(lo, key);
    hi = std::max(hi, key);
  }
  // Digits above the highest bit where lo and hi differ are the same in every key.
  int top = -1;
  for (Key diff = lo ^ hi; diff != 0; diff >>= 1) ++top;
  const int start = top < 0 ? -1 : top / 8 * 8;  // shift of the first digit that differs
  Key kth = hi;  // all keys are equal when start < 0
  if (start >= 0) kth = start + 8 >= kBits ? Key{0} : (hi >> (start + 8)) << (start + 8);
  int64_t need = k;  // rank of the k-th largest among the candidates left (1 = the largest)
  const Key* cand = keys.data();
  int64_t m = n;
  std::vector<Key>& left = scratch.candidates;
  left.resize(n);
  for (int shift = start; shift >= 0; shift -= 8) {
    int64_t hist[4][256] = {};  // four interleaved counts: no chain of dependent increments
    int64_t i = 0;
    for (; i + 4 <= m; i += 4)
      for (int u = 0; u < 4; ++u) ++hist[u][(cand[i + u] >> shift) & 0xFF];
    for (; i < m; ++i) ++hist[0][(cand[i] >> shift) & 0xFF];
    int digit = 255;
    auto count = [&](int d) { return hist[0][d] + hist[1][d] + hist[2][d] + hist[3][d]; };
    while (count(digit) < need) need -= count(digit--);
    kth |= static_cast<Key>(digit) << shift;
    if (shift == 0) break;
    int64_t w = 0;
    for (i = 0; i < m; ++i) {
      left[w] = cand[i];
      w += static_cast<int>((cand[i] >> shift) & 0xFF) == digit ? 1 : 0;
    }
    cand = left.data();
    m = w;
  }
  // Every key above kth is taken, and the first ``need`` keys equal to it.
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<uint8_t>(keys[j] > kth);
  for (int64_t j = 0; need > 0 && j < n; ++j)
    if (keys[j] == kth) {
      out[j] = 1;
      --need;
    }
}

/// top_k_row with k clipped to [0, n].
template <class T>
void top_k_clipped(const T* v, int64_t n, int64_t k, uint8_t* out,
                   TopKScratch<KeyOf<T>>& scratch) {
  k = std::clamp<int64_t>(k, 0, n);
  if (k == 0 || k == n) {
    std::fill(out, out + n, static_cast<uint8_t>(k == n ? 1 : 0));
    return;
  }
  top_k_row(v, n, k, out, scratch);
}

void check_dims(std::initializer_list<std::pair<const char*, int64_t>> dims) {
  for (const auto& [name, value] : dims)
    if (value < 0)
      throw std::invalid_argument(std::string(name) + "=" + std::to_string(value) +
                                  ": allowed a size >= 0");
}

}  // namespace

template <class T>
void top_k_mask(const T* values, int64_t rows, int64_t n, const int64_t* k, uint8_t* out) {
  check_dims({{"rows", rows}, {"n", n}});
  parallel_for(rows, n, [&](int64_t r) {
    TopKScratch<KeyOf<T>> scratch;
    top_k_clipped(values + r * n, n, k[r], out + r * n, scratch);
  });
}

template void top_k_mask<float>(const float*, int64_t, int64_t, const int64_t*, uint8_t*);
template void top_k_mask<double>(const double*, int64_t, int64_t, const int64_t*, uint8_t*);
template void top_k_mask<int64_t>(const int64_t*, int64_t, int64_t, const int64_t*, uint8_t*);

namespace {

inline int64_t distance(const uint8_t* a, const uint8_t* b, int64_t d) {
  int64_t s = 0;
  for (int64_t i = 0; i < d; ++i) s += (a[i] ^ b[i]) & 1;
  return s;
}

}  // namespace

void hamming(const uint8_t* vectors, const uint8_t* anchors, int64_t num_anchors,
             int64_t num_layers, int64_t m, int64_t d, int64_t* dist) {
  check_dims({{"anchors", num_anchors}, {"layers", num_layers}, {"units", m}, {"bits", d}});
  parallel_for(num_layers, num_anchors * m * d, [&](int64_t l) {
    for (int64_t a = 0; a < num_anchors; ++a) {
      const uint8_t* anchor = anchors + (a * num_layers + l) * d;
      int64_t* row = dist + (a * num_layers + l) * m;
      for (int64_t j = 0; j < m; ++j) row[j] = distance(vectors + (l * m + j) * d, anchor, d);
    }
  });
}

const char* anchor_kinds() { return "random, zeros, ones, mean, alternating"; }

AnchorKind parse_anchor(std::string_view name) {
  if (name == "random") return AnchorKind::kRandom;
  if (name == "zeros") return AnchorKind::kZeros;
  if (name == "ones") return AnchorKind::kOnes;
  if (name == "mean") return AnchorKind::kMean;
  if (name == "alternating") return AnchorKind::kAlternating;
  throw std::invalid_argument("anchor='" + std::string(name) + "': allowed " + anchor_kinds());
}

void make_anchor(AnchorKind kind, const uint8_t* vectors, const uint8_t* valid,
                 int64_t num_layers, int64_t m, int64_t d, const uint8_t* random_bits,
                 uint8_t* out) {
  check_dims({{"layers", num_layers}, {"units", m}, {"bits", d}});
  if (kind == AnchorKind::kRandom && random_bits == nullptr)
    throw std::invalid_argument("random_bits=None: allowed a bool [L, D] array with "
                                "anchor='random'");
  parallel_for(num_layers, kind == AnchorKind::kMean ? m * d : d, [&](int64_t l) {
    uint8_t* row = out + l * d;
    switch (kind) {
      case AnchorKind::kZeros:
        std::fill(row, row + d, uint8_t{0});
        break;
      case AnchorKind::kOnes:
        std::fill(row, row + d, uint8_t{1});
        break;
      case AnchorKind::kAlternating:
        for (int64_t i = 0; i < d; ++i) row[i] = static_cast<uint8_t>(i % 2);
        break;
      case AnchorKind::kRandom:
        for (int64_t i = 0; i < d; ++i) row[i] = random_bits[l * d + i] ? 1 : 0;
        break;
      case AnchorKind::kMean: {
        std::vector<int64_t> ones(d, 0);
        int64_t count = 0;
        for (int64_t j = 0; j < m; ++j) {
          if (!valid[l * m + j]) continue;
          ++count;
          const uint8_t* v = vectors + (l * m + j) * d;
          for (int64_t i = 0; i < d; ++i) ones[i] += v[i] & 1;
        }
        for (int64_t i = 0; i < d; ++i)
          row[i] = static_cast<uint8_t>(2 * ones[i] > count);
        break;
      }
    }
  });
}

void split_largest_remainder(int64_t total, const int64_t* sizes, int64_t num_groups,
                             int64_t* out) {
  check_dims({{"groups", num_groups}});
  if (total < 0)
    throw std::invalid_argument("total=" + std::to_string(total) + ": allowed an integer >= 0");
  int64_t whole = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    if (sizes[g] < 0)
      throw std::invalid_argument("sizes[" + std::to_string(g) + "]=" +
                                  std::to_string(sizes[g]) + ": allowed an integer >= 0");
    whole += sizes[g];
  }
  whole = std::max<int64_t>(whole, 1);
  std::vector<int64_t> rest(num_groups);
  int64_t given = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t prod = total * sizes[g];
    out[g] = prod / whole;
    rest[g] = prod % whole;
    given += out[g];
  }
  std::vector<uint8_t> more(num_groups);
  TopKScratch<uint64_t> scratch;
  top_k_clipped(rest.data(), num_groups, total - given, more.data(), scratch);
  for (int64_t g = 0; g < num_groups; ++g) out[g] += more[g];
}

void pick_representatives(const uint8_t* vectors, const uint8_t* valid, const uint8_t* anchors,
                          const int64_t* k, int64_t num_anchors, int64_t num_layers, int64_t m,
                          int64_t d, uint8_t* chosen) {
  check_dims({{"anchors", num_anchors}, {"layers", num_layers}, {"units", m}, {"bits", d}});
  if (num_anchors < 1) throw std::invalid_argument("anchors=0: allowed at least one anchor");
  for (int64_t l = 0; l < num_layers; ++l)
    if (k[l] < 0)
      throw std::invalid_argument("k[" + std::to_string(l) + "]=" + std::to_string(k[l]) +
                                  ": allowed an integer >= 0");
  std::fill(chosen, chosen + num_layers * m, uint8_t{0});
  parallel_for(num_layers, num_anchors * m * d, [&](int64_t l) {
    const uint8_t* is_valid = valid + l * m;
    // Nearest anchor (ties: the first) and the distance to it, for every valid unit.
    std::vector<int64_t> dist(m), group(m), sizes(num_anchors, 0), per_group(num_anchors, 0);
    for (int64_t j = 0; j < m; ++j) {
      if (!is_valid[j]) continue;
      const uint8_t* v = vectors + (l * m + j) * d;
      int64_t best = 0;
      int64_t best_dist = distance(v, anchors + l * d, d);
      for (int64_t a = 1; a < num_anchors; ++a) {
        const int64_t dd = distance(v, anchors + (a * num_layers + l) * d, d);
        if (dd < best_dist) {
          best = a;
          best_dist = dd;
        }
      }
      dist[j] = best_dist;
      group[j] = best;
      ++sizes[best];
    }
    int64_t units = 0;
    for (int64_t s : sizes) units += s;
    split_largest_remainder(std::min(k[l], units), sizes.data(), num_anchors, per_group.data());
    // Inside a group: units in (distance, index) order by a counting sort over the distance
    // (0 .. d), then the even-stride picks.
    std::vector<int64_t> start(d + 2), order;
    for (int64_t a = 0; a < num_anchors; ++a) {
      const int64_t picks = per_group[a];
      if (picks <= 0) continue;
      std::fill(start.begin(), start.end(), 0);
      for (int64_t j = 0; j < m; ++j)
        if (is_valid[j] && group[j] == a) ++start[dist[j] + 1];
      for (size_t i = 1; i < start.size(); ++i) start[i] += start[i - 1];
      order.assign(sizes[a], 0);
      for (int64_t j = 0; j < m; ++j)
        if (is_valid[j] && group[j] == a) order[start[dist[j]]++] = j;
      for (int64_t i = 0; i < picks; ++i)
        chosen[l * m + order[stride_index(sizes[a], picks, i)]] = 1;
    }
  });
}

}  // namespace kvcrush
