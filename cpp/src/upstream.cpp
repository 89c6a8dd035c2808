#include "kvcrush/upstream.hpp"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace kvcrush {

namespace {

[[noreturn]] void invalid(const std::string& message) { throw std::invalid_argument(message); }

/// numpy's max over a window: NaN wins (a row without NaN takes the vectorizable loop).
template <class T>
void max_pool_impl(const T* x, int64_t n, int64_t window, T* out) {
  if (n <= 0) return;
  std::copy(x, x + n, out);
  if (window <= 1) return;
  bool has_nan = false;
  for (int64_t i = 0; i < n; ++i) has_nan |= x[i] != x[i];
  if (!has_nan) {
    for (int64_t j = 1; j < window && j < n; ++j)  // out[i] = max(out[i], x[i + j])
      for (int64_t i = 0; i < n - j; ++i) out[i] = x[i + j] > out[i] ? x[i + j] : out[i];
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    T m = x[i];
    const int64_t end = std::min(n, i + window);
    for (int64_t j = i + 1; j < end && m == m; ++j)
      if (x[j] > m || x[j] != x[j]) m = x[j];
    out[i] = m;
  }
}

/// numpy's sort order on doubles: NaN after everything, then the index.
inline bool score_index_less(double a, int64_t i, double b, int64_t j) {
  const bool an = a != a, bn = b != b;
  if (an != bn) return bn;
  if (!an && a != b) return a < b;
  return i < j;
}

}  // namespace

void validate(const UpstreamConfig& c) {
  const int64_t b = c.block_size;
  if (b < 1) invalid("block_size=" + std::to_string(b) + " must be >= 1");
  const std::pair<const char*, int64_t> sizes[] = {
      {"start_size", c.start_size}, {"recent_size", c.recent_size},
      {"max_cache_size", c.max_cache_size}};
  for (const auto& [name, v] : sizes)
    if (v <= 0 || v % b)
      invalid(std::string(name) + "=" + std::to_string(v) +
              " must be a non-zero multiple of block_size=" + std::to_string(b));
  if (c.max_cache_size <= c.start_size + c.recent_size)
    invalid("max_cache_size must be larger than start_size + recent_size");
  if (c.snapkv_window_size < 0 || c.kvcrush_budget < 0)
    invalid("snapkv_window_size, kvcrush_budget and kvcrush_seed must be >= 0");
  if (c.max_pool_window_size < 1) invalid("max_pool_window_size must be >= 1");
}

int64_t score_aggregation_window(int64_t prompt_len, int64_t num_processed_tokens,
                                 int64_t num_scheduled_tokens, int64_t snapkv_window_size) {
  if (snapkv_window_size == 0) return num_scheduled_tokens;
  const int64_t first_scored = std::max<int64_t>(prompt_len - snapkv_window_size, 0);
  const int64_t after = num_processed_tokens + num_scheduled_tokens;
  if (after <= first_scored) return 0;
  if (num_processed_tokens > first_scored) return num_scheduled_tokens;
  return after - first_scored;
}

void upstream_max_pool(const float* x, int64_t n, int64_t window, float* out) {
  max_pool_impl(x, n, window, out);
}

void upstream_max_pool(const double* x, int64_t n, int64_t window, double* out) {
  max_pool_impl(x, n, window, out);
}

std::vector<int64_t> lowest_blocks(const double* s, int64_t n, int64_t k) {
  if (k < 0 || k > n)
    throw UpstreamError("cannot evict " + std::to_string(k) + " of " + std::to_string(n) +
                        " blocks");
  std::vector<int64_t> idx(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) idx[static_cast<size_t>(i)] = i;
  // the set of the k smallest (score, index) pairs is unique: any selection algorithm will do
  if (k < n)
    std::nth_element(idx.begin(), idx.begin() + k, idx.end(), [s](int64_t i, int64_t j) {
      return score_index_less(s[i], i, s[j], j);
    });
  idx.resize(static_cast<size_t>(k));
  std::sort(idx.begin(), idx.end());
  return idx;
}

