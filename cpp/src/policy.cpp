#include "kvcrush/policy.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "kvcrush/parallel.hpp"
#include "kvcrush/pooling.hpp"

namespace kvcrush {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- messages in ConfigError's words: "<field>=<value> is invalid: allowed is <allowed>"

/// Python's repr of a float: the shortest decimal that reads back as ``v``.
std::string repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[32];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s(buf);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}
std::string repr(int64_t v) { return std::to_string(v); }
std::string repr(std::string_view v) { return "'" + std::string(v) + "'"; }

[[noreturn]] void invalid(const std::string& field, const std::string& value,
                          const std::string& allowed) {
  throw std::invalid_argument(field + "=" + value + " is invalid: allowed is " + allowed);
}

// ---- numpy's float reductions, bit for bit

/// numpy's pairwise summation (``np.add.reduce`` of a contiguous run of ``n`` values):
/// sequential below 8, eight interleaved partial sums up to 128, halves above.
template <class T>
T pairwise_sum(const T* a, int64_t n) {
  if (n < 8) {
    T res = 0;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    T r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    T res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// ---- small helpers

void check_size(const char* name, int64_t value) {
  if (value < 0)
    throw std::invalid_argument(std::string(name) + "=" + std::to_string(value) +
                                ": allowed a size >= 0");
}

void check_num_keep(int64_t num_keep) {
  if (num_keep < 0)
    throw std::invalid_argument("num_keep=" + std::to_string(num_keep) + ": must be >= 0");
}

int64_t rows_of(const Candidates& c) { return c.num_layers * c.num_heads; }
int64_t size_of(const Candidates& c) { return rows_of(c) * c.n; }

/// out[r, :] = 1 on the k[r] largest of values[r, :] (top_k_mask on float rows).
void top_k_rows(const std::vector<float>& values, int64_t rows, int64_t n,
                const std::vector<int64_t>& k, std::vector<uint8_t>& out) {
  out.resize(static_cast<size_t>(rows * n));
  top_k_mask<float>(values.data(), rows, n, k.data(), out.data());
}

// ---- scores

/// out [L, H, N]: scores (sum) or scores / max(counts, 1) (norm_sum); -inf in padding.
void normalised(const Candidates& c, Aggregation agg, float* out) {
  const int64_t n = c.n;
  parallel_for(rows_of(c), n, [&](int64_t r) {
    const float* s = c.scores + r * n;
    const float* k = c.counts + r * n;
    float* o = out + r * n;
    const int64_t len = c.lengths[r];
    for (int64_t j = 0; j < n; ++j) {
      if (j >= len) {
        o[j] = kNegInf;
      } else if (agg == Aggregation::kSum) {
        o[j] = s[j];
      } else {
        o[j] = s[j] / (k[j] < 1.0f ? 1.0f : k[j]);  // numpy's maximum: a NaN count stays
      }
    }
  });
}

/// pool_scores on ``src`` [rows, n], which it may overwrite.
void pool_owned(std::vector<float>& src, const int64_t* lengths, int64_t rows, int64_t n,
                Pooling pooling, int64_t kernel_size, int64_t offset, float* out) {
  const int64_t r = kernel_size / 2;
  const int64_t before = r + offset, after = r - offset;
  const bool copy = pooling == Pooling::kNone || r == 0 || n == 0;
  if (!copy) {  // padding: -inf in the maxima, 0 in the sums
    const float pad = pooling == Pooling::kMax ? kNegInf : 0.0f;
    for (int64_t row = 0; row < rows; ++row)
      for (int64_t j = std::max<int64_t>(lengths[row], 0); j < n; ++j) src[row * n + j] = pad;
  }
  if (copy) {
    std::copy(src.begin(), src.end(), out);
  } else if (pooling == Pooling::kMax) {
    sliding_max(src.data(), rows, n, before, after, out);
  } else {
    window_sums(src.data(), rows, n, before, after, out);
    parallel_for(rows, n, [&](int64_t row) {
      const int64_t len = std::min(lengths[row], n);
      float* o = out + row * n;
      for (int64_t j = 0; j < len; ++j) {  // the valid entries in the window
        const auto count = static_cast<float>(std::min(j + after + 1, len) -
                                              std::max<int64_t>(j - before, 0));
        o[j] = o[j] / std::max(count, 1.0f);
      }
    });
  }
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t j = std::max<int64_t>(lengths[row], 0); j < n; ++j) out[row * n + j] = kNegInf;
}

/// out [L, H, N]: policy_scores (``tmp``: a buffer of the same size, reused between calls).
void scores_into(const PolicyConfig& cfg, const Candidates& c,
                 std::optional<Aggregation> aggregation, std::vector<float>& out,
                 std::vector<float>& tmp) {
  out.resize(static_cast<size_t>(size_of(c)));
  if (cfg.importance == Importance::kStreaming) {  // recency: the position
    parallel_for(rows_of(c), c.n, [&](int64_t r) {
      for (int64_t j = 0; j < c.n; ++j)
        out[r * c.n + j] = j < c.lengths[r]
                               ? static_cast<float>(static_cast<double>(c.positions[r * c.n + j]))
                               : kNegInf;
    });
    return;
  }
  if (cfg.importance == Importance::kH2O) {
    normalised(c, aggregation.value_or(cfg.aggregation), out.data());
    return;
  }
  tmp.resize(out.size());
  normalised(c, aggregation.value_or(cfg.aggregation), tmp.data());
  pool_owned(tmp, c.lengths, rows_of(c), c.n, cfg.pooling, cfg.kernel_size, cfg.offset,
             out.data());
}

std::vector<float> scores_of(const PolicyConfig& cfg, const Candidates& c,
                             std::optional<Aggregation> aggregation) {
  std::vector<float> out, tmp;
  scores_into(cfg, c, aggregation, out, tmp);
  return out;
}

// ---- the importance policies' selection

std::vector<int64_t> quotas(const Candidates& c, int64_t num_keep) {
  std::vector<int64_t> q(static_cast<size_t>(rows_of(c)));
  head_quotas(c.lengths, c.num_layers, c.num_heads, num_keep, q.data());
  return q;
}

void adaptive_select(const PolicyConfig& cfg, const Candidates& c,
                     const std::vector<float>& scores, int64_t num_keep,
                     std::vector<uint8_t>& keep) {
  const int64_t layers = c.num_layers, heads = c.num_heads, n = c.n, rows = rows_of(c);
  const auto q = quotas(c, num_keep);
  const auto per_head = static_cast<int64_t>(std::floor(cfg.alpha * static_cast<double>(num_keep)));
  std::vector<int64_t> floor(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) floor[r] = std::min(per_head, c.lengths[r]);
  top_k_rows(scores, rows, n, floor, keep);
  std::vector<float> rest(scores);
  for (size_t i = 0; i < rest.size(); ++i)
    if (keep[i]) rest[i] = kNegInf;
  std::vector<int64_t> extra_k;
  int64_t groups = layers;
  if (cfg.scope == AdaScope::kModel) {
    groups = 1;
    int64_t total = 0;
    for (int64_t r = 0; r < rows; ++r) total += q[r] - floor[r];
    extra_k.assign(1, total);
  } else {
    extra_k.assign(static_cast<size_t>(layers), 0);
    for (int64_t r = 0; r < rows; ++r) extra_k[r / heads] += q[r] - floor[r];
  }
  std::vector<uint8_t> extra;
  top_k_rows(rest, groups, rows * n / std::max<int64_t>(groups, 1), extra_k, extra);
  for (size_t i = 0; i < keep.size(); ++i) keep[i] |= extra[i];
}

/// keep [L, H, N]: what the importance policy keeps with ``num_keep`` (scores: scores_of).
void importance_select(const PolicyConfig& cfg, const Candidates& c,
                       const std::vector<float>& scores, int64_t num_keep,
                       std::vector<uint8_t>& keep) {
  check_num_keep(num_keep);
  const int64_t n = c.n, rows = rows_of(c);
  switch (cfg.importance) {
    case Importance::kStreaming: {
      const auto q = quotas(c, num_keep);
      keep.assign(static_cast<size_t>(rows * n), 0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = std::max<int64_t>(c.lengths[r] - q[r], 0); j < c.lengths[r]; ++j)
          keep[r * n + j] = 1;
      return;
    }
    case Importance::kH2O:
    case Importance::kSnapKV:
      top_k_rows(scores, rows, n, quotas(c, num_keep), keep);
      return;
    case Importance::kPyramidKV: {
      std::vector<int64_t> k(static_cast<size_t>(rows));
      pyramid_layer_budgets(c.lengths, c.num_layers, c.num_heads, num_keep, cfg.beta, k.data());
      top_k_rows(scores, rows, n, k, keep);
      return;
    }
    case Importance::kAdaKV:
      adaptive_select(cfg, c, scores, num_keep, keep);
      return;
  }
}

// ---- KVCrush

/// out [L, H, N]: extra[l] more entries per head of layer l, the best by ``scores`` among those
/// not ``kept`` (a full head's share moves as in fit_budget); nothing when every extra is 0.
void top_up(const Candidates& c, const std::vector<uint8_t>& kept,
            const std::vector<float>& scores, const std::vector<int64_t>& extra,
            std::vector<uint8_t>& out, std::vector<float>& rest) {
  const int64_t n = c.n, rows = rows_of(c), heads = c.num_heads;
  if (std::all_of(extra.begin(), extra.end(), [](int64_t e) { return e == 0; })) {
    out.assign(kept.size(), 0);
    return;
  }
  std::vector<int64_t> spare(static_cast<size_t>(rows)), target(spare.size()), quota(spare.size());
  rest.resize(scores.size());
  parallel_for(rows, n * 2, [&](int64_t r) {  // the spare room, and the scores not kept
    // local pointers: stores through them cannot move the vectors' own (the loops vectorize)
    const uint8_t* k = kept.data() + r * n;
    const float* v = scores.data() + r * n;
    float* o = rest.data() + r * n;
    int64_t held = 0;
    for (int64_t j = 0; j < n; ++j) {
      held += k[j];
      o[j] = k[j] ? kNegInf : v[j];
    }
    spare[r] = c.lengths[r] - held;
    target[r] = extra[r / heads];
  });
  fit_budget(target.data(), spare.data(), c.num_layers, heads, quota.data());
  top_k_rows(rest, rows, n, quota, out);
  parallel_for(rows, n, [&](int64_t r) {
    const uint8_t* k = kept.data() + r * n;
    uint8_t* o = out.data() + r * n;
    for (int64_t j = 0; j < n; ++j) o[j] &= static_cast<uint8_t>(k[j] == 0);
  });
}

/// a[i] |= b[i] over [rows, n], parallel over rows.
void or_into(std::vector<uint8_t>& a, const std::vector<uint8_t>& b, int64_t rows, int64_t n) {
  parallel_for(rows, n, [&](int64_t r) {
    const uint8_t* from = b.data() + r * n;
    uint8_t* to = a.data() + r * n;
    for (int64_t j = 0; j < n; ++j) to[j] |= from[j];
  });
}

/// int64 [L]: KVCrush's budget of every layer in units (tokens or blocks).
std::vector<int64_t> crush_units(const PolicyConfig& cfg, const Candidates& c,
                                 const std::vector<float>& scores, int64_t num_keep,
                                 int64_t unit, std::vector<uint8_t>& picks) {
  const KVCrushOptions& o = *cfg.kvcrush;
  const int64_t layers = c.num_layers, per_layer = c.num_heads * c.n;
  const auto k_crush =
      static_cast<int64_t>(std::floor(o.share * static_cast<double>(num_keep) + 0.5));
  std::vector<int64_t> units(static_cast<size_t>(layers), k_crush / unit);
  if (!o.dynamic_split) return units;
  importance_select(cfg, c, scores, num_keep - k_crush, picks);
  std::vector<float> weights(static_cast<size_t>(layers));
  parallel_for(layers, per_layer, [&](int64_t l) {
    std::vector<float> mass(static_cast<size_t>(per_layer)), captured(mass.size());
    for (int64_t i = 0; i < per_layer; ++i) {
      const float s = scores[l * per_layer + i];
      mass[i] = std::isfinite(s) ? std::max(s, 0.0f) : 0.0f;
      captured[i] = picks[l * per_layer + i] ? mass[i] : 0.0f;
    }
    const float layer_mass = pairwise_sum(mass.data(), per_layer);
    const float got = pairwise_sum(captured.data(), per_layer);
    const float concentration =
        layer_mass > 0 ? got / std::max(layer_mass, static_cast<float>(1e-30)) : 0.0f;
    weights[l] = 1.0f - concentration;
  });
  const int64_t cap = num_keep / unit;
  const int64_t total = std::min(layers * k_crush / unit, layers * cap);
  apportion(total, weights.data(), layers, cap, units.data());
  return units;
}

/// Whole candidate blocks of every layer (kvcrush.block_starts): start [L, B] (head-0 entry of
/// a block's first token) and valid [L, B]; B = the most blocks of any layer.
void block_starts(const std::vector<uint8_t>& candidates, const Candidates& c, int64_t bs,
                  std::vector<int64_t>& start, std::vector<uint8_t>& valid, int64_t& width) {
  const int64_t layers = c.num_layers, n = c.n, heads = c.num_heads;
  width = 0;
  start.clear();
  valid.clear();
  if (n < bs) return;
  std::vector<std::vector<int64_t>> found(static_cast<size_t>(layers));
  for (int64_t l = 0; l < layers; ++l) {
    const uint8_t* cand = candidates.data() + l * n;
    const int64_t* pos = c.positions + l * heads * n;  // head 0
    int64_t run = 0;  // candidates among the last bs entries
    for (int64_t j = 0; j < n; ++j) {
      run += cand[j];
      if (j >= bs) run -= cand[j - bs];
      const int64_t first = j - bs + 1;
      if (first < 0) continue;
      if (run == bs && pos[first] % bs == 0 && pos[j] - pos[first] == bs - 1)
        found[l].push_back(first);
    }
    width = std::max<int64_t>(width, static_cast<int64_t>(found[l].size()));
  }
  start.assign(static_cast<size_t>(layers * width), 0);
  valid.assign(start.size(), 0);
  for (int64_t l = 0; l < layers; ++l)
    for (size_t b = 0; b < found[l].size(); ++b) {
      start[l * width + static_cast<int64_t>(b)] = found[l][b];
      valid[l * width + static_cast<int64_t>(b)] = 1;
    }
}

/// chosen [L, N] over head 0's entries: the representatives' tokens.
/// vectors: u8 [L, N, H]; candidates: u8 [L, N]; units: [L].
std::vector<uint8_t> choose(const KVCrushOptions& o, const Candidates& c,
                            const std::vector<uint8_t>& vectors,
                            const std::vector<uint8_t>& candidates,
                            const std::vector<int64_t>& units, int64_t unit,
                            const uint8_t* random_bits) {
  const int64_t layers = c.num_layers, n = c.n, heads = c.num_heads;
  const bool token = o.granularity == Granularity::kToken;
  std::vector<int64_t> start;
  std::vector<uint8_t> block_vectors, block_valid;
  int64_t m = n, d = heads;
  const std::vector<uint8_t>* unit_vectors = &vectors;
  const std::vector<uint8_t>* valid = &candidates;
  if (!token) {
    block_starts(candidates, c, unit, start, block_valid, m);
    d = unit * heads;
    block_vectors.assign(static_cast<size_t>(layers * m * d), 0);
    for (int64_t l = 0; l < layers; ++l)
      for (int64_t b = 0; b < m; ++b) {
        if (!block_valid[l * m + b]) continue;
        const uint8_t* src = vectors.data() + (l * n + start[l * m + b]) * heads;
        std::copy(src, src + d, block_vectors.data() + (l * m + b) * d);
      }
    unit_vectors = &block_vectors;
    valid = &block_valid;
  }
  const auto num_anchors = static_cast<int64_t>(o.anchors.size());
  std::vector<uint8_t> anchors(static_cast<size_t>(num_anchors * layers * d));
  int64_t random_used = 0;
  for (int64_t a = 0; a < num_anchors; ++a) {
    const AnchorKind kind = o.anchors[a];
    const uint8_t* bits = nullptr;
    if (kind == AnchorKind::kRandom) bits = random_bits + (random_used++) * layers * d;
    make_anchor(kind, unit_vectors->data(), valid->data(), layers, m, d, bits,
                anchors.data() + a * layers * d);
  }
  std::vector<uint8_t> picked(static_cast<size_t>(layers * m));
  pick_representatives(unit_vectors->data(), valid->data(), anchors.data(), units.data(),
                       num_anchors, layers, m, d, picked.data());
  if (token) return picked;
  std::vector<uint8_t> chosen(static_cast<size_t>(layers * n), 0);
  for (int64_t l = 0; l < layers; ++l)
    for (int64_t b = 0; b < m; ++b)
      if (picked[l * m + b])
        std::fill_n(chosen.data() + l * n + start[l * m + b], unit, uint8_t{1});
  return chosen;
}

/// True when every head of every layer holds head 0's positions (and as many of them).
bool same_positions(const Candidates& c) {
  const int64_t n = c.n;
  std::atomic<bool> same{true};
  parallel_for(c.num_layers, c.num_heads * n, [&](int64_t l) {
    const int64_t r0 = l * c.num_heads;
    for (int64_t h = 1; h < c.num_heads && same.load(std::memory_order_relaxed); ++h)
      if (c.lengths[r0 + h] != c.lengths[r0] ||
          !std::equal(c.positions + (r0 + h) * n, c.positions + (r0 + h + 1) * n,
                      c.positions + r0 * n))
        same.store(false, std::memory_order_relaxed);
  });
  return same.load();
}

void kvcrush_select(const PolicyConfig& cfg, const Candidates& c, int64_t num_keep,
                    const uint8_t* random_bits, uint8_t* keep, const SelectionDetail* detail,
                    SelectBuffers& buf) {
  check_num_keep(num_keep);
  const KVCrushOptions& o = *cfg.kvcrush;
  const int64_t layers = c.num_layers, heads = c.num_heads, n = c.n, rows = rows_of(c);
  const int64_t unit = o.granularity == Granularity::kBlock ? c.block_size : 1;
  std::vector<float>& scores = buf.scores;
  scores_into(cfg, c, std::nullopt, scores, buf.pooled);
  const auto units = crush_units(cfg, c, scores, num_keep, unit, buf.picks);
  std::vector<int64_t> k_imp(static_cast<size_t>(layers));
  int64_t base = num_keep;
  for (int64_t l = 0; l < layers; ++l) {
    k_imp[l] = num_keep - unit * units[l];
    base = std::min(base, k_imp[l]);
  }
  std::vector<uint8_t>& imp = buf.imp;
  std::vector<uint8_t>& more = buf.more;
  importance_select(cfg, c, scores, base, imp);
  std::vector<int64_t> extra(k_imp);
  for (auto& e : extra) e -= base;
  top_up(c, imp, scores, extra, more, buf.rest);
  or_into(imp, more, rows, n);

  if (o.bit_aggregation) scores_into(cfg, c, o.bit_aggregation, buf.other, buf.pooled);
  const std::vector<float>& bit_scores = o.bit_aggregation ? buf.other : scores;
  std::vector<int64_t> half(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) half[r] = c.lengths[r] / 2;
  std::vector<uint8_t>& bits = buf.bits;
  top_k_rows(bit_scores, rows, n, half, bits);

  // Tokens by position across the heads: head h holds head 0's entry j at idx[h, j] iff
  // found[h, j]; when every head holds the same positions (aligned) that is entry j itself.
  std::vector<int64_t> idx;
  std::vector<uint8_t> found;
  const bool aligned = same_positions(c);
  if (!aligned) {
    idx.resize(static_cast<size_t>(rows * n));
    found.resize(idx.size());
    match_heads(c.positions, c.lengths, layers, heads, n, idx.data(), found.data());
  }
  // By value (pointers): a loop copies them into locals, which its u8 stores cannot alias.
  const int64_t* idx_p = idx.data();
  const uint8_t* found_p = found.data();
  const int64_t* len = c.lengths;
  const auto entry = [=](int64_t r, int64_t j) { return aligned ? j : idx_p[r * n + j]; };
  const auto held = [=](int64_t r, int64_t j) {
    return aligned ? j < len[r] : found_p[r * n + j] != 0;
  };
  std::vector<uint8_t>& vectors = buf.vectors;  // every entry written below
  std::vector<uint8_t>& candidates = buf.candidates;
  vectors.resize(static_cast<size_t>(layers * n * heads));
  candidates.resize(static_cast<size_t>(layers * n));
  parallel_for(layers, n * heads, [&](int64_t l) {
    // locals: the u8 stores cannot alias them, so nothing is reloaded per entry
    uint8_t* vec = vectors.data() + l * n * heads;
    uint8_t* cand = candidates.data() + l * n;
    const uint8_t* imp_p = imp.data();
    const uint8_t* bits_p = bits.data();
    const auto entry_of = entry;
    const auto held_at = held;
    for (int64_t j = 0; j < n; ++j) {
      bool held_all = true, kept_any = false;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t r = l * heads + h;
        const int64_t at = r * n + entry_of(r, j);
        const bool f = held_at(r, j);
        held_all = held_all && f;
        kept_any = kept_any || (f && imp_p[at]);
        vec[j * heads + h] = bits_p[at];
      }
      cand[j] = static_cast<uint8_t>(held_all && !kept_any);
    }
  });
  const auto chosen = choose(o, c, vectors, candidates, units, unit, random_bits);

  std::vector<uint8_t>& crush = buf.crush;
  std::vector<uint8_t>& both = buf.both;  // every entry written below
  crush.assign(static_cast<size_t>(rows * n), 0);
  both.resize(crush.size());
  std::vector<int64_t> shortfall(static_cast<size_t>(layers));
  parallel_for(layers, n * heads, [&](int64_t l) {
    const uint8_t* chosen_l = chosen.data() + l * n;
    uint8_t* crush_p = crush.data();
    const auto entry_of = entry;
    const auto held_at = held;
    int64_t picked = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (!chosen_l[j]) continue;
      ++picked;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t r = l * heads + h;
        if (held_at(r, j)) crush_p[r * n + entry_of(r, j)] = 1;
      }
    }
    shortfall[l] = unit * units[l] - picked;
    const uint8_t* x = imp.data() + l * heads * n;
    const uint8_t* y = crush.data() + l * heads * n;
    uint8_t* o = both.data() + l * heads * n;
    for (int64_t i = 0; i < heads * n; ++i) o[i] = x[i] | y[i];
  });
  top_up(c, both, scores, shortfall, more, buf.rest);
  parallel_for(rows, n, [&](int64_t r) {
    uint8_t* x = imp.data() + r * n;
    const uint8_t* m = more.data() + r * n;
    const uint8_t* y = crush.data() + r * n;
    uint8_t* o = keep + r * n;
    for (int64_t i = 0; i < n; ++i) {
      x[i] |= m[i];
      o[i] = x[i] | y[i];
    }
  });
  if (detail != nullptr) {
    if (detail->importance) std::copy(imp.begin(), imp.end(), detail->importance);
    if (detail->crush) std::copy(crush.begin(), crush.end(), detail->crush);
    if (detail->bits) std::copy(bits.begin(), bits.end(), detail->bits);
    if (detail->crush_budget)
      for (int64_t l = 0; l < layers; ++l) detail->crush_budget[l] = unit * units[l];
  }
}

