// Eviction policies: from one eviction event's candidates to the keep mask, in C++.
//
// The one implementation of the selection of kvcrush_ov.eviction (streaming, h2o, snapkv,
// pyramidkv, adakv, each optionally wrapped in KVCrush); the Python policies call it through
// kvcrush_ov._core and a C++ pipeline calls it directly. Notation and contract as in
// kvcrush_ov/eviction/base.py: L layers, H KV heads, N the longest candidate list of any
// (layer, head); the candidates of one sequence are the cached tokens that are neither attention
// sinks nor in the recent window, in position order.
//
// Every array is dense and row-major, passed as a pointer (the caller owns the memory).
// Booleans are one byte each (0 or 1). Invalid configurations and arguments throw
// std::invalid_argument whose message names the field and what is allowed.
//
// Typical C++ use, the default eviction of CacheEvictionConfig() on one sequence's cached rows
// (what kvcrush_ov.eviction.planner.plan_eviction does):
//
//   kvcrush::PolicyConfig cfg;  // snapkv, norm_sum, avg pooling over 31, KVCrush 25% tapered
//   kvcrush::validate(cfg);
//   kvcrush::SequenceRows rows{positions, scores, offsets, query_positions, Q, L, H};
//   kvcrush::EventBudget b{budget, start_size, recent_size, num_written, block_size};
//   std::vector<uint8_t> random(kvcrush::random_bits_size(cfg, H, block_size, L));  // none here
//   const kvcrush::EventPlan plan = kvcrush::plan_event(cfg, rows, b, random.data());
//   // keep rows plan.keep_rows[plan.keep_offsets[l * H + h] .. plan.keep_offsets[l * H + h + 1])
//
// or with a selection of the caller's (any policy; the Python binding passes a Python
// policy's select this way), in buffers kept from one event to the next:
//
//   kvcrush::PlanWorkspace ws;
//   const kvcrush::SelectFn newest = [](const kvcrush::Candidates& c, int64_t num_keep,
//                                       uint8_t* keep) {  // keep: u8 [L, H, N]
//     for (int64_t r = 0; r < c.num_layers * c.num_heads; ++r)
//       for (int64_t j = 0; j < c.n; ++j)
//         keep[r * c.n + j] = j < c.lengths[r] && j >= c.lengths[r] - num_keep;
//   };
//   const kvcrush::EventPlan& mine = kvcrush::plan_event(newest, "newest", rows, b, ws);
//
// or, on candidates already gathered as Python's EvictionInputs:
//
//   kvcrush::Candidates c{scores, counts, positions, lengths, L, H, N, block_size};
//   const auto eff = kvcrush::for_budget(cfg, budget, num_keep, num_written);
//   kvcrush::select_keep(eff, c, num_keep, random.data(), keep);  // keep: u8 [L, H, N]
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "kvcrush/selection.hpp"

