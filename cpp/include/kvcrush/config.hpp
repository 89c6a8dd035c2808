// User-facing configuration of the C++ pipeline, in the vocabulary of kvcrush_ov.config (Python)
// and OpenVINO GenAI. Every struct has validate(), which throws ConfigError naming the field
// and what is allowed, with the same text as Python's kvcrush_ov.errors.ConfigError:
//
//   "eviction.start_size=-1 is invalid: allowed is an integer >= 0"
//
// Values are printed as Python's repr() prints them (1.5, 0.25, 'u9', True), so one message
// reads the same from both languages. Fields Python has and the C++ pipeline cannot run yet
// (sampling, chat templates, fastkv, LESS, prefill eviction, several KVCrush anchors) are left
// out here; Pipeline rejects values it cannot run (importance upstream / kvzip / kvzap, the random
// anchor) with a ConfigError too.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <variant>

namespace kvcrush {

/// An invalid value for a named field (Python: kvcrush_ov.errors.ConfigError).
class ConfigError : public std::invalid_argument {
 public:
  /// ``value_repr``: the value as Python's repr() prints it (see repr() below).
  ConfigError(std::string field, std::string value_repr, std::string allowed,
              const std::string& hint = "");
  const std::string& field() const noexcept { return field_; }
  const std::string& value() const noexcept { return value_; }
  const std::string& allowed() const noexcept { return allowed_; }

 private:
  std::string field_, value_, allowed_;
};

/// Python's repr() of a value, for ConfigError messages.
std::string repr(double value);
std::string repr(int64_t value);
std::string repr(int value);
std::string repr(bool value);
std::string repr(const std::string& value);
std::string repr(const char* value);

/// The paged KV cache (Python: KVCacheConfig).
struct KVCacheConfig {
  /// u8 (CPU default: keys quantized per channel inside each block, values per token),
  /// u4 (u4 keys + u8 values), bf16, or f32 (also runs inference in f32).
  std::string precision = "u8";
  /// Cache memory in GB (GiB, as Python counts it); 0: 1 GiB, the native backend's default.
  /// The C++ pipeline allocates what a request needs, at most this.
  double cache_size = 0.0;
  /// A fixed number of KV blocks (overrides cache_size when > 0).
  int64_t num_kv_blocks = 0;
  void validate();
};

/// Continuous-batching knobs (same names as openvino_genai.SchedulerConfig).
struct SchedulerConfig {
  int64_t max_num_batched_tokens = 256;  ///< tokens per step: the prompt runs in such chunks
  int64_t max_num_seqs = 256;
  bool dynamic_split_fuse = true;  ///< false: a prompt runs in one step or not at all
  bool enable_prefix_caching = false;
  void validate() const;
};

/// KVCrush: representative tokens of each attention-behaviour group (Python: KVCrushConfig).
struct KVCrushConfig {
  /// The SHARE of the total cache budget given to KVCrush's representatives, in [0, 1]
  /// (GenAI's KVCrushConfig.budget counts blocks on top of max_cache_size instead).
  double budget = 0.25;
  /// random, zeros, ones, mean or alternating.
  std::string anchor_point_mode = "alternating";
  int64_t rng_seed = 0;  ///< seed of the random anchor
  /// token or block; empty: the backend's own (token).
  std::string granularity;
  /// A larger share in layers whose attention is spread out.
  bool dynamic_split = false;
  /// Shrink the share when the cache holds a small fraction of the sequence; unset: on.
  std::optional<bool> taper;
  void validate();
};

/// A budget in tokens (int) or as a fraction of the prompt's tokens in (0, 1] (double).
using CacheSize = std::variant<int64_t, double>;

/// Which tokens a sequence keeps once its cache outgrows the budget (Python:
/// CacheEvictionConfig; the field meanings are documented there).
struct CacheEvictionConfig {
  /// Total cached tokens per sequence (start + recent + important + KVCrush): a token count,
  /// or a fraction of the prompt.
  CacheSize max_cache_size = 0.25;
  int64_t start_size = 32;   ///< attention-sink tokens always kept
  /// Most recent tokens always kept; unset: 128 (GenAI's), 32 with importance kvzip / kvzap.
  std::optional<int64_t> recent_size;
  std::string importance = "snapkv";
  std::string aggregation_mode = "norm_sum";  ///< norm_sum or sum
  int64_t snapkv_window_size = 32;
  bool apply_rotation = false;
  std::optional<KVCrushConfig> kvcrush = KVCrushConfig{};
  std::string mode = "continuous";  ///< continuous or prefill
  int64_t evict_interval = 32;
  std::optional<std::string> pooling;  ///< max, avg or none; unset: avg
  std::optional<int64_t> kernel_size;  ///< odd; unset: 31
  int64_t pooling_offset = 0;
  std::optional<int64_t> decode_window_size;  ///< unset: min(8, evict_interval)
  bool log = false;  ///< keep GenerationResult::eviction_log (the positions each event kept)
  /// Unscored prompt chunks run the plain paged graph on the same cache memory: a second
  /// compiled copy of the weights for the per-head graph's prefill overhead.
  bool plain_prefill = false;
  void validate();
  /// The budget in tokens for a prompt of ``prompt_tokens`` tokens.
  int64_t total_tokens(int64_t prompt_tokens) const;
  /// recent_size, unset resolved (Python: CacheEvictionConfig.recent_tokens).
  int64_t recent_tokens() const;
};

/// Per-call generation settings (names as in openvino_genai.GenerationConfig). The C++
/// pipeline decodes greedily.
struct GenerationConfig {
  int64_t max_new_tokens = 64;
  bool ignore_eos = false;
  void validate() const;
};

}  // namespace kvcrush