void check_candidates(const Candidates& c) {
  check_size("layers", c.num_layers);
  check_size("heads", c.num_heads);
  check_size("n", c.n);
  if (c.block_size < 1)
    throw std::invalid_argument("block_size=" + std::to_string(c.block_size) +
                                ": allowed an integer >= 1");
  for (int64_t r = 0; r < rows_of(c); ++r)
    if (c.lengths[r] < 0 || c.lengths[r] > c.n)
      throw std::invalid_argument("lengths[" + std::to_string(r) + "]=" +
                                  std::to_string(c.lengths[r]) + ": allowed 0 .. n = " +
                                  std::to_string(c.n));
}

template <class W>
void apportion_impl(int64_t total, const W* weights, int64_t num_layers, int64_t cap,
                    int64_t* out) {
  // numpy's dtypes, step by step: ``w`` and ``real`` start in the weights' dtype; ``real``
  // becomes float64 as soon as a float64 value is written into it.
  constexpr bool kWide = std::is_same_v<W, double>;
  const auto size = static_cast<size_t>(num_layers);
  std::vector<W> w(size);
  for (size_t i = 0; i < size; ++i) w[i] = static_cast<double>(weights[i]) > 0 ? weights[i] : W(0);
  if (!(pairwise_sum(w.data(), num_layers) > 0)) std::fill(w.begin(), w.end(), W(1));
  std::vector<double> real(size, 0.0);
  bool real64 = kWide;
  std::vector<uint8_t> free(size, 1);
  std::vector<float> rf;
  std::vector<double> rd;
  std::vector<W> wf(size);
  while (std::any_of(free.begin(), free.end(), [](uint8_t f) { return f != 0; })) {
    double left;  // total - real[~free].sum()
    bool left64 = real64;
    if (real64) {
      rd.clear();
      for (size_t i = 0; i < size; ++i)
        if (!free[i]) rd.push_back(real[i]);
      left = static_cast<double>(total) - pairwise_sum(rd.data(), static_cast<int64_t>(rd.size()));
    } else {
      rf.clear();
      for (size_t i = 0; i < size; ++i)
        if (!free[i]) rf.push_back(static_cast<float>(real[i]));
      left = static_cast<float>(static_cast<float>(total) -
                                pairwise_sum(rf.data(), static_cast<int64_t>(rf.size())));
    }
    for (size_t i = 0; i < size; ++i) wf[i] = free[i] ? w[i] : W(0);
    const W wsum = pairwise_sum(wf.data(), num_layers);
    std::vector<double> fresh(size);
    bool fresh64;
    if (wsum > 0) {
      fresh64 = left64 || kWide;
      for (size_t i = 0; i < size; ++i)
        fresh[i] = fresh64 ? static_cast<double>(left) * static_cast<double>(wf[i]) /
                                 static_cast<double>(wsum)
                           : static_cast<double>(
                                 static_cast<float>(static_cast<float>(left) *
                                                    static_cast<float>(wf[i])) /
                                 static_cast<float>(wsum));
    } else {  // the free entries' weights are all 0: uniform over them, in float64
      fresh64 = true;
      double count = 0;
      for (uint8_t f : free) count += f;
      for (size_t i = 0; i < size; ++i) fresh[i] = left * (free[i] ? 1.0 : 0.0) / count;
    }
    real64 = real64 || fresh64;
    bool any_over = false;
    const double cap_value = real64 ? static_cast<double>(cap)
                                    : static_cast<double>(static_cast<float>(cap));
    for (size_t i = 0; i < size; ++i) {
      if (!free[i]) continue;
      real[i] = fresh[i];
      if (real[i] >= cap_value) {
        real[i] = cap_value;
        free[i] = 0;
        any_over = true;
      }
    }
    if (!any_over) break;
  }
  std::vector<double> frac(size);
  int64_t given = 0;
  for (size_t i = 0; i < size; ++i) {
    out[i] = std::min(static_cast<int64_t>(std::floor(real[i])), cap);
    given += out[i];
    frac[i] = out[i] < cap ? real[i] - static_cast<double>(out[i])
                           : -std::numeric_limits<double>::infinity();
  }
  const int64_t rest = total - given;
  std::vector<uint8_t> more(size);
  top_k_mask<double>(frac.data(), 1, num_layers, &rest, more.data());
  for (size_t i = 0; i < size; ++i) out[i] += more[i];
}

}  // namespace