void libstdcxx_partial_sort_top(const double* values, int64_t n, int64_t k, uint8_t* mask) {
  std::fill(mask, mask + std::max<int64_t>(n, 0), uint8_t{0});
  if (k <= 0) return;
  if (k >= n) {
    std::fill(mask, mask + n, uint8_t{1});
    return;
  }
  std::vector<int64_t> idx(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) idx[static_cast<size_t>(i)] = i;
  auto greater = [values](int64_t i, int64_t j) { return values[i] > values[j]; };
  detail::heap_select(idx.data(), idx.data() + k, idx.data() + n, greater);
  for (int64_t i = 0; i < k; ++i) mask[idx[static_cast<size_t>(i)]] = 1;
}

// ---- UpstreamScoreState

UpstreamScoreState::UpstreamScoreState(int64_t num_layers, int64_t block_size,
                                       Aggregation aggregation, int64_t ignore_first_n_blocks,
                                       int64_t snapkv_window_size, int64_t max_pool_window_size)
    : block_size_(block_size),
      aggregation_(aggregation),
      ignore_first_n_blocks_(ignore_first_n_blocks),
      snapkv_window_size_(snapkv_window_size),
      max_pool_window_size_(max_pool_window_size),
      scores_(static_cast<size_t>(std::max<int64_t>(num_layers, 0))),
      counters_(static_cast<size_t>(std::max<int64_t>(num_layers, 0))) {
  if (num_layers < 1) invalid("num_layers must be >= 1");
  if (block_size < 1) invalid("block_size=" + std::to_string(block_size) + " must be >= 1");
  if (ignore_first_n_blocks < 0 || snapkv_window_size < 0)
    invalid("ignore_first_n_blocks and snapkv_window_size must be >= 0");
  if (max_pool_window_size < 1) invalid("max_pool_window_size must be >= 1");
}

void UpstreamScoreState::update(const std::vector<const float*>& scores,
                                const std::vector<int64_t>& lengths, int64_t num_snapkv_scores) {
  if (scores.size() != scores_.size() || lengths.size() != scores_.size())
    invalid("expected " + std::to_string(scores_.size()) + " layers, got " +
            std::to_string(scores.size()));
  const int64_t w = snapkv_window_size_;
  if (num_registered_snapkv_scores < w) {
    if (num_snapkv_scores + num_registered_snapkv_scores > w)
      throw UpstreamError("Total number of aggregated SnapKV scores during prefill phase may "
                          "not be larger than the configured SnapKV window size");
    num_registered_snapkv_scores += num_snapkv_scores;
  }
  const int64_t skip = ignore_first_n_blocks_ * block_size_;
  for (size_t layer = 0; layer < scores_.size(); ++layer) {
    const int64_t size = lengths[layer];
    if (size <= skip) return;  // GenAI returns from the whole call
    const int64_t t = size - skip;
    pooled_.resize(static_cast<size_t>(t));
    upstream_max_pool(scores[layer] + skip, t, max_pool_window_size_, pooled_.data());
    if (scores_[layer].empty())
      initial(layer, pooled_, num_snapkv_scores);
    else
      accumulate(layer, pooled_);
  }
}

void UpstreamScoreState::initial(size_t layer, const std::vector<float>& pooled, int64_t n) {
  const int64_t w = snapkv_window_size_;
  if (w != 0 && n == 0) return;  // before the SnapKV window: nothing meaningful yet
  const auto size = static_cast<int64_t>(pooled.size());
  scores_[layer].assign(pooled.begin(), pooled.end());
  if (aggregation_ != Aggregation::kNormSum) return;
  std::vector<int64_t> counter(static_cast<size_t>(size));
  if (w == 0) {
    for (int64_t i = 0; i < size; ++i) counter[static_cast<size_t>(i)] = size - i;
  } else {
    if (size < n)
      throw UpstreamError("Check 'new_scores_size >= num_snapkv_scores' failed (" +
                          std::to_string(size) + " tracked tokens, " + std::to_string(n) +
                          " SnapKV scores)");
    for (int64_t i = 0; i < size; ++i)
      counter[static_cast<size_t>(i)] = i < size - n ? n : size - i;
  }
  counters_[layer] = std::move(counter);
}

