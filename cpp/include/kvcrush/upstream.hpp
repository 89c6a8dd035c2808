// GenAI's cache eviction (OpenVINO GenAI 2026.4 ``ContinuousBatchingPipeline``), in C++.
//
// Our own implementation (no upstream code copied) of GenAI's CacheEvictionAlgorithm,
// EvictionScoreManager, SnapKVScoreAggregationCalculator and KVCrushAlgorithm, modes SUM and
// NORM_SUM; the specification with file:line citations is docs/upstream-eviction.md and the
// Python API (with the engine's recipe) is kvcrush_ov/eviction/upstream.py.
//
// Units: T tokens, B = block_size tokens per KV block, L decoder layers. Scores are tracked only
// for the tokens after the start area (start_size tokens): "tracked" token t is cache token
// start_size + t and "tracked" block b is logical block start_size / B + b of the sequence's
// current (compacted) block table.
//
// What GenAI's Linux wheels inherit from libstdc++ is reproduced on every standard library:
// std::mt19937 is the standard's; uniform_int_distribution<int>(0, 1) is libstdc++'s (>= 11): the
// top bit of one 32-bit draw; std::sort / std::partial_sort tie orders are libstdc++'s
// (introsort with a final insertion sort, heap selection), re-implemented here.
//
// Typical use, one sequence (what kvcrush_ov.engine.evictor does per forward):
//
//   kvcrush::UpstreamConfig cfg;  // start 32, recent 128, max 672, norm_sum, window 8, B 32
//   kvcrush::UpstreamCacheEviction algo(cfg, num_layers);
//   const int64_t w = algo.window(prompt_len, num_processed, num_scheduled);  // to the model
//   // ... forward; scores[l]: f32 [lengths[l]] the sequence's scores.<l> segment
//   const auto dropped = algo.step(scores, lengths, prompt_len, num_processed, num_scheduled);
//   // dropped[l]: ascending logical blocks to remove from layer l's block table
#pragma once

#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kvcrush/policy.hpp"
#include "kvcrush/selection.hpp"

namespace kvcrush {

/// Where GenAI's eviction code fails an OPENVINO_ASSERT (GenAI's step() throws); the messages
/// are kvcrush_ov.eviction.upstream.UpstreamError's.
class UpstreamError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// GenAI's CacheEvictionConfig (+ KVCrushConfig) and the pipeline's block size. Sizes in tokens
/// except kvcrush_budget (blocks kept ON TOP of max_cache_size).
struct UpstreamConfig {
  int64_t start_size = 32;
  int64_t recent_size = 128;
  int64_t max_cache_size = 672;
  Aggregation aggregation = Aggregation::kNormSum;
  int64_t snapkv_window_size = 8;
  int64_t block_size = 32;
  int64_t kvcrush_budget = 0;
  AnchorKind kvcrush_anchor = AnchorKind::kRandom;
  uint32_t kvcrush_seed = 0;
  int64_t max_pool_window_size = 7;  ///< constexpr MAX_POOL_WINDOW_SIZE in GenAI's pipeline

  int64_t start_blocks() const { return start_size / block_size; }
  int64_t recent_blocks() const { return recent_size / block_size; }
  /// Blocks of the evictable area kept after an eviction: (max - start - recent) / B.
  int64_t evictable_blocks() const {
    return (max_cache_size - start_size - recent_size) / block_size;
  }
  /// Tokens: max_cache_size + B - 1; eviction runs above this.
  int64_t max_cache_size_after_eviction() const { return max_cache_size + block_size - 1; }
};

/// Throws std::invalid_argument with UpstreamConfig.__post_init__'s message for the first
/// invalid field (``start_size=3 must be a non-zero multiple of block_size=2``, ...).
void validate(const UpstreamConfig& cfg);

/// Queries whose attention GenAI sums into scores.L for one forward
/// (SnapKVScoreAggregationCalculator); see kvcrush_ov.eviction.upstream.score_aggregation_window.
int64_t score_aggregation_window(int64_t prompt_len, int64_t num_processed_tokens,
                                 int64_t num_scheduled_tokens, int64_t snapkv_window_size);

/// out [n]: forward-looking max pool, out[i] = max(x[i .. min(i + window, n) - 1]); window <= 1
/// copies. ``out`` may not alias ``x``.
void upstream_max_pool(const float* x, int64_t n, int64_t window, float* out);
void upstream_max_pool(const double* x, int64_t n, int64_t window, double* out);

/// The k smallest (score, index) pairs of block_scores [n], ascending indices (GenAI's
/// nth_element: among equal scores the lower block goes). Throws UpstreamError unless 0 <= k <= n.
std::vector<int64_t> lowest_blocks(const double* block_scores, int64_t n, int64_t k);

/// libstdc++'s std::sort of the indices 0 .. n-1 under ``less(a, b)`` (introsort, unstable above
/// 16 items): the exact order of equal elements GenAI's Linux wheels produce.
template <class Less>
std::vector<int64_t> libstdcxx_sort(int64_t n, Less less);

/// mask [n] (1 = in): the k indices ``std::partial_sort(idx, idx + k, idx + n, v[i] > v[j])``
/// puts first in libstdc++ (heap selection), i.e. the top k with libstdc++'s tie choice.
void libstdcxx_partial_sort_top(const double* values, int64_t n, int64_t k, uint8_t* mask);

/// Per-sequence, per-layer accumulated scores of the tracked tokens (EvictionScoreManager).
/// scores(l): f64 [T_l] accumulated max-pooled scores; counters(l): i64 [T_l] lifetime counters
/// (norm_sum only, else empty); T_l = cache tokens of layer l minus the ignored start blocks.
class UpstreamScoreState {
 public:
  UpstreamScoreState(int64_t num_layers, int64_t block_size, Aggregation aggregation,
                     int64_t ignore_first_n_blocks, int64_t snapkv_window_size,
                     int64_t max_pool_window_size);