// ---- configuration

Importance parse_importance(std::string_view name) {
  if (name == "streaming") return Importance::kStreaming;
  if (name == "h2o") return Importance::kH2O;
  if (name == "snapkv") return Importance::kSnapKV;
  if (name == "pyramidkv") return Importance::kPyramidKV;
  if (name == "adakv") return Importance::kAdaKV;
  invalid("eviction.importance", repr(name),
          "one of streaming, h2o, snapkv, pyramidkv, adakv (the C++ policies)");
}

Aggregation parse_aggregation(std::string_view name) {
  if (name == "norm_sum") return Aggregation::kNormSum;
  if (name == "sum") return Aggregation::kSum;
  invalid("eviction.aggregation_mode", repr(name), "one of norm_sum, sum");
}

Pooling parse_pooling(std::string_view name) {
  if (name == "max") return Pooling::kMax;
  if (name == "avg") return Pooling::kAvg;
  if (name == "none") return Pooling::kNone;
  invalid("eviction.pooling", repr(name), "one of max, avg, none");
}

Granularity parse_granularity(std::string_view name) {
  if (name == "token") return Granularity::kToken;
  if (name == "block") return Granularity::kBlock;
  invalid("kvcrush.granularity", repr(name), "one of token, block");
}

AdaScope parse_scope(std::string_view name) {
  if (name == "layer") return AdaScope::kLayer;
  if (name == "model") return AdaScope::kModel;
  invalid("adakv.scope", repr(name), "one of layer, model");
}