void UpstreamScoreState::accumulate(size_t layer, const std::vector<float>& pooled) {
  std::vector<double>& acc = scores_[layer];
  const auto old_size = static_cast<int64_t>(acc.size());
  const auto new_size = static_cast<int64_t>(pooled.size());
  if (new_size < old_size)
    throw UpstreamError("scores shrank from " + std::to_string(old_size) + " to " +
                        std::to_string(new_size) + " tokens");
  acc.resize(static_cast<size_t>(new_size), 0.0);
  for (size_t i = 0; i < pooled.size(); ++i) acc[i] += static_cast<double>(pooled[i]);
  if (aggregation_ != Aggregation::kNormSum) return;
  // counters: lifetime of every token (GenAI's adjust for new tokens / the SnapKV window)
  const int64_t reg = num_registered_snapkv_scores, w = snapkv_window_size_;
  const bool filling = w != 0 && reg != w;  // the SnapKV window is still being registered
  if (filling && new_size < reg)
    throw UpstreamError(
        "Check 'new_size_in_tokens >= m_num_registered_snapkv_aggregated_scores' failed (" +
        std::to_string(new_size) + " tracked tokens, " + std::to_string(reg) +
        " SnapKV scores)");
  std::vector<int64_t>& counter = counters_[layer];
  counter.resize(static_cast<size_t>(new_size), 0);
  const int64_t num_new = new_size - old_size;
  if (!filling) {
    for (int64_t i = 0; i < old_size; ++i) counter[static_cast<size_t>(i)] += num_new;
    for (int64_t i = old_size; i < new_size; ++i)
      counter[static_cast<size_t>(i)] = num_new - (i - old_size);
  } else {
    for (int64_t i = 0; i < new_size; ++i)
      counter[static_cast<size_t>(i)] = i < new_size - reg ? reg : new_size - i;
  }
}

void UpstreamScoreState::normalised(int64_t layer, double* out) const {
  const std::vector<double>& s = scores(layer);
  if (aggregation_ != Aggregation::kNormSum) {
    std::copy(s.begin(), s.end(), out);
    return;
  }
  const std::vector<int64_t>& c = counters(layer);
  if (c.size() != s.size())
    throw UpstreamError("scores and counters of layer " + std::to_string(layer) +
                        " differ in length (" + std::to_string(s.size()) + ", " +
                        std::to_string(c.size()) + ")");
  for (size_t i = 0; i < s.size(); ++i) out[i] = s[i] / static_cast<double>(c[i]);
}

void UpstreamScoreState::remove_blocks(int64_t layer, const std::vector<int64_t>& blocks) {
  if (blocks.empty()) return;
  std::vector<double>& s = scores_.at(static_cast<size_t>(layer));
  std::vector<int64_t>& c = counters_[static_cast<size_t>(layer)];
  const bool norm = aggregation_ == Aggregation::kNormSum;
  const auto n = static_cast<int64_t>(s.size());
  std::vector<uint8_t> keep(static_cast<size_t>(n), 1);
  for (int64_t b : blocks) {
    if (b < 0 || b * block_size_ >= n)
      invalid("tracked block " + std::to_string(b) + " out of range (" + std::to_string(n) +
              " tracked tokens)");
    const int64_t end = std::min(n, (b + 1) * block_size_);
    for (int64_t i = b * block_size_; i < end; ++i) keep[static_cast<size_t>(i)] = 0;
  }
  size_t out = 0;
  for (size_t i = 0; i < keep.size(); ++i) {
    if (!keep[i]) continue;
    s[out] = s[i];
    if (norm && i < c.size()) c[out] = c[i];
    ++out;
  }
  s.resize(out);
  if (norm) c.resize(std::min(out, c.size()));
}

