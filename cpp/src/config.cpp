// Validation of the C++ pipeline's configuration: the same rules, in the same order, and the
// same message texts as kvcrush_ov/config.py.

#include "kvcrush/config.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <string_view>

namespace kvcrush {

ConfigError::ConfigError(std::string field, std::string value_repr, std::string allowed,
                         const std::string& hint)
    : std::invalid_argument(field + "=" + value_repr + " is invalid: allowed is " + allowed +
                            (hint.empty() ? "" : " (" + hint + ")")),
      field_(std::move(field)),
      value_(std::move(value_repr)),
      allowed_(std::move(allowed)) {}

std::string repr(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value < 0 ? "-inf" : "inf";
  // the shortest digits that round-trip, then Python's layout of them (float_repr_style
  // 'short': positional for exponents -5 < e < 16, else d.ddde+XX)
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), std::fabs(value), std::chars_format::scientific);
  std::string_view sci(buf, static_cast<size_t>(res.ptr - buf));
  const size_t e_at = sci.find('e');
  std::string digits(sci.substr(0, e_at));
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exp = std::stoi(std::string(sci.substr(e_at + 1)));
  std::string out = std::signbit(value) ? "-" : "";
  if (exp < -4 || exp >= 16) {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char e[16];
    std::snprintf(e, sizeof(e), "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    return out + e;
  }
  if (exp < 0) return out + "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
  const size_t int_digits = static_cast<size_t>(exp) + 1;
  if (digits.size() <= int_digits)
    return out + digits + std::string(int_digits - digits.size(), '0') + ".0";
  return out + digits.substr(0, int_digits) + "." + digits.substr(int_digits);
}

std::string repr(int64_t value) { return std::to_string(value); }
std::string repr(int value) { return std::to_string(value); }
std::string repr(bool value) { return value ? "True" : "False"; }
std::string repr(const char* value) { return repr(std::string(value)); }

std::string repr(const std::string& value) {
  // Python quotes with ' unless the text holds ' and no "
  const bool dq = value.find('\'') != std::string::npos && value.find('"') == std::string::npos;
  const char quote = dq ? '"' : '\'';
  std::string out(1, quote);
  for (unsigned char c : value) {
    if (c == '\\' || c == static_cast<unsigned char>(quote)) {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      char hex[8];
      std::snprintf(hex, sizeof(hex), "\\x%02x", c);
      out += hex;
    } else {
      out += static_cast<char>(c);  // UTF-8 bytes pass through, as Python prints text
    }
  }
  return out + quote;
}

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string joined(std::initializer_list<const char*> items) {
  std::string out;
  for (const char* s : items) out += (out.empty() ? "" : ", ") + std::string(s);
  return out;
}

/// Python's _choice: ``value`` lower-cased if it is one of ``allowed``.
std::string choice(const char* field, const std::string& value,
                   std::initializer_list<const char*> allowed) {
  const std::string low = lower(value);
  for (const char* a : allowed)
    if (low == a) return low;
  throw ConfigError(field, repr(value), "one of " + joined(allowed));
}

int64_t at_least(const char* field, int64_t value, int64_t low) {
  if (value < low) throw ConfigError(field, repr(value), "an integer >= " + std::to_string(low));
  return value;
}

constexpr std::initializer_list<const char*> kPrecisions = {"u8", "u4", "bf16", "f32"};
constexpr std::initializer_list<const char*> kAnchorModes = {"random", "zeros", "ones", "mean",
                                                             "alternating"};
constexpr std::initializer_list<const char*> kImportance = {
    "snapkv", "h2o", "streaming", "pyramidkv", "adakv", "upstream", "kvzip", "kvzap"};
constexpr int64_t kNativeKernelSize = 31;  // config.NATIVE_KERNEL_SIZE

}  // namespace

void KVCacheConfig::validate() {
  precision = choice("kv_cache.precision", precision, kPrecisions);
  if (!std::isfinite(cache_size) || cache_size < 0)
    throw ConfigError("kv_cache.cache_size", repr(cache_size), "a number of GB >= 0");
  at_least("kv_cache.num_kv_blocks", num_kv_blocks, 0);
}

void SchedulerConfig::validate() const {
  at_least("scheduler.max_num_batched_tokens", max_num_batched_tokens, 1);
  at_least("scheduler.max_num_seqs", max_num_seqs, 1);
}