void validate(const PolicyConfig& cfg) {
  const auto importance = static_cast<int>(cfg.importance);
  if (importance < 0 || importance > static_cast<int>(Importance::kAdaKV))
    invalid("eviction.importance", repr(int64_t{importance}),
            "one of streaming, h2o, snapkv, pyramidkv, adakv");
  if (cfg.kernel_size < 1 || cfg.kernel_size % 2 == 0)
    invalid("eviction.kernel_size", repr(cfg.kernel_size), "an odd integer >= 1");
  if (cfg.offset < 0 || cfg.offset > cfg.kernel_size / 2)
    invalid("eviction.pooling_offset", repr(cfg.offset),
            "an integer in [0, kernel_size // 2 = " + std::to_string(cfg.kernel_size / 2) + "]");
  if (!(cfg.beta >= 1)) invalid("pyramidkv.beta", repr(cfg.beta), "a number >= 1");
  if (!(cfg.alpha >= 0.0 && cfg.alpha <= 1.0))
    invalid("adakv.alpha", repr(cfg.alpha), "a number in [0, 1]");
  if (!cfg.kvcrush) return;
  const KVCrushOptions& o = *cfg.kvcrush;
  if (!(o.share >= 0.0 && o.share <= 1.0))
    invalid("kvcrush.budget", repr(o.share),
            "a share of the total cache budget in [0, 1] (unlike GenAI's KVCrushConfig.budget, "
            "this is not a block count)");
  if (o.anchors.empty())
    invalid("kvcrush.anchor_point_mode", "()",
            std::string("one of ") + anchor_kinds() + " or a tuple of them");
  if (o.taper && !(o.taper_low >= 0.0 && o.taper_low < o.taper_high && std::isfinite(o.taper_high)))
    invalid("kvcrush.taper", "(" + repr(o.taper_low) + ", " + repr(o.taper_high) + ")",
            "None or (low, high) with 0 <= low < high");
  if (o.bit_aggregation && cfg.importance == Importance::kStreaming)
    invalid("kvcrush.aggregation_mode", o.bit_aggregation == Aggregation::kSum ? "'sum'"
                                                                               : "'norm_sum'",
            "only None with importance='streaming' (it has no aggregation_mode)");
}