void UpstreamScoreState::set_layer(int64_t layer, std::vector<double> scores,
                                   std::vector<int64_t> counters) {
  if (layer < 0 || layer >= num_layers())
    invalid("layer=" + std::to_string(layer) + ": allowed 0 .. " +
            std::to_string(num_layers() - 1));
  if (aggregation_ == Aggregation::kNormSum ? counters.size() != scores.size()
                                            : !counters.empty())
    invalid("counters: allowed one per score with norm_sum, none with sum");
  scores_[static_cast<size_t>(layer)] = std::move(scores);
  counters_[static_cast<size_t>(layer)] = std::move(counters);
}

// ---- UpstreamKVCrush

UpstreamKVCrush::UpstreamKVCrush(int64_t budget, AnchorKind anchor, int64_t block_size,
                                 uint32_t seed)
    : budget_(budget), anchor_(anchor), block_size_(block_size), rng_(seed) {
  if (block_size < 1) invalid("block_size=" + std::to_string(block_size) + " must be >= 1");
}

std::vector<uint8_t> UpstreamKVCrush::indicators(const double* raw_scores, int64_t num_tokens) {
  std::vector<uint8_t> ind(static_cast<size_t>(std::max<int64_t>(num_tokens, 0)));
  libstdcxx_partial_sort_top(raw_scores, num_tokens, num_tokens / 2, ind.data());
  return ind;
}

std::vector<uint8_t> UpstreamKVCrush::anchor(const std::vector<uint8_t>& ind) {
  const int64_t b = block_size_;
  std::vector<uint8_t> a(static_cast<size_t>(b), 0);
  switch (anchor_) {
    case AnchorKind::kZeros:
      break;
    case AnchorKind::kOnes:
      std::fill(a.begin(), a.end(), uint8_t{1});
      break;
    case AnchorKind::kAlternating:
      for (int64_t j = 0; j < b; ++j) a[static_cast<size_t>(j)] = static_cast<uint8_t>(j % 2);
      break;
    case AnchorKind::kMean: {
      const auto nb = static_cast<int64_t>(ind.size()) / b;
      for (int64_t j = 0; j < b; ++j) {
        int64_t sum = 0;
        for (int64_t i = 0; i < nb; ++i) sum += ind[static_cast<size_t>(i * b + j)];
        a[static_cast<size_t>(j)] =
            static_cast<double>(sum) / static_cast<double>(nb) > 0.5 ? 1 : 0;
      }
      break;
    }
    case AnchorKind::kRandom:
      // std::uniform_int_distribution<int>(0, 1) of libstdc++ >= 11: the top bit of one draw
      for (int64_t j = 0; j < b; ++j) a[static_cast<size_t>(j)] = static_cast<uint8_t>(rng_() >> 31);
      break;
  }
  return a;
}

std::vector<int64_t> UpstreamKVCrush::hamming(const std::vector<uint8_t>& ind,
                                              const std::vector<uint8_t>& anchor) const {
  const int64_t b = block_size_;
  const auto nb = static_cast<int64_t>(ind.size()) / b;
  if (static_cast<int64_t>(anchor.size()) != b)
    invalid("anchor: allowed " + std::to_string(b) + " bits");
  std::vector<int64_t> d(static_cast<size_t>(nb), 0);
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t j = 0; j < b; ++j)
      d[static_cast<size_t>(i)] += (ind[static_cast<size_t>(i * b + j)] != 0) !=
                                   (anchor[static_cast<size_t>(j)] != 0);
  return d;
}