  /// register_new_token_scores: scores[l] f32 [lengths[l]] (scores.l of the sequence: every
  /// cached token, this step's included, summed over all query heads and the last
  /// num_snapkv_scores queries). Drops the ignored start blocks, max-pools the rest and adds it
  /// to the running sums. Throws std::invalid_argument for a wrong layer count, UpstreamError
  /// where GenAI asserts.
  void update(const std::vector<const float*>& scores, const std::vector<int64_t>& lengths,
              int64_t num_snapkv_scores);

  /// Drops tracked blocks (ascending indices counted from the end of the start area).
  void remove_blocks(int64_t layer, const std::vector<int64_t>& tracked_blocks);

  /// out [T_l]: scores / counters (norm_sum) or scores (sum).
  void normalised(int64_t layer, double* out) const;

  int64_t tracked_tokens(int64_t layer) const {
    return static_cast<int64_t>(scores_.at(static_cast<size_t>(layer)).size());
  }
  const std::vector<double>& scores(int64_t layer) const {
    return scores_.at(static_cast<size_t>(layer));
  }
  const std::vector<int64_t>& counters(int64_t layer) const {
    return counters_.at(static_cast<size_t>(layer));
  }
  /// Replaces a layer's state (counters empty in sum mode); sizes must agree in norm_sum.
  void set_layer(int64_t layer, std::vector<double> scores, std::vector<int64_t> counters);

  int64_t num_layers() const { return static_cast<int64_t>(scores_.size()); }
  int64_t block_size() const { return block_size_; }
  Aggregation aggregation() const { return aggregation_; }
  int64_t ignore_first_n_blocks() const { return ignore_first_n_blocks_; }
  int64_t snapkv_window_size() const { return snapkv_window_size_; }
  int64_t max_pool_window_size() const { return max_pool_window_size_; }
  int64_t num_registered_snapkv_scores = 0;

 private:
  void initial(size_t layer, const std::vector<float>& pooled, int64_t num_snapkv_scores);
  void accumulate(size_t layer, const std::vector<float>& pooled);

  int64_t block_size_;
  Aggregation aggregation_;
  int64_t ignore_first_n_blocks_;
  int64_t snapkv_window_size_;
  int64_t max_pool_window_size_;
  std::vector<std::vector<double>> scores_;
  std::vector<std::vector<int64_t>> counters_;
  std::vector<float> pooled_;  // update's buffer
};

/// GenAI's KVCrush: keeps ``budget`` of the blocks the score ranking wants to evict. Stateful
/// only through its std::mt19937 (RANDOM anchors draw block_size bits per call). Token arrays
/// are [n] with n = num_evictable_blocks * block_size; block indices are tracked blocks.
class UpstreamKVCrush {
 public:
  UpstreamKVCrush(int64_t budget, AnchorKind anchor, int64_t block_size, uint32_t seed);

  /// GenAI runs KVCrush only if budget > 0 and num_evicted_blocks >= budget.
  bool applies(int64_t num_evicted_blocks) const {
    return budget_ > 0 && num_evicted_blocks >= budget_;
  }
  /// u8 [num_tokens]: 1 for the num_tokens / 2 highest RAW accumulated scores of the first
  /// num_tokens of raw_scores (libstdc++ tie choice).
  static std::vector<uint8_t> indicators(const double* raw_scores, int64_t num_tokens);
  /// u8 [block_size]: the anchor point (random consumes block_size draws).
  std::vector<uint8_t> anchor(const std::vector<uint8_t>& indicators);
  /// i64 [n / block_size]: Hamming distance of each block's indicators to the anchor.
  std::vector<int64_t> hamming(const std::vector<uint8_t>& indicators,
                               const std::vector<uint8_t>& anchor) const;
  /// Tracked blocks to keep: the eligible blocks (ascending) sorted by distance with libstdc++'s
  /// std::sort, then every (len / budget)-th from 0; in that order.
  std::vector<int64_t> representatives(const std::vector<int64_t>& distances,
                                       const std::vector<int64_t>& eligible) const;
  /// representatives(hamming(ind, anchor(ind)), evicted) with ind = indicators(raw, num_tokens).
  std::vector<int64_t> retain(int64_t num_tokens, const std::vector<int64_t>& evicted,
                              const double* raw_scores);