double tapered_share(const KVCrushOptions& opts, int64_t total, int64_t num_written) {
  if (!opts.taper || num_written <= 0) return opts.share;
  const double ratio = static_cast<double>(total) / static_cast<double>(num_written);
  return opts.share * std::min(1.0, std::max(0.0, (ratio - opts.taper_low) /
                                                      (opts.taper_high - opts.taper_low)));
}

double share_for_budget(const KVCrushOptions& opts, int64_t total, int64_t num_keep,
                        int64_t num_written) {
  if (num_keep <= 0) return opts.share;
  const double share = tapered_share(opts, total, num_written);
  return std::min(1.0, share * static_cast<double>(total) / static_cast<double>(num_keep));
}

void pool_scores(const float* values, const int64_t* lengths, int64_t rows, int64_t n,
                 Pooling pooling, int64_t kernel_size, int64_t offset, float* out) {
  check_size("rows", rows);
  check_size("n", n);
  std::vector<float> src(values, values + rows * n);
  pool_owned(src, lengths, rows, n, pooling, kernel_size, offset, out);
}

PolicyConfig for_budget(const PolicyConfig& cfg, int64_t total, int64_t num_keep,
                        int64_t num_written) {
  PolicyConfig out = cfg;
  if (!cfg.kvcrush || num_keep <= 0) return out;
  out.kvcrush->share = share_for_budget(*cfg.kvcrush, total, num_keep, num_written);
  out.kvcrush->taper = false;
  return out;
}