std::vector<int64_t> UpstreamKVCrush::representatives(const std::vector<int64_t>& distances,
                                                      const std::vector<int64_t>& eligible) const {
  const auto n = static_cast<int64_t>(distances.size());
  std::vector<uint8_t> chosen(static_cast<size_t>(n), 0);
  for (int64_t e : eligible)
    if (e >= 0 && e < n) chosen[static_cast<size_t>(e)] = 1;
  std::vector<int64_t> filtered;
  for (int64_t i = 0; i < n; ++i)
    if (chosen[static_cast<size_t>(i)]) filtered.push_back(i);
  if (filtered.empty() || budget_ <= 0) return {};
  const std::vector<int64_t> order =
      libstdcxx_sort(static_cast<int64_t>(filtered.size()), [&](int64_t a, int64_t b) {
        return distances[static_cast<size_t>(filtered[static_cast<size_t>(a)])] <
               distances[static_cast<size_t>(filtered[static_cast<size_t>(b)])];
      });
  const auto len = static_cast<int64_t>(order.size());
  const int64_t k = std::min(len, budget_);
  const int64_t step = len / k;
  std::vector<int64_t> out(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i)
    out[static_cast<size_t>(i)] = filtered[static_cast<size_t>(order[static_cast<size_t>(i * step)])];
  return out;
}

std::vector<int64_t> UpstreamKVCrush::retain(int64_t num_tokens,
                                             const std::vector<int64_t>& evicted,
                                             const double* raw_scores) {
  const std::vector<uint8_t> ind = indicators(raw_scores, num_tokens);
  const std::vector<uint8_t> a = anchor(ind);
  return representatives(hamming(ind, a), evicted);
}

// ---- UpstreamCacheEviction

namespace {

const UpstreamConfig& validated(const UpstreamConfig& cfg) {
  validate(cfg);
  return cfg;
}

}  // namespace

UpstreamCacheEviction::UpstreamCacheEviction(const UpstreamConfig& cfg, int64_t num_layers)
    : cfg_(validated(cfg)),
      state_(num_layers, cfg.block_size, cfg.aggregation, cfg.start_blocks(),
             cfg.snapkv_window_size, cfg.max_pool_window_size),
      kvcrush_(cfg.kvcrush_budget, cfg.kvcrush_anchor, cfg.block_size, cfg.kvcrush_seed) {}

std::pair<int64_t, int64_t> UpstreamCacheEviction::evictable_block_range(int64_t layer) const {
  const int64_t length = cfg_.start_size + state_.tracked_tokens(layer);
  if (length <= cfg_.max_cache_size_after_eviction()) return {0, 0};
  return {cfg_.start_blocks(), length / cfg_.block_size - cfg_.recent_blocks()};
}

int64_t UpstreamCacheEviction::num_blocks_to_evict(int64_t layer) const {
  const auto [begin, end] = evictable_block_range(layer);
  return std::max<int64_t>(end - begin - cfg_.evictable_blocks(), 0);
}

std::vector<double> UpstreamCacheEviction::block_scores(int64_t layer) const {
  const auto [begin, end] = evictable_block_range(layer);
  const int64_t nb = end - begin, b = cfg_.block_size;
  if (nb <= 0) return {};
  std::vector<double> vals(static_cast<size_t>(state_.tracked_tokens(layer)));
  state_.normalised(layer, vals.data());
  if (static_cast<int64_t>(vals.size()) < nb * b)
    invalid("layer " + std::to_string(layer) + " tracks fewer tokens than its blocks");
  std::vector<double> out(static_cast<size_t>(nb));
  for (int64_t i = 0; i < nb; ++i) {
    double sum = 0.0;  // sequential, as GenAI (and numpy's cumsum)
    for (int64_t j = 0; j < b; ++j) sum += vals[static_cast<size_t>(i * b + j)];
    out[static_cast<size_t>(i)] = sum;
  }
  return out;
}

