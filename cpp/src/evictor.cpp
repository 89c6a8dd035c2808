#include "evictor.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

namespace kvcrush {

namespace {

constexpr int64_t kNativeDecodeWindow = 8;  // config.NATIVE_DECODE_WINDOW

using Rows = std::vector<std::vector<std::vector<int64_t>>>;  // [L][H] row indices

/// head_cache_manager.fill_holes: the new row order after keeping the sorted rows ``keep``:
/// kept rows below k stay, the kept rows at or above k fill the holes below k, in order.
std::vector<int64_t> fill_holes(const std::vector<int64_t>& keep) {
  const auto k = static_cast<int64_t>(keep.size());
  const auto stay = std::lower_bound(keep.begin(), keep.end(), k) - keep.begin();
  std::vector<int64_t> order(keep.size());
  std::iota(order.begin(), order.end(), 0);
  if (stay == k) return order;
  std::vector<bool> hole(keep.size(), true);
  for (std::ptrdiff_t i = 0; i < stay; ++i) hole[static_cast<size_t>(keep[static_cast<size_t>(i)])] = false;
  auto next = keep.begin() + stay;
  for (size_t i = 0; i < hole.size(); ++i)
    if (hole[i]) order[i] = *next++;
  return order;
}

}  // namespace

// ---------------------------------------------------------------------- SequenceScores

void SequenceScores::reset(size_t layers, size_t heads) {
  acc.assign(layers, std::vector<std::vector<float>>(heads));
  query_positions.clear();
}

void SequenceScores::add(size_t layer, size_t head, const float* segment, size_t rows) {
  auto& a = acc[layer][head];
  if (a.size() > rows)
    throw std::logic_error("scores of layer " + std::to_string(layer) + " head " +
                           std::to_string(head) + ": fewer rows than accumulated");
  std::vector<float> out(segment, segment + rows);
  for (size_t i = 0; i < a.size(); ++i) out[i] += a[i];
  a = std::move(out);
}

void SequenceScores::compact(const Rows& rows) {
  for (size_t l = 0; l < rows.size(); ++l)
    for (size_t h = 0; h < rows[l].size(); ++h) {
      const auto& a = acc[l][h];
      std::vector<float> kept(rows[l][h].size(), 0.0f);
      for (size_t i = 0; i < kept.size(); ++i) {
        const auto r = static_cast<size_t>(rows[l][h][i]);
        if (r < a.size()) kept[i] = a[r];
      }
      acc[l][h] = std::move(kept);
    }
}

// ---------------------------------------------------------------------- EvictionPlan

EvictionPlan::EvictionPlan(const CacheEvictionConfig& cfg)
    : max_cache_size(cfg.max_cache_size),
      start_size(cfg.start_size),
      recent_size(cfg.recent_tokens()),
      evict_interval(cfg.evict_interval),
      window(cfg.snapkv_window_size),
      continuous(cfg.mode == "continuous"),
      log(cfg.log) {
  if (cfg.apply_rotation)
    throw ConfigError("eviction.apply_rotation", repr(true),
                      "False with backend 'native' (key re-rotation is not implemented)");
  const std::string& imp = cfg.importance;
  if (imp == "upstream" || imp == "kvzip" || imp == "kvzap")
    throw ConfigError("eviction.importance", repr(imp),
                      "one of snapkv, h2o, streaming, pyramidkv, adakv with the C++ pipeline");
  policy.importance = parse_importance(imp);
  policy.aggregation = parse_aggregation(cfg.aggregation_mode);
  policy.pooling = parse_pooling(cfg.pooling.value_or("avg"));  // config.NATIVE_POOLING
  policy.kernel_size = cfg.kernel_size.value_or(31);             // config.NATIVE_KERNEL_SIZE
  policy.offset = cfg.pooling_offset;
  score_mode = imp == "streaming" ? ScoreMode::kNone
               : imp == "h2o"     ? ScoreMode::kAll
                                  : ScoreMode::kWindow;
  policy.kvcrush.reset();
  if (cfg.kvcrush && cfg.kvcrush->budget != 0) {
    const KVCrushConfig& c = *cfg.kvcrush;
    if (c.anchor_point_mode == "random")
      throw ConfigError("kvcrush.anchor_point_mode", repr(c.anchor_point_mode),
                        "one of zeros, ones, mean, alternating with the C++ pipeline (Python "
                        "draws random anchors from numpy's generator)");
    KVCrushOptions o;
    o.share = c.budget;
    o.anchors = {parse_anchor(c.anchor_point_mode)};
    o.granularity = parse_granularity(c.granularity.empty() ? "token" : c.granularity);
    o.dynamic_split = c.dynamic_split;
    o.taper = c.taper.value_or(true);  // config.NATIVE_TAPER (0.125, 0.5): the defaults
    policy.kvcrush = o;
  }
  validate(policy);
  const int64_t w = cfg.decode_window_size.value_or(std::min(kNativeDecodeWindow, evict_interval));
  decode_window = w >= evict_interval ? 0 : w;
}

int64_t EvictionPlan::budget(int64_t prompt_tokens) const {
  CacheEvictionConfig c;
  c.max_cache_size = max_cache_size;
  return std::max(c.total_tokens(prompt_tokens), start_size + recent_size);
}

// ---------------------------------------------------------------------- Evictor

void Evictor::begin(int64_t prompt_tokens) {
  prefill_end_ = prompt_tokens;
  budget_ = plan_.budget(prompt_tokens);
  scores_.reset(static_cast<size_t>(runner_.num_layers()),
                static_cast<size_t>(runner_.num_kv_heads()));
  evictions_ = kvcrush_tokens_ = 0;
  pending_ = false;
  log_.clear();
}

int64_t Evictor::window(const HeadTable& t, int64_t start, int64_t count) const {
  using Mode = EvictionPlan::ScoreMode;
  if (plan_.score_mode == Mode::kNone) return 0;
  const int64_t end = start + count;
  if (start < prefill_end_) {
    if (!plan_.continuous && prefill_end_ <= budget_) return 0;  // nothing will be evicted
    if (plan_.score_mode == Mode::kAll) return count;
    return std::max<int64_t>(0, end - std::max(start, prefill_end_ - plan_.window));
  }
  if (!plan_.continuous) return 0;
  if (plan_.decode_window == 0 || plan_.score_mode != Mode::kWindow) return count;
  // the step at which held tokens reach budget + evict_interval evicts: score it and the
  // decode_window - 1 steps before it
  const double limit = static_cast<double>(budget_ + plan_.evict_interval);
  return t.mean_len() + static_cast<double>(plan_.decode_window) > limit ? count : 0;
}

void Evictor::after_step(HeadTable& t, int64_t start, int64_t count, int64_t window,
                         const std::vector<std::vector<float>>& scores) {
  const int64_t end = start + count;
  if (window > 0) {
    for (size_t l = 0; l < t.positions.size(); ++l) {
      size_t offset = 0;
      for (size_t h = 0; h < t.positions[l].size(); ++h) {
        const auto rows = static_cast<size_t>(t.len(l, h));
        if (offset + rows > scores[l].size())
          throw std::logic_error("scores." + std::to_string(l) + " is shorter than the rows");
        scores_.add(l, h, scores[l].data() + offset, rows);
        offset += rows;
      }
    }
    for (int64_t q = end - window; q < end; ++q) scores_.query_positions.push_back(q);
  }
  const double held = t.mean_len();
  if (end == prefill_end_)
    pending_ = held > static_cast<double>(budget_);  // after the first token (flush)
  else if (plan_.continuous && end > prefill_end_ &&
           held >= static_cast<double>(budget_ + plan_.evict_interval))
    evict(t);
}

void Evictor::flush(HeadTable& t) {
  if (!pending_) return;
  pending_ = false;
  evict(t);
}

void Evictor::evict(HeadTable& t) {
  if (t.mean_len() <= static_cast<double>(budget_)) return;
  const size_t L = t.positions.size(), H = t.positions[0].size();
  // the rows of every (layer, head) in cache order, with their accumulated scores
  std::vector<int64_t> positions, offsets{0};
  std::vector<float> acc;
  for (size_t l = 0; l < L; ++l)
    for (size_t h = 0; h < H; ++h) {
      const auto& pos = t.positions[l][h];
      const auto& a = scores_.acc[l][h];
      positions.insert(positions.end(), pos.begin(), pos.end());
      for (size_t r = 0; r < pos.size(); ++r) acc.push_back(r < a.size() ? a[r] : 0.0f);
      offsets.push_back(static_cast<int64_t>(positions.size()));
    }
  const auto& q = scores_.query_positions;
  const SequenceRows rows_in{positions.data(), acc.data(), offsets.data(), q.data(),
                             static_cast<int64_t>(q.size()), static_cast<int64_t>(L),
                             static_cast<int64_t>(H)};
  const EventBudget b{budget_, plan_.start_size, plan_.recent_size, t.num_written,
                      runner_.block_size()};
  // no random anchor; the plan lives in workspace_ until the next event
  const EventPlan& plan = plan_event(plan_.policy, rows_in, b, nullptr, workspace_);
  // kept rows (sorted) -> fill_holes' order for the compaction
  Rows rows(L, std::vector<std::vector<int64_t>>(H));
  for (size_t i = 0; i < L * H; ++i) {
    const auto begin = plan.keep_rows.begin() + plan.keep_offsets[i];
    const auto end = plan.keep_rows.begin() + plan.keep_offsets[i + 1];
    rows[i / H][i % H] = fill_holes(std::vector<int64_t>(begin, end));
  }
  runner_.compact(t, rows);
  scores_.compact(rows);
  ++evictions_;
  const double share = plan_.policy.kvcrush
                           ? tapered_share(*plan_.policy.kvcrush, budget_, t.num_written)
                           : 0.0;
  kvcrush_tokens_ = static_cast<int64_t>(std::nearbyint(share * static_cast<double>(budget_)));
  if (plan_.log) {
    EvictionRecord record{t.num_written, budget_, t.positions};
    for (auto& layer : record.kept)
      for (auto& kept : layer) std::sort(kept.begin(), kept.end());
    log_.push_back(std::move(record));
  }
}

}  // namespace kvcrush