int64_t anchor_bits(const PolicyConfig& cfg, int64_t num_heads, int64_t block_size) {
  if (cfg.kvcrush && cfg.kvcrush->granularity == Granularity::kBlock)
    return block_size * num_heads;
  return num_heads;
}

int64_t random_bits_size(const PolicyConfig& cfg, int64_t num_heads, int64_t block_size,
                         int64_t num_layers) {
  if (!cfg.kvcrush) return 0;
  const auto random = std::count(cfg.kvcrush->anchors.begin(), cfg.kvcrush->anchors.end(),
                                 AnchorKind::kRandom);
  return static_cast<int64_t>(random) * num_layers * anchor_bits(cfg, num_heads, block_size);
}

void policy_scores(const PolicyConfig& cfg, const Candidates& c, float* out,
                   std::optional<Aggregation> aggregation) {
  validate(cfg);
  check_candidates(c);
  const auto scores = scores_of(cfg, c, aggregation);
  std::copy(scores.begin(), scores.end(), out);
}

void select_keep(const PolicyConfig& cfg, const Candidates& c, int64_t num_keep,
                 const uint8_t* random_bits, uint8_t* keep, const SelectionDetail* detail,
                 SelectBuffers* buffers) {
  SelectBuffers local;
  SelectBuffers& buf = buffers != nullptr ? *buffers : local;
  validate(cfg);
  check_candidates(c);
  if (random_bits == nullptr && random_bits_size(cfg, c.num_heads, c.block_size,
                                                 c.num_layers) > 0)
    throw std::invalid_argument("random_bits=null: allowed R * L * D bytes with a random "
                                "anchor");
  if (cfg.kvcrush) {
    kvcrush_select(cfg, c, num_keep, random_bits, keep, detail, buf);
    return;
  }
  check_num_keep(num_keep);
  std::vector<float>& scores = buf.scores;
  if (cfg.importance == Importance::kStreaming)
    scores.clear();
  else
    scores_into(cfg, c, std::nullopt, scores, buf.pooled);
  std::vector<uint8_t>& out = buf.imp;
  importance_select(cfg, c, scores, num_keep, out);
  std::copy(out.begin(), out.end(), keep);
}

// ---- one event from the cached rows

EventPlan plan_event(const PolicyConfig& cfg, const SequenceRows& rows, const EventBudget& b,
                     const uint8_t* random_bits) {
  PlanWorkspace ws;
  plan_event(cfg, rows, b, random_bits, ws);
  return std::move(ws.plan);
}

const EventPlan& plan_event(const PolicyConfig& cfg, const SequenceRows& rows,
                            const EventBudget& b, const uint8_t* random_bits, PlanWorkspace& ws) {
  validate(cfg);
  const SelectFn select = [&](const Candidates& c, int64_t num_keep, uint8_t* keep) {
    select_keep(for_budget(cfg, b.budget, num_keep, b.num_written), c, num_keep, random_bits,
                keep, nullptr, &ws.select);
  };
  return plan_event(select, "policy", rows, b, ws);
}

void check_keep(const Candidates& c, const uint8_t* keep, int64_t num_keep,
                std::string_view who) {
  const int64_t n = c.n, num_rows = rows_of(c);
  std::vector<int64_t> per_row(static_cast<size_t>(num_rows));
  std::atomic<bool> padding{false};
  parallel_for(num_rows, n, [&](int64_t r) {
    const uint8_t* row = keep + r * n;
    const int64_t len = std::max<int64_t>(c.lengths[r], 0);
    int64_t k = 0;
    for (int64_t j = len; j < n; ++j) k += row[j] != 0;
    if (k) padding.store(true);
    k = 0;
    for (int64_t j = 0; j < std::min(len, n); ++j) k += row[j] != 0;
    per_row[r] = k;
  });
  if (padding.load()) throw PlanError(std::string(who) + ": keeps a padding entry");
  int64_t kept = 0;
  for (int64_t k : per_row) kept += k;
  const int64_t want = num_keep * num_rows;
  if (kept != want)
    throw PlanError(std::string(who) + ": kept " + std::to_string(kept) +
                    " candidates, the budget is exactly " + std::to_string(want) + " (" +
                    std::to_string(num_keep) + " per layer and head)");
}