std::vector<std::vector<int64_t>> UpstreamCacheEviction::evict() {
  const int64_t layers = num_layers();
  std::vector<std::vector<int64_t>> out(static_cast<size_t>(layers));
  for (int64_t layer = 0; layer < layers; ++layer) {
    if (cfg_.start_size + state_.tracked_tokens(layer) <= cfg_.max_cache_size_after_eviction())
      continue;
    const std::vector<double> scores = block_scores(layer);
    const auto nb = static_cast<int64_t>(scores.size());
    std::vector<int64_t> evicted = lowest_blocks(scores.data(), nb, num_blocks_to_evict(layer));
    if (kvcrush_.applies(static_cast<int64_t>(evicted.size()))) {
      const std::vector<int64_t> kept =
          kvcrush_.retain(nb * cfg_.block_size, evicted, state_.scores(layer).data());
      evicted.erase(std::remove_if(evicted.begin(), evicted.end(),
                                   [&](int64_t e) {
                                     return std::find(kept.begin(), kept.end(), e) != kept.end();
                                   }),
                    evicted.end());
    }
    num_evicted_tokens += static_cast<int64_t>(evicted.size()) * cfg_.block_size;
    state_.remove_blocks(layer, evicted);
    for (int64_t& e : evicted) e += cfg_.start_blocks();
    out[static_cast<size_t>(layer)] = std::move(evicted);
  }
  return out;
}

std::vector<std::vector<int64_t>> UpstreamCacheEviction::step(
    const std::vector<const float*>& scores, const std::vector<int64_t>& lengths,
    int64_t prompt_len, int64_t num_processed_tokens, int64_t num_scheduled_tokens) {
  update(scores, lengths, window(prompt_len, num_processed_tokens, num_scheduled_tokens));
  if (num_processed_tokens < prompt_len)
    return std::vector<std::vector<int64_t>>(static_cast<size_t>(num_layers()));
  return evict();
}

// ---- the stateless policy

std::vector<uint8_t> upstream_shared_layers(const Candidates& c) {
  std::vector<uint8_t> shared(static_cast<size_t>(c.num_layers), 1);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const int64_t* len = c.lengths + l * c.num_heads;
    const int64_t* pos0 = c.positions + l * c.num_heads * c.n;
    for (int64_t h = 1; h < c.num_heads && shared[static_cast<size_t>(l)]; ++h) {
      if (len[h] != len[0] ||
          !std::equal(pos0, pos0 + len[0], c.positions + (l * c.num_heads + h) * c.n))
        shared[static_cast<size_t>(l)] = 0;
    }
  }
  return shared;
}