namespace kvcrush {

/// How candidates are ranked (``CacheEvictionConfig.importance``).
enum class Importance { kStreaming, kH2O, kSnapKV, kPyramidKV, kAdaKV };
/// ``sum``: accumulated attention; ``norm_sum``: divided by max(count, 1).
enum class Aggregation { kSum, kNormSum };
/// Score smoothing along the candidates (snapkv, pyramidkv, adakv).
enum class Pooling { kMax, kAvg, kNone };
/// KVCrush representatives: single tokens or whole ``block_size`` blocks.
enum class Granularity { kToken, kBlock };
/// Ada-KV's budget pool: the heads of each layer, or every head of the model (KVzip's).
enum class AdaScope { kLayer, kModel };

/// KVCrush on top of the importance policy (kvcrush_ov.eviction.kvcrush.KVCrush).
struct KVCrushOptions {
  /// Share of the budget given to representatives, in [0, 1]: of the candidates' ``num_keep``
  /// in select_keep; of the TOTAL budget (sinks and recent window included) in for_budget.
  double share = 0.25;
  /// One anchor, or several (multi-anchor: nearest-anchor groups). Not empty.
  std::vector<AnchorKind> anchors{AnchorKind::kAlternating};
  Granularity granularity = Granularity::kToken;
  /// Per-layer KVCrush budgets from attention concentration.
  bool dynamic_split = false;
  /// for_budget only: the share grows linearly from 0 when the cache keeps ``taper_low`` of the
  /// tokens written to ``share`` at ``taper_high`` (0 <= low < high). Off: ``share`` always.
  bool taper = true;
  double taper_low = 0.125;
  double taper_high = 0.5;
  /// The scores the head bits come from: unset = the importance scores; else the importance
  /// scores recomputed with this aggregation (not with streaming, which has none).
  std::optional<Aggregation> bit_aggregation;
};

/// One eviction policy. The defaults are CacheEvictionConfig()'s on the native backend.
struct PolicyConfig {
  Importance importance = Importance::kSnapKV;
  Aggregation aggregation = Aggregation::kNormSum;  ///< h2o, snapkv, pyramidkv, adakv
  Pooling pooling = Pooling::kAvg;                  ///< snapkv, pyramidkv, adakv
  int64_t kernel_size = 31;                         ///< odd, >= 1
  int64_t offset = 0;                               ///< 0 .. kernel_size / 2 (window centre)
  double beta = 20.0;                               ///< pyramidkv: >= 1
  double alpha = 0.2;                               ///< adakv: safeguard floor in [0, 1]
  AdaScope scope = AdaScope::kLayer;                ///< adakv
  std::optional<KVCrushOptions> kvcrush = KVCrushOptions{};  ///< unset: the importance policy
};

/// Throws std::invalid_argument naming the first invalid field, in the words of
/// kvcrush_ov.config.ConfigError where the field exists there
/// (``eviction.kernel_size=4 is invalid: allowed is an odd integer >= 1``).
void validate(const PolicyConfig& cfg);

/// Parsers of the names Python uses; each throws std::invalid_argument naming its field
/// (``eviction.importance``, ``eviction.aggregation_mode``, ``eviction.pooling``,
/// ``kvcrush.granularity``, ``adakv.scope``, ``kvcrush.anchor_point_mode``).
Importance parse_importance(std::string_view name);
Aggregation parse_aggregation(std::string_view name);
Pooling parse_pooling(std::string_view name);
Granularity parse_granularity(std::string_view name);
AdaScope parse_scope(std::string_view name);

/// One eviction event's candidates (kvcrush_ov.eviction.base.EvictionInputs).
/// scores, counts: f32 [L, H, N] (0 in padding); positions: i64 [L, H, N] increasing along N,
/// -1 in padding; lengths: i64 [L, H] valid entries of every row (a prefix).
struct Candidates {
  const float* scores;
  const float* counts;
  const int64_t* positions;
  const int64_t* lengths;
  int64_t num_layers;
  int64_t num_heads;
  int64_t n;
  int64_t block_size;
};

/// KVCrush's share of the total budget ``total`` when ``num_written`` tokens were written
/// (KVCrush.share_for): ``share`` scaled by clip((total / num_written - low) / (high - low), 0,
/// 1) with the taper on and num_written > 0, else ``share``.
double tapered_share(const KVCrushOptions& opts, int64_t total, int64_t num_written);

/// KVCrush's share of ``num_keep`` when the cache keeps ``total`` tokens per (layer, head) of
/// ``num_written`` (KVCrush.for_budget): ``min(1, s * total / num_keep)`` with ``s`` the share
/// (tapered if on and num_written > 0); ``share`` itself when num_keep <= 0.
double share_for_budget(const KVCrushOptions& opts, int64_t total, int64_t num_keep,
                        int64_t num_written);

/// ``cfg`` with its KVCrush share turned into the share of ``num_keep`` (taper off); unchanged
/// without KVCrush or when num_keep <= 0. Call it once per event before select_keep.
PolicyConfig for_budget(const PolicyConfig& cfg, int64_t total, int64_t num_keep,
                        int64_t num_written);

/// Bits of one random anchor: D = H (token granularity) or block_size * H (block).
int64_t anchor_bits(const PolicyConfig& cfg, int64_t num_heads, int64_t block_size);
/// Bytes select_keep reads from ``random_bits``: R * L * D, R = the random anchors.
int64_t random_bits_size(const PolicyConfig& cfg, int64_t num_heads, int64_t block_size,
                         int64_t num_layers);

/// out: f32 [L, H, N], the scores the importance policy ranks by (-inf in padding unless no row
/// has padding): normalised by ``aggregation``, pooled for the snapkv family; positions for
/// streaming. ``aggregation`` overrides cfg.aggregation when set.
void policy_scores(const PolicyConfig& cfg, const Candidates& c, float* out,
                   std::optional<Aggregation> aggregation = std::nullopt);

/// out [R, N]: values [R, N] pooled along N over a window of ``kernel_size`` (snapkv.pool_scores):
/// entry j's window is [j - r - offset, j + r - offset] (r = kernel_size / 2) clipped to the
/// row's ``lengths[row]`` valid entries; max, mean over the valid entries, or a copy; -inf in
/// padding. Parallel over rows.
void pool_scores(const float* values, const int64_t* lengths, int64_t rows, int64_t n,
                 Pooling pooling, int64_t kernel_size, int64_t offset, float* out);

/// Optional outputs of select_keep (each may be null). importance, crush, bits: u8 [L, H, N]
/// (the importance policy's picks with top-ups, KVCrush's representatives, the head bits);
/// crush_budget: i64 [L] tokens per head planned for KVCrush in each layer. Only written with
/// KVCrush.
struct SelectionDetail {
  uint8_t* importance = nullptr;
  uint8_t* crush = nullptr;
  int64_t* crush_budget = nullptr;
  uint8_t* bits = nullptr;
};

/// The large [L, H, N] temporaries of select_keep, kept by a caller between events (a
/// PlanWorkspace holds one), so that an event does not allocate them again. Contents are
/// scratch; only their capacity carries over.
struct SelectBuffers {
  std::vector<float> scores, pooled, rest, other;
  std::vector<uint8_t> imp, more, picks, bits, vectors, candidates, crush, both;
};

/// keep: u8 [L, H, N], 1 on every candidate that stays: ``num_keep * L * H`` in all, never in
/// padding (budget moved between heads / layers as the Python policy does). random_bits: u8
/// [R, L, D] (R = random anchors in cfg's anchor order, D = anchor_bits), read only when
/// R > 0 (Python draws them from its np.random.Generator). Throws std::invalid_argument for an
/// invalid cfg, num_keep < 0, or a budget above the candidates. Parallel over rows / layers.
/// ``buffers``: scratch kept between calls (null: fresh buffers).
void select_keep(const PolicyConfig& cfg, const Candidates& c, int64_t num_keep,
                 const uint8_t* random_bits, uint8_t* keep,
                 const SelectionDetail* detail = nullptr, SelectBuffers* buffers = nullptr);

// ---- one eviction event of one sequence, from its cached rows (kvcrush_ov.eviction.planner)

/// A sequence's cached rows per (layer, KV head), in cache (row) order: the rows of (l, h) are
/// entries offsets[l * H + h] .. offsets[l * H + h + 1] - 1 of the flat arrays.
/// positions: i64 [R] (any order; a head's positions are distinct); scores: f32 [R] attention
/// each row accumulated (0 for rows never scored), or null when the policy needs none;
/// offsets: i64 [L * H + 1]; query_positions: i64 [Q] sorted positions of the scored queries
/// (a row at position p was seen by the Q' >= p of them: norm_sum's counts; may be null if Q = 0).
struct SequenceRows {
  const int64_t* positions;
  const float* scores;
  const int64_t* offsets;
  const int64_t* query_positions;
  int64_t num_queries;
  int64_t num_layers;
  int64_t num_heads;
};

/// The generic part of an event: budget tokens per (layer, head) after it (sinks and recent
/// window included); positions < start_size are sinks, positions >= num_written - recent_size
/// the recent window (both always kept); block_size: tokens per KV block.
struct EventBudget {
  int64_t budget;
  int64_t start_size;
  int64_t recent_size;
  int64_t num_written;
  int64_t block_size;
};

/// What an event keeps: the sorted kept rows of (l, h) are keep_rows[keep_offsets[l * H + h] ..
/// keep_offsets[l * H + h + 1]) (row indices into that head's rows); num_sinks / num_recent per
/// (layer, head); num_keep candidates kept per (layer, head) on average.
struct EventPlan {
  std::vector<int64_t> keep_rows;
  std::vector<int64_t> keep_offsets;
  int64_t num_sinks = 0;
  int64_t num_recent = 0;
  int64_t num_keep = 0;
};

/// An eviction event that breaks the contract: the heads of a sequence disagree on its sinks /
/// recent window, or a selection's keep mask is invalid (check_keep). Python: _core.PlanError,
/// an AssertionError (and a RuntimeError).
class PlanError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

/// Throws PlanError unless keep (u8 [L, H, N]) is a valid answer of policy ``who`` for the
/// candidates ``c`` and num_keep (kvcrush_ov.eviction.base.check_keep, in its words): never 1
/// in padding (``<who>: keeps a padding entry``), exactly ``num_keep * L * H`` ones (``<who>:
/// kept K candidates, the budget is exactly T (num_keep per layer and head)``).
void check_keep(const Candidates& c, const uint8_t* keep, int64_t num_keep,
                std::string_view who);

/// A policy's selection for plan_event: writes keep u8 [L, H, N] (every entry; 1 on every
/// candidate that stays) for the candidates ``c`` of one event and ``num_keep`` candidates per
/// (layer, head) on average. It may throw; plan_event then throws the same. E.g. a policy of
/// another language (the Python binding wraps a Python policy's ``select``) or a C++ one.
using SelectFn = std::function<void(const Candidates& c, int64_t num_keep, uint8_t* keep)>;

/// The buffers of plan_event kept by its caller from one event to the next (an evictor holds
/// one): once they are large enough, an event allocates only small temporaries (fresh large
/// buffers page-fault after glibc trims the heap). ``plan`` holds the last result.
struct PlanWorkspace {
  std::vector<std::vector<int64_t>> order;  ///< per (layer, head): rows in position order
  std::vector<int64_t> sinks, recent, lengths;
  std::vector<float> scores, counts;
  std::vector<int64_t> positions;
  std::vector<uint8_t> keep;
  SelectBuffers select;  ///< select_keep's, with the policy's own selection
  EventPlan plan;
};

/// One eviction event of one sequence, the one implementation of
/// kvcrush_ov.eviction.planner.plan_eviction: the candidates (rows neither sinks nor recent,
/// in position order, padded to [L, H, N]), the policy's selection ``select``, check_keep of
/// its answer (errors naming ``who``), then the kept rows back in row order, in ``ws``
/// (returns ws.plan, valid until the next call with ``ws``). Throws std::invalid_argument when
/// the budget is below sinks + recent or above the cached tokens, PlanError when the heads
/// disagree on sinks / recent window or the keep mask is invalid, and whatever ``select``
/// throws. ``select`` runs once, on the calling thread; the rest is parallel over (layer, head).
const EventPlan& plan_event(const SelectFn& select, std::string_view who,
                            const SequenceRows& rows, const EventBudget& b, PlanWorkspace& ws);

/// plan_event with the selection of ``cfg``, the policy as configured (its KVCrush share of
/// the total budget): ``for_budget(cfg, budget, num_keep, num_written)`` then select_keep with
/// random_bits as in select_keep (R * L * D); also throws std::invalid_argument for an invalid
/// cfg or missing random bits. In ``ws`` as above.
const EventPlan& plan_event(const PolicyConfig& cfg, const SequenceRows& rows,
                            const EventBudget& b, const uint8_t* random_bits, PlanWorkspace& ws);

/// plan_event of ``cfg`` in fresh buffers.
EventPlan plan_event(const PolicyConfig& cfg, const SequenceRows& rows, const EventBudget& b,
                     const uint8_t* random_bits);

// ---- the budget arithmetic the policies share (kvcrush_ov.eviction.base), exposed for tests

/// out [K]: ``total`` spread max-min fairly over ``capacity`` [K] (clipped at 0), the last few
/// units one each to the entries still below capacity, lowest index first.
void water_fill(int64_t total, const int64_t* capacity, int64_t k, int64_t* out);

/// out [R, K]: ``target`` capped at ``capacity`` with the same total: a row's overflow moves
/// to the row's other entries, then to every entry with room (both water_fill).
void fit_budget(const int64_t* target, const int64_t* capacity, int64_t rows, int64_t k,
                int64_t* out);

/// out [L, H]: ``num_keep`` per (layer, head), moved where a head holds fewer candidates.
void head_quotas(const int64_t* lengths, int64_t num_layers, int64_t num_heads,
                 int64_t num_keep, int64_t* out);

/// out [L]: PyramidKV's per-layer keep counts (linear from 2 num_keep - num_keep / beta down
/// to num_keep / beta), summing to L * num_keep.
void pyramid_budgets(int64_t num_layers, int64_t num_keep, double beta, int64_t* out);

/// out [L, H]: PyramidKV's keep count of every (layer, head), summing to L * H * num_keep:
/// pyramid_budgets fitted to the layers' shortest heads (when they can hold them), then to
/// every head (fit_budget).
void pyramid_layer_budgets(const int64_t* lengths, int64_t num_layers, int64_t num_heads,
                           int64_t num_keep, double beta, int64_t* out);

/// out [L]: ``total`` split in proportion to ``weights`` [L] (>= 0; uniform if all 0), at most
/// ``cap`` each, with numpy's float32 arithmetic (KVCrush's dynamic split) or float64.
void apportion(int64_t total, const float* weights, int64_t num_layers, int64_t cap,
               int64_t* out);
void apportion(int64_t total, const double* weights, int64_t num_layers, int64_t cap,
               int64_t* out);

/// Where every head holds the positions of head 0: head h of layer l holds position
/// positions[l, 0, j] at entry idx[l, h, j] iff found[l, h, j] (idx 0 where not found).
/// Returns true (and writes nothing) when every head of every layer holds the same positions.
/// positions: i64 [L, H, N]; lengths: i64 [L, H]; idx: i64 [L, H, N]; found: u8 [L, H, N].
bool match_heads(const int64_t* positions, const int64_t* lengths, int64_t num_layers,
                 int64_t num_heads, int64_t n, int64_t* idx, uint8_t* found);

}  // namespace kvcrush