const EventPlan& plan_event(const SelectFn& select, std::string_view who,
                            const SequenceRows& rows, const EventBudget& b, PlanWorkspace& ws) {
  check_size("layers", rows.num_layers);
  check_size("heads", rows.num_heads);
  const int64_t num_rows = rows.num_layers * rows.num_heads;
  const int64_t* off = rows.offsets;
  for (int64_t r = 0; r < num_rows; ++r)
    if (off[r + 1] < off[r])
      throw std::invalid_argument("offsets: allowed a non-decreasing [L * H + 1] array");
  // Every (layer, head) in position order: order[r][i] = the row holding its i-th position
  // (empty when the rows already are in position order, as before any eviction).
  auto& order = ws.order;
  if (order.size() < static_cast<size_t>(num_rows)) order.resize(static_cast<size_t>(num_rows));
  for (int64_t r = 0; r < num_rows; ++r) order[r].clear();  // keeps each one's capacity
  auto& sinks = ws.sinks;
  auto& recent = ws.recent;
  sinks.resize(static_cast<size_t>(num_rows));
  recent.resize(sinks.size());
  const int64_t recent_from = b.num_written - b.recent_size;
  parallel_for(num_rows, num_rows > 0 ? (off[num_rows] - off[0]) / num_rows * 4 : 0,
               [&](int64_t r) {
    const int64_t* p = rows.positions + off[r];
    const int64_t n = off[r + 1] - off[r];
    bool sorted = true;
    for (int64_t i = 1; i < n && sorted; ++i) sorted = p[i] > p[i - 1];
    if (!sorted) {
      std::vector<int64_t>& o = order[r];
      o.resize(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) o[i] = i;
      std::stable_sort(o.begin(), o.end(), [p](int64_t x, int64_t y) { return p[x] < p[y]; });
    }
    int64_t lo = 0, hi = 0;  // searchsorted(left) of start_size and of the recent window
    if (sorted) {
      lo = std::lower_bound(p, p + n, b.start_size) - p;
      hi = std::lower_bound(p, p + n, recent_from) - p;
    } else {
      for (int64_t i = 0; i < n; ++i) {
        lo += p[i] < b.start_size;
        hi += p[i] < recent_from;
      }
    }
    sinks[r] = lo;
    recent[r] = n - hi;
  });
  auto row_at = [&order](int64_t r, int64_t i) { return order[r].empty() ? i : order[r][i]; };
  for (int64_t r = 0; r < num_rows; ++r)
    if (sinks[r] != sinks[0] || recent[r] != recent[0])
      throw PlanError("eviction: sinks / recent window differ between heads");
  EventPlan& plan = ws.plan;
  plan.num_sinks = num_rows > 0 ? sinks[0] : 0;
  plan.num_recent = num_rows > 0 ? recent[0] : 0;
  plan.num_keep = b.budget - plan.num_sinks - plan.num_recent;
  if (plan.num_keep < 0)
    throw std::invalid_argument("eviction budget " + std::to_string(b.budget) + " < sinks " +
                                std::to_string(plan.num_sinks) + " + recent " +
                                std::to_string(plan.num_recent));
  // The candidates, padded to [L, H, N] (scores 0, counts 0, positions -1 in padding).
  auto& lengths = ws.lengths;
  lengths.resize(static_cast<size_t>(num_rows));
  int64_t n = 0, cached = 0;
  for (int64_t r = 0; r < num_rows; ++r) {
    lengths[r] = std::max<int64_t>(off[r + 1] - off[r] - plan.num_sinks - plan.num_recent, 0);
    n = std::max(n, lengths[r]);
    cached += lengths[r];
  }
  if (plan.num_keep * num_rows > cached)
    throw std::invalid_argument("eviction: budget " + std::to_string(b.budget) +
                                " exceeds the cached tokens");
  const auto size = static_cast<size_t>(num_rows * n);
  auto& scores = ws.scores;
  auto& counts = ws.counts;
  auto& positions = ws.positions;
  scores.resize(size);  // every entry is written below: the candidates, then the padding
  counts.resize(size);
  positions.resize(size);
  const auto queries = static_cast<float>(rows.num_queries);
  // no scored query: every count is 0 (= queries); else rows up to the first one count them all
  const int64_t first_query = rows.num_queries > 0 ? rows.query_positions[0]
                                                   : std::numeric_limits<int64_t>::max();
  parallel_for(num_rows, n * 4, [&](int64_t r) {
    const int64_t* p = rows.positions + off[r];
    for (int64_t j = 0; j < lengths[r]; ++j) {
      const int64_t row = row_at(r, plan.num_sinks + j);
      positions[r * n + j] = p[row];
      if (rows.scores == nullptr) {
        scores[r * n + j] = 0.0f;
        counts[r * n + j] = 1.0f;
        continue;
      }
      scores[r * n + j] = rows.scores[off[r] + row];
      if (p[row] <= first_query) {  // seen by every scored query (most rows)
        counts[r * n + j] = queries;
        continue;
      }
      const int64_t seen = rows.num_queries - (std::lower_bound(rows.query_positions,
                                                                rows.query_positions +
                                                                    rows.num_queries,
                                                                p[row]) -
                                               rows.query_positions);
      counts[r * n + j] = seen == rows.num_queries ? queries : static_cast<float>(seen);
    }
    std::fill(scores.begin() + r * n + lengths[r], scores.begin() + (r + 1) * n, 0.0f);
    std::fill(counts.begin() + r * n + lengths[r], counts.begin() + (r + 1) * n, 0.0f);
    std::fill(positions.begin() + r * n + lengths[r], positions.begin() + (r + 1) * n, -1);
  });
  const Candidates c{scores.data(), counts.data(), positions.data(), lengths.data(),
                     rows.num_layers, rows.num_heads, n, b.block_size};
  auto& keep = ws.keep;
  keep.resize(size);
  select(c, plan.num_keep, keep.data());
  check_keep(c, keep.data(), plan.num_keep, who);
  // Kept rows in row order: sinks, kept candidates and the recent window, by their rows.
  plan.keep_offsets.assign(static_cast<size_t>(num_rows + 1), 0);
  parallel_for(num_rows, n, [&](int64_t r) {  // kept per row, then their running sum
    int64_t k = 0;
    for (int64_t j = 0; j < lengths[r]; ++j) k += keep[r * n + j];
    plan.keep_offsets[r + 1] = k;
  });
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t rows_r = off[r + 1] - off[r];
    plan.keep_offsets[r + 1] += plan.keep_offsets[r] + std::min(rows_r, plan.num_sinks +
                                                                             plan.num_recent);
  }
  plan.keep_rows.resize(static_cast<size_t>(plan.keep_offsets[num_rows]));
  parallel_for(num_rows, n * 2, [&](int64_t r) {
    const int64_t rows_r = off[r + 1] - off[r];
    int64_t* out = plan.keep_rows.data() + plan.keep_offsets[r];
    auto stays = [&](int64_t i) {  // the i-th position: a sink, a kept candidate or recent
      const int64_t j = i - plan.num_sinks;
      return j < 0 || j >= lengths[r] || keep[r * n + j] != 0;
    };
    if (order[r].empty()) {  // rows in position order: the kept rows in order already
      for (int64_t i = 0; i < rows_r; ++i)
        if (stays(i)) *out++ = i;
      return;
    }
    std::vector<uint8_t> by_row(static_cast<size_t>(rows_r), 0);
    for (int64_t i = 0; i < rows_r; ++i) by_row[order[r][i]] = static_cast<uint8_t>(stays(i));
    for (int64_t i = 0; i < rows_r; ++i)
      if (by_row[i]) *out++ = i;
  });
  return plan;
}

// ---- budget arithmetic

void water_fill(int64_t total, const int64_t* capacity, int64_t k, int64_t* out) {
  check_size("k", k);
  std::vector<int64_t> cap(static_cast<size_t>(k));
  int64_t sum = 0, top = 0;
  for (int64_t i = 0; i < k; ++i) {
    cap[i] = std::max<int64_t>(capacity[i], 0);
    sum += cap[i];
    top = std::max(top, cap[i]);
  }
  if (total < 0 || total > sum)
    throw std::invalid_argument("water_fill: total=" + std::to_string(total) +
                                " must be in [0, capacity.sum()=" + std::to_string(sum) + "]");
  auto filled = [&](int64_t t) {
    int64_t s = 0;
    for (int64_t c : cap) s += std::min(c, t);
    return s;
  };
  int64_t lo = 0, hi = top;
  while (lo < hi) {  // the largest t with filled(t) <= total
    const int64_t mid = (lo + hi + 1) / 2;
    if (filled(mid) <= total)
      lo = mid;
    else
      hi = mid - 1;
  }
  int64_t rest = total;
  for (int64_t i = 0; i < k; ++i) {
    out[i] = std::min(cap[i], lo);
    rest -= out[i];
  }
  for (int64_t i = 0; i < k && rest > 0; ++i)
    if (cap[i] > lo) {
      ++out[i];
      --rest;
    }
}