namespace {

/// keep [m] of one group (UpstreamEviction._select_one).
void select_one(const UpstreamPolicy& p, const std::vector<double>& scores,
                const std::vector<double>& counts, int64_t num_keep, int64_t block_size,
                uint32_t seed, uint8_t* keep) {
  const auto n = static_cast<int64_t>(scores.size());
  std::fill(keep, keep + n, uint8_t{0});
  if (num_keep <= 0) return;
  std::vector<double> pooled(static_cast<size_t>(n));
  upstream_max_pool(scores.data(), n, p.pool_window, pooled.data());
  std::vector<double> vals(pooled);
  if (p.aggregation == Aggregation::kNormSum)
    for (int64_t i = 0; i < n; ++i)
      vals[static_cast<size_t>(i)] /= std::max(counts[static_cast<size_t>(i)], 1.0);
  const int64_t nb = n / block_size, tail = n - nb * block_size;
  if (num_keep <= tail) {
    std::fill(keep + n - num_keep, keep + n, uint8_t{1});
    return;
  }
  std::fill(keep + nb * block_size, keep + n, uint8_t{1});
  const int64_t whole = (num_keep - tail) / block_size, rem = (num_keep - tail) % block_size;
  if (nb == 0) return;
  std::vector<double> block_scores(static_cast<size_t>(nb));
  for (int64_t i = 0; i < nb; ++i) {
    double sum = 0.0;
    for (int64_t j = 0; j < block_size; ++j) sum += vals[static_cast<size_t>(i * block_size + j)];
    block_scores[static_cast<size_t>(i)] = sum;
  }
  const int64_t budget = std::min(p.kvcrush_budget, whole);
  std::vector<int64_t> evicted = lowest_blocks(block_scores.data(), nb, nb - whole + budget);
  UpstreamKVCrush crush(budget, p.kvcrush_anchor, block_size, seed);
  if (crush.applies(static_cast<int64_t>(evicted.size()))) {
    const std::vector<int64_t> kept = crush.retain(nb * block_size, evicted, pooled.data());
    evicted.erase(std::remove_if(evicted.begin(), evicted.end(),
                                 [&](int64_t e) {
                                   return std::find(kept.begin(), kept.end(), e) != kept.end();
                                 }),
                  evicted.end());
  }
  std::vector<uint8_t> dropped(static_cast<size_t>(nb), 0);
  for (int64_t e : evicted) dropped[static_cast<size_t>(e)] = 1;
  for (int64_t b = 0; b < nb; ++b)
    if (!dropped[static_cast<size_t>(b)])
      std::fill(keep + b * block_size, keep + (b + 1) * block_size, uint8_t{1});
  if (rem == 0) return;
  // the best evicted block by (score, index) gives its rem best tokens (ties: the later)
  int64_t best = evicted.front();
  for (int64_t e : evicted)
    if (!score_index_less(block_scores[static_cast<size_t>(e)], e,
                          block_scores[static_cast<size_t>(best)], best))
      best = e;
  std::vector<int64_t> order(static_cast<size_t>(block_size));
  for (int64_t j = 0; j < block_size; ++j) order[static_cast<size_t>(j)] = j;
  const double* part = vals.data() + best * block_size;
  std::stable_sort(order.begin(), order.end(), [part](int64_t i, int64_t j) {
    return score_index_less(-part[i], -i, -part[j], -j);
  });
  for (int64_t j = 0; j < rem; ++j) keep[best * block_size + order[static_cast<size_t>(j)]] = 1;
}

}  // namespace

void upstream_select(const UpstreamPolicy& p, const Candidates& c, int64_t num_keep,
                     const uint32_t* seeds, uint8_t* keep) {
  if (p.kvcrush_budget < 0 || p.pool_window < 1)
    invalid("kvcrush_budget must be >= 0 and pool_window >= 1");
  if (c.block_size < 1) invalid("block_size=" + std::to_string(c.block_size) + " must be >= 1");
  const int64_t H = c.num_heads, N = c.n;
  std::fill(keep, keep + c.num_layers * H * N, uint8_t{0});
  const std::vector<uint8_t> shared = upstream_shared_layers(c);
  std::vector<double> sc, ct;
  std::vector<uint8_t> mask;
  int64_t group = 0;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const bool one = shared[static_cast<size_t>(l)] != 0;
    const int64_t groups = one ? 1 : H;
    for (int64_t g = 0; g < groups; ++g, ++group) {
      const int64_t h0 = one ? 0 : g, nh = one ? H : 1;
      const int64_t m = c.lengths[l * H + h0];
      if (num_keep > m)
        invalid("num_keep=" + std::to_string(num_keep) + " > " + std::to_string(m) +
                " candidates");
      sc.assign(static_cast<size_t>(m), 0.0);
      ct.assign(static_cast<size_t>(m), 0.0);
      for (int64_t h = h0; h < h0 + nh; ++h) {  // numpy's sum over heads: one head at a time
        const float* s = c.scores + (l * H + h) * N;
        const float* k = c.counts + (l * H + h) * N;
        for (int64_t i = 0; i < m; ++i) {
          sc[static_cast<size_t>(i)] += static_cast<double>(s[i]);
          ct[static_cast<size_t>(i)] += static_cast<double>(k[i]);
        }
      }
      for (double& v : ct) v /= static_cast<double>(nh);
      mask.resize(static_cast<size_t>(m));
      select_one(p, sc, ct, num_keep, c.block_size, seeds[group], mask.data());
      for (int64_t h = h0; h < h0 + nh; ++h)
        std::copy(mask.begin(), mask.end(), keep + (l * H + h) * N);
    }
  }
}

}  // namespace kvcrush