  int64_t budget() const { return budget_; }
  AnchorKind anchor_kind() const { return anchor_; }
  int64_t block_size() const { return block_size_; }
  std::mt19937& rng() { return rng_; }

 private:
  int64_t budget_;
  AnchorKind anchor_;
  int64_t block_size_;
  std::mt19937 rng_;
};

/// GenAI's per-sequence CacheEvictionAlgorithm (SUM / NORM_SUM, optional KVCrush). Logical block
/// indices are positions in the sequence's current block table (after earlier evictions); evict
/// returns the same number of blocks for every layer.
class UpstreamCacheEviction {
 public:
  /// Throws std::invalid_argument for an invalid cfg or num_layers < 1.
  UpstreamCacheEviction(const UpstreamConfig& cfg, int64_t num_layers);

  /// score_aggregation_window to request for this forward (queries).
  int64_t window(int64_t prompt_len, int64_t num_processed_tokens,
                 int64_t num_scheduled_tokens) const {
    return score_aggregation_window(prompt_len, num_processed_tokens, num_scheduled_tokens,
                                    cfg_.snapkv_window_size);
  }
  /// Registers one forward's scores.L (see UpstreamScoreState::update).
  void update(const std::vector<const float*>& scores, const std::vector<int64_t>& lengths,
              int64_t num_snapkv_scores) {
    state_.update(scores, lengths, num_snapkv_scores);
  }
  /// Logical blocks [begin, end) that may be evicted now, (0, 0) if none.
  std::pair<int64_t, int64_t> evictable_block_range(int64_t layer) const;
  /// Blocks the score ranking evicts now: evictable blocks minus evictable_size / B.
  int64_t num_blocks_to_evict(int64_t layer) const;
  /// f64 [num_evictable_blocks]: per block the sequential sum over its tokens of the normalised
  /// score, evictable area only.
  std::vector<double> block_scores(int64_t layer) const;
  /// Per layer, ascending logical blocks to drop now (maybe empty); forgets their scores. Only
  /// after decode forwards (see the module doc of kvcrush_ov.eviction.upstream).
  std::vector<std::vector<int64_t>> evict();
  /// update with this forward's window, then evict if the prompt was complete before it
  /// (num_processed_tokens >= prompt_len), else no blocks.
  std::vector<std::vector<int64_t>> step(const std::vector<const float*>& scores,
                                         const std::vector<int64_t>& lengths,
                                         int64_t prompt_len, int64_t num_processed_tokens,
                                         int64_t num_scheduled_tokens);

  const UpstreamConfig& config() const { return cfg_; }
  int64_t num_layers() const { return state_.num_layers(); }
  UpstreamScoreState& state() { return state_; }
  const UpstreamScoreState& state() const { return state_; }
  UpstreamKVCrush& kvcrush() { return kvcrush_; }
  /// Tokens evicted so far, summed over the layers.
  int64_t num_evicted_tokens = 0;