void fit_budget(const int64_t* target, const int64_t* capacity, int64_t rows, int64_t k,
                int64_t* out) {
  check_size("rows", rows);
  check_size("k", k);
  const int64_t size = rows * k;
  int64_t want = 0, room = 0;
  for (int64_t i = 0; i < size; ++i) {
    want += target[i];
    room += std::max<int64_t>(capacity[i], 0);
  }
  if (want > room)
    throw std::invalid_argument("fit_budget: the budget " + std::to_string(want) +
                                " exceeds the " + std::to_string(room) + " candidates available");
  for (int64_t i = 0; i < size; ++i) out[i] = std::min(target[i], capacity[i]);
  std::vector<int64_t> spare(static_cast<size_t>(std::max(size, k))), more(spare.size());
  for (int64_t r = 0; r < rows; ++r) {
    int64_t over = 0, free = 0;
    for (int64_t i = r * k; i < (r + 1) * k; ++i) {
      over += target[i] - out[i];
      spare[i - r * k] = capacity[i] - out[i];
      free += spare[i - r * k];
    }
    if (over == 0) continue;
    water_fill(std::min(over, free), spare.data(), k, more.data());
    for (int64_t i = 0; i < k; ++i) out[r * k + i] += more[i];
  }
  int64_t rest = want;
  for (int64_t i = 0; i < size; ++i) rest -= out[i];
  if (rest == 0) return;
  for (int64_t i = 0; i < size; ++i) spare[i] = capacity[i] - out[i];
  water_fill(rest, spare.data(), size, more.data());
  for (int64_t i = 0; i < size; ++i) out[i] += more[i];
}

void head_quotas(const int64_t* lengths, int64_t num_layers, int64_t num_heads,
                 int64_t num_keep, int64_t* out) {
  check_num_keep(num_keep);
  const std::vector<int64_t> target(static_cast<size_t>(num_layers * num_heads), num_keep);
  fit_budget(target.data(), lengths, num_layers, num_heads, out);
}

void pyramid_budgets(int64_t num_layers, int64_t num_keep, double beta, int64_t* out) {
  check_size("layers", num_layers);
  if (num_layers == 1) {
    out[0] = num_keep;
    return;
  }
  const double low = static_cast<double>(num_keep) / beta;
  const double high = 2.0 * static_cast<double>(num_keep) - low;
  std::vector<double> frac(static_cast<size_t>(num_layers));
  int64_t rest = num_layers * num_keep;
  for (int64_t l = 0; l < num_layers; ++l) {
    const double real =
        high - (high - low) * static_cast<double>(l) / static_cast<double>(num_layers - 1);
    out[l] = static_cast<int64_t>(std::floor(real));
    frac[l] = real - static_cast<double>(out[l]);
    rest -= out[l];
  }
  // the largest remainders get one more (ties: lower index); numpy's order[:rest] slice
  const int64_t take = rest >= 0 ? std::min(rest, num_layers) : std::max<int64_t>(num_layers + rest, 0);
  std::vector<uint8_t> more(frac.size());
  top_k_mask<double>(frac.data(), 1, num_layers, &take, more.data());
  for (int64_t l = 0; l < num_layers; ++l) out[l] += more[l];
}

void pyramid_layer_budgets(const int64_t* lengths, int64_t num_layers, int64_t num_heads,
                           int64_t num_keep, double beta, int64_t* out) {
  check_num_keep(num_keep);
  const int64_t layers = num_layers, heads = num_heads;
  std::vector<int64_t> per_layer(static_cast<size_t>(std::max<int64_t>(layers, 0)));
  std::vector<int64_t> room(per_layer.size());
  pyramid_budgets(layers, num_keep, beta, per_layer.data());
  int64_t room_sum = 0;
  for (int64_t l = 0; l < layers; ++l) {
    room[l] = heads > 0 ? *std::min_element(lengths + l * heads, lengths + (l + 1) * heads) : 0;
    room_sum += room[l];
  }
  if (layers * num_keep <= room_sum) {  // equal counts in every head of a layer if they fit
    std::vector<int64_t> fitted(per_layer.size());
    fit_budget(per_layer.data(), room.data(), 1, layers, fitted.data());
    per_layer.swap(fitted);
  }
  std::vector<int64_t> target(static_cast<size_t>(layers * heads));
  for (int64_t r = 0; r < layers * heads; ++r) target[r] = per_layer[r / heads];
  fit_budget(target.data(), lengths, layers, heads, out);
}

void apportion(int64_t total, const float* weights, int64_t num_layers, int64_t cap,
               int64_t* out) {
  apportion_impl(total, weights, num_layers, cap, out);
}

void apportion(int64_t total, const double* weights, int64_t num_layers, int64_t cap,
               int64_t* out) {
  apportion_impl(total, weights, num_layers, cap, out);
}

bool match_heads(const int64_t* positions, const int64_t* lengths, int64_t num_layers,
                 int64_t num_heads, int64_t n, int64_t* idx, uint8_t* found) {
  const Candidates c{nullptr, nullptr, positions, lengths, num_layers, num_heads, n, 1};
  if (same_positions(c)) return true;
  const int64_t* end = positions + num_layers * num_heads * n;
  const int64_t top = std::max<int64_t>(0, end == positions ? 0 : *std::max_element(positions, end));
  const int64_t size = top + 2;  // position -> entry, padding in the spare last column
  parallel_for(num_layers, num_heads * (n + size), [&](int64_t l) {
    std::vector<int64_t> table(static_cast<size_t>(size));
    const int64_t* ref = positions + l * num_heads * n;
    const int64_t ref_len = lengths[l * num_heads];
    for (int64_t h = 0; h < num_heads; ++h) {
      const int64_t r = l * num_heads + h;
      std::fill(table.begin(), table.end(), -1);
      for (int64_t j = 0; j < n; ++j)
        table[j < lengths[r] ? positions[r * n + j] : size - 1] = j;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t got = table[j < ref_len ? ref[j] : size - 1];
        found[r * n + j] = static_cast<uint8_t>(got >= 0 && j < ref_len);
        idx[r * n + j] = std::max<int64_t>(got, 0);
      }
    }
  });
  return false;
}

}  // namespace kvcrush