void KVCrushConfig::validate() {
  if (!std::isfinite(budget) || budget < 0.0 || budget > 1.0)
    throw ConfigError("kvcrush.budget", repr(budget),
                      "a share of the total cache budget in [0, 1]",
                      "unlike GenAI's KVCrushConfig.budget, this is not a block count");
  anchor_point_mode = choice("kvcrush.anchor_point_mode", anchor_point_mode, kAnchorModes);
  at_least("kvcrush.rng_seed", rng_seed, 0);
  if (!granularity.empty())
    granularity = choice("kvcrush.granularity", granularity, {"token", "block"});
}

void CacheEvictionConfig::validate() {
  if (kvcrush) kvcrush->validate();  // Python builds (and checks) it first
  const char* size_allowed = "a token count >= 1 or a fraction of the prompt in (0, 1]";
  if (const auto* tokens = std::get_if<int64_t>(&max_cache_size)) {
    if (*tokens < 1) throw ConfigError("eviction.max_cache_size", repr(*tokens), size_allowed);
  } else {
    const double f = std::get<double>(max_cache_size);
    if (!(std::isfinite(f) && f > 0.0 && f <= 1.0))
      throw ConfigError("eviction.max_cache_size", repr(f), size_allowed);
  }
  at_least("eviction.start_size", start_size, 0);
  if (recent_size) at_least("eviction.recent_size", *recent_size, 0);
  at_least("eviction.snapkv_window_size", snapkv_window_size, 0);
  importance = choice("eviction.importance", importance, kImportance);
  aggregation_mode = choice("eviction.aggregation_mode", aggregation_mode, {"norm_sum", "sum"});
  mode = choice("eviction.mode", mode, {"continuous", "prefill"});
  at_least("eviction.evict_interval", evict_interval, 1);
  if (pooling) pooling = choice("eviction.pooling", *pooling, {"max", "avg", "none"});
  if (kernel_size && at_least("eviction.kernel_size", *kernel_size, 1) % 2 == 0)
    throw ConfigError("eviction.kernel_size", repr(*kernel_size), "an odd integer >= 1");
  const int64_t half = kernel_size.value_or(kNativeKernelSize) / 2;
  if (at_least("eviction.pooling_offset", pooling_offset, 0) > half)
    throw ConfigError("eviction.pooling_offset", repr(pooling_offset),
                      "an integer in [0, kernel_size // 2 = " + std::to_string(half) + "]");
  if (decode_window_size &&
      at_least("eviction.decode_window_size", *decode_window_size, 1) > evict_interval)
    throw ConfigError("eviction.decode_window_size", repr(*decode_window_size),
                      "None or an integer in [1, evict_interval = " +
                          std::to_string(evict_interval) + "]");
  if (plain_prefill && importance == "upstream")
    throw ConfigError("eviction.plain_prefill", repr(true),
                      "False with importance='upstream' (it runs prompt chunks on graphs of its "
                      "own)");
  if (importance == "upstream" && kvcrush && kvcrush->taper.value_or(false))
    throw ConfigError("kvcrush.taper", repr(true),
                      "None or False with importance='upstream' (GenAI's algorithm keeps a "
                      "fixed share)");
  if (const auto* tokens = std::get_if<int64_t>(&max_cache_size);
      tokens && *tokens < start_size + recent_tokens())
    throw ConfigError("eviction.max_cache_size", repr(*tokens),
                      "at least start_size + recent_size = " +
                          std::to_string(start_size + recent_tokens()) + " tokens");
}

int64_t CacheEvictionConfig::recent_tokens() const {
  // config.DEFAULT_RECENT / config.KVZIP_RECENT
  return recent_size.value_or(importance == "kvzip" || importance == "kvzap" ? 32 : 128);
}

int64_t CacheEvictionConfig::total_tokens(int64_t prompt_tokens) const {
  if (const auto* tokens = std::get_if<int64_t>(&max_cache_size)) return *tokens;
  // Python: max(1, int(m * prompt_tokens)), int() truncating toward zero
  const auto t = static_cast<int64_t>(std::get<double>(max_cache_size) *
                                      static_cast<double>(prompt_tokens));
  return std::max<int64_t>(1, t);
}

void GenerationConfig::validate() const { at_least("max_new_tokens", max_new_tokens, 1); }

}  // namespace kvcrush