 private:
  UpstreamConfig cfg_;
  UpstreamScoreState state_;
  UpstreamKVCrush kvcrush_;
};

/// GenAI's block selection in the stateless policy contract (kvcrush_ov.eviction.upstream.
/// UpstreamEviction, whose docstring says how it differs from GenAI).
struct UpstreamPolicy {
  Aggregation aggregation = Aggregation::kNormSum;
  int64_t pool_window = 7;
  int64_t kvcrush_budget = 0;
  AnchorKind kvcrush_anchor = AnchorKind::kRandom;
};

/// shared [L]: 1 where every head of the layer holds head 0's candidates (same count, same
/// positions): the layer is selected once on head-summed scores, else per head.
std::vector<uint8_t> upstream_shared_layers(const Candidates& c);

/// keep: u8 [L, H, N], num_keep per (layer, head) with the keep mask shared by a layer's heads
/// when upstream_shared_layers says so. seeds: u32, one per selection group in order (layer
/// major; 1 group for a shared layer, H otherwise): the mt19937 seed of that group's KVCrush.
/// Throws std::invalid_argument for num_keep above a group's candidates or an invalid policy.
void upstream_select(const UpstreamPolicy& p, const Candidates& c, int64_t num_keep,
                     const uint32_t* seeds, uint8_t* keep);

// ---- template definitions

namespace detail {

// libstdc++'s algorithms (bits/stl_algo.h, bits/stl_heap.h) on an index array
template <class Less>
void adjust_heap(int64_t* a, int64_t hole, int64_t len, int64_t value, Less& less) {
  const int64_t top = hole;
  int64_t child = hole;
  while (child < (len - 1) / 2) {
    child = 2 * (child + 1);
    if (less(a[child], a[child - 1])) --child;
    a[hole] = a[child];
    hole = child;
  }
  if ((len & 1) == 0 && child == (len - 2) / 2) {
    child = 2 * (child + 1);
    a[hole] = a[child - 1];
    hole = child - 1;
  }
  int64_t parent = (hole - 1) / 2;
  while (hole > top && less(a[parent], value)) {
    a[hole] = a[parent];
    hole = parent;
    parent = (hole - 1) / 2;
  }
  a[hole] = value;
}

template <class Less>
void make_heap(int64_t* a, int64_t len, Less& less) {
  if (len < 2) return;
  for (int64_t parent = (len - 2) / 2;; --parent) {
    adjust_heap(a, parent, len, a[parent], less);
    if (parent == 0) return;
  }
}

template <class Less>
void pop_heap(int64_t* a, int64_t len, int64_t* result, Less& less) {
  const int64_t value = *result;
  *result = a[0];
  adjust_heap(a, 0, len, value, less);
}

template <class Less>
void heap_select(int64_t* first, int64_t* middle, int64_t* last, Less& less) {
  make_heap(first, middle - first, less);
  for (int64_t* i = middle; i < last; ++i)
    if (less(*i, *first)) pop_heap(first, middle - first, i, less);
}

template <class Less>
void linear_insert(int64_t* last, Less& less) {
  const int64_t val = *last;
  int64_t* next = last - 1;
  while (less(val, *next)) {
    *last = *next;
    last = next;
    --next;
  }
  *last = val;
}

template <class Less>
void insertion_sort(int64_t* first, int64_t* last, Less& less) {
  if (first == last) return;
  for (int64_t* i = first + 1; i < last; ++i) {
    if (less(*i, *first)) {
      const int64_t val = *i;
      for (int64_t* j = i; j > first; --j) *j = *(j - 1);
      *first = val;
    } else {
      linear_insert(i, less);
    }
  }
}

template <class Less>
void move_median_to_first(int64_t* result, int64_t* x, int64_t* y, int64_t* z, Less& less) {
  int64_t* pick;
  if (less(*x, *y))
    pick = less(*y, *z) ? y : (less(*x, *z) ? z : x);
  else if (less(*x, *z))
    pick = x;
  else
    pick = less(*y, *z) ? z : y;
  std::swap(*result, *pick);
}

template <class Less>
int64_t* unguarded_partition(int64_t* first, int64_t* last, int64_t* pivot, Less& less) {
  while (true) {
    while (less(*first, *pivot)) ++first;
    --last;
    while (less(*pivot, *last)) --last;
    if (!(first < last)) return first;
    std::swap(*first, *last);
    ++first;
  }
}

constexpr int64_t kSortThreshold = 16;  // libstdc++ _S_threshold

template <class Less>
void introsort_loop(int64_t* first, int64_t* last, int64_t depth, Less& less) {
  while (last - first > kSortThreshold) {
    if (depth == 0) {
      heap_select(first, last, last, less);
      for (int64_t* end = last; end - first > 1;) {  // sort_heap
        --end;
        pop_heap(first, end - first, end, less);
      }
      return;
    }
    --depth;
    int64_t* mid = first + (last - first) / 2;
    move_median_to_first(first, first + 1, mid, last - 1, less);
    int64_t* cut = unguarded_partition(first + 1, last, first, less);
    introsort_loop(cut, last, depth, less);
    last = cut;
  }
}

inline int64_t floor_log2(int64_t n) {
  int64_t k = 0;
  while (n > 1) {
    n >>= 1;
    ++k;
  }
  return k;
}

}  // namespace detail

template <class Less>
std::vector<int64_t> libstdcxx_sort(int64_t n, Less less) {
  std::vector<int64_t> a(static_cast<size_t>(n > 0 ? n : 0));
  for (int64_t i = 0; i < n; ++i) a[static_cast<size_t>(i)] = i;
  if (n < 2) return a;
  int64_t* first = a.data();
  int64_t* last = first + n;
  detail::introsort_loop(first, last, 2 * detail::floor_log2(n), less);
  if (n > detail::kSortThreshold) {
    detail::insertion_sort(first, first + detail::kSortThreshold, less);
    for (int64_t* i = first + detail::kSortThreshold; i < last; ++i)
      detail::linear_insert(i, less);
  } else {
    detail::insertion_sort(first, last, less);
  }
  return a;
}

}  // namespace kvcrush
