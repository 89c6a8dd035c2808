// Eviction inside the C++ pipeline, for one sequence (Python: engine/evictor.py,
// eviction/scores.py): which queries each step scores, when to evict, which rows stay
// (kvcrush::plan_event of kvcrush/policy.hpp, the planner Python runs too), and the compaction.
#pragma once

#include <cstdint>
#include <vector>

#include "head_runner.hpp"
#include "kvcrush/config.hpp"
#include "kvcrush/pipeline.hpp"
#include "kvcrush/policy.hpp"

namespace kvcrush {

/// Attention accumulated per (layer, head) and row, and the positions of the scored queries
/// (Python: SequenceScores with reduce="sum").
struct SequenceScores {
  std::vector<std::vector<std::vector<float>>> acc;  // [L][H][rows]
  std::vector<int64_t> query_positions;              // sorted

  void reset(size_t layers, size_t heads);
  /// Adds one step's ``segment`` [rows after the step] to (layer, head).
  void add(size_t layer, size_t head, const float* segment, size_t rows);
  /// New row i of (l, h) is old row rows[l][h][i] (rows never scored stay 0).
  void compact(const std::vector<std::vector<std::vector<int64_t>>>& rows);
};

/// The EvictionSpec of a CacheEvictionConfig on the native backend (eviction/factory.py).
struct EvictionPlan {
  PolicyConfig policy;
  enum class ScoreMode { kNone, kWindow, kAll } score_mode = ScoreMode::kWindow;
  CacheSize max_cache_size;
  int64_t start_size = 0, recent_size = 0, evict_interval = 0, window = 0;
  int64_t decode_window = 0;  ///< 0: every decode step is scored
  bool continuous = true;
  bool log = false;

  /// Throws ConfigError for what the C++ pipeline cannot run (named field, allowed values).
  explicit EvictionPlan(const CacheEvictionConfig& cfg);
  /// Tokens per layer and head after an eviction (never below sinks + recent).
  int64_t budget(int64_t prompt_tokens) const;
};

class Evictor {
 public:
  Evictor(EvictionPlan plan, HeadRunner& runner) : plan_(std::move(plan)), runner_(runner) {}

  /// A new request whose prompt has ``prompt_tokens`` tokens.
  void begin(int64_t prompt_tokens);
  /// Queries of the step that wrote positions [start, start + count) whose scores are needed
  /// (the rows of ``t`` include them); 0: none.
  int64_t window(const HeadTable& t, int64_t start, int64_t count) const;
  /// After the step's inference: accumulate its scores (``window`` > 0), then evict if due;
  /// the eviction due at the prompt's end waits (pending()) so that the first token is
  /// handed out without it (GenAI's order; Python: Evictor.pending).
  void after_step(HeadTable& t, int64_t start, int64_t count, int64_t window,
                  const std::vector<std::vector<float>>& scores);
  /// Whether the prompt's eviction waits for flush().
  bool pending() const { return pending_; }
  /// Runs the pending eviction (call before the next step writes the cache).
  void flush(HeadTable& t);

  int64_t budget() const { return budget_; }
  int64_t num_evictions() const { return evictions_; }
  int64_t kvcrush_tokens() const { return kvcrush_tokens_; }
  /// The request's eviction log (empty unless the config asked for it); moved out.
  std::vector<EvictionRecord> take_log() { return std::move(log_); }

 private:
  void evict(HeadTable& t);

  EvictionPlan plan_;
  HeadRunner& runner_;
  SequenceScores scores_;
  int64_t prefill_end_ = 0, budget_ = 0, evictions_ = 0, kvcrush_tokens_ = 0;
  bool pending_ = false;
  PlanWorkspace workspace_;  ///< plan_event's buffers, kept between events
  std::vector<EvictionRecord> log_;
};

}  // namespace kvcrush
