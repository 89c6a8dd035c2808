#include "kvcrush/less.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvcrush/fast_exp.hpp"
#include "kvcrush/parallel.hpp"

namespace kvcrush {

namespace {

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

/// Row ``row`` of head-block ``block`` -> f32 [D].
void decode_key(const uint8_t* block, int64_t row, const BlockLayout& layout, KeyFormat format,
                float* out) {
  const int64_t d = layout.head_dim;
  if (format == KeyFormat::by_channel) {
    decode_by_channel(block, row, layout, out);
    return;
  }
  const uint8_t* p = block + row * layout.row_bytes;
  if (format == KeyFormat::f32) {
    std::memcpy(out, p, static_cast<size_t>(d) * sizeof(float));
    return;
  }
  for (int64_t c = 0; c < d; ++c) {
    uint16_t v;
    std::memcpy(&v, p + 2 * c, sizeof(v));
    if (format == KeyFormat::bf16) {
      const uint32_t bits = static_cast<uint32_t>(v) << 16;
      std::memcpy(out + c, &bits, sizeof(float));
    } else {
      out[c] = half_to_float(v);
    }
  }
}

// The hot loops are compiled twice where the compiler can dispatch at load time (GCC / Clang
// on x86-64 Linux): for AVX2 + FMA and for the baseline the wheel targets
// (the clone is chosen by the features the CPU reports: GCC 12 knows the x86-64-v3 level,
// which includes FMA; older compilers and Clang get an AVX2 clone)
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12
#define KVCRUSH_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define KVCRUSH_HOT __attribute__((target_clones("avx2", "default")))
#else
#define KVCRUSH_HOT
#endif

/// Four rows' dot products with one query (four independent accumulators: the loop is
/// bound by throughput, not by the latency of one chain of additions).
KVCRUSH_HOT void dots4(const float* q, const float* k, int64_t d, float* out) {
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
  const float *k0 = k, *k1 = k + d, *k2 = k + 2 * d, *k3 = k + 3 * d;
  for (int64_t c = 0; c < d; ++c) {
    a0 += q[c] * k0[c];
    a1 += q[c] * k1[c];
    a2 += q[c] * k2[c];
    a3 += q[c] * k3[c];
  }
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
}

/// log sum_r exp(x[r]) of n > 0 logits.
KVCRUSH_HOT float log_sum_exp(const float* x, int64_t n) {
  float top = x[0];
  for (int64_t r = 1; r < n; ++r) top = std::max(top, x[r]);
  float sum = 0.0f;
  for (int64_t r = 0; r < n; ++r) sum += exp_nonpositive(x[r] - top);
  return top + std::log(sum);
}

/// logits[g * stride + r] = mul * (q_g . keys[r]) - bias[g] (bias may be null: 0) for the
/// ``rows`` keys [rows, D] of a block and the group's G queries q [G, D].
void block_logits(const float* q, const float* keys, int64_t rows, int64_t group, int64_t d,
                  float mul, const float* bias, float* logits, int64_t stride) {
  float four[4];
  for (int64_t g = 0; g < group; ++g) {
    const float* qv = q + g * d;
    const float sub = bias != nullptr ? bias[g] : 0.0f;
    float* dst = logits + g * stride;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      dots4(qv, keys + r * d, d, four);
      for (int k = 0; k < 4; ++k) dst[r + k] = four[k] * mul - sub;
    }
    for (; r < rows; ++r) {
      float x = 0.0f;
      for (int64_t c = 0; c < d; ++c) x += qv[c] * keys[r * d + c];
      dst[r] = x * mul - sub;
    }
  }
}

/// The codes of one by-channel key row as floats (u8, or u4 two per byte).
KVCRUSH_HOT void codes_to_float(const uint8_t* codes, int64_t d, bool u4, float* key) {
  if (u4) {
    for (int64_t c = 0; c < d; c += 2) {
      key[c] = static_cast<float>(codes[c / 2] >> 4);
      key[c + 1] = static_cast<float>(codes[c / 2] & 0x0F);
    }
  } else {
    for (int64_t c = 0; c < d; ++c) key[c] = static_cast<float>(codes[c]);
  }
}

}  // namespace

void check_rows(const RowSelection& sel, int64_t m) {
  if (sel.rows == nullptr) {
    if (sel.num_rows != m)
      throw std::invalid_argument("less_token_index: without one, allowed exactly T = M rows");
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    if (sel.rows[i] < 0 || sel.rows[i] >= sel.num_rows)
      throw std::out_of_range("less_token_index: row " + std::to_string(sel.rows[i]) +
                              " outside 0.." + std::to_string(sel.num_rows - 1));
    if (i > 0 && sel.rows[i] <= sel.rows[i - 1])
      throw std::invalid_argument("less_token_index: allowed strictly increasing rows");
  }
}

void kept_lse(const uint8_t* cache, int64_t num_blocks, const BlockLayout& layout,
              KeyFormat format, const HeadTables& t, const float* q, const RowSelection& sel,
              int64_t m, int64_t num_kv_heads, int64_t group, float scale, const int32_t* seq,
              const int32_t* off, bool sequence_major, float* out) {
  validate_layout(layout);
  check_rows(sel, m);
  if ((format == KeyFormat::by_channel) != layout.by_channel)
    throw std::invalid_argument("format: allowed by_channel exactly for a by-channel layout");
  if (num_kv_heads <= 0 || group <= 0 || t.num_subsequences % num_kv_heads != 0)
    throw std::invalid_argument("tables: allowed J = B * num_kv_heads subsequences");
  const int64_t d = layout.head_dim, bs = layout.block_size, hq = num_kv_heads * group;
  const int64_t b = t.num_subsequences / num_kv_heads;
  parallel_for(m * num_kv_heads, 4096, [&](int64_t item) {
    const int64_t i = item / num_kv_heads, h = item % num_kv_heads;
    const int64_t s = seq[i];
    if (s < 0 || s >= b)
      throw std::out_of_range("less: sequence " + std::to_string(s) + " outside 0.." +
                              std::to_string(b - 1));
    const int64_t j = sequence_major ? s * num_kv_heads + h : h * b + s;
    const int64_t n = static_cast<int64_t>(t.past[j]) + off[i] + 1;
    const int64_t first = t.begins[j], blocks = t.begins[j + 1] - first;
    if (off[i] < 0 || n > blocks * bs || first < 0 || t.begins[j + 1] > t.table_len)
      throw std::out_of_range("less: row " + std::to_string(n - 1) + " outside the table of "
                              "subsequence " + std::to_string(j));
    const float* qh = q + sel.row(i) * hq * d + h * group * d;
    std::vector<float> tile(static_cast<size_t>(bs * d));  // a block's keys, f32 [rows, D]
    std::vector<float> qs(static_cast<size_t>(group * d));  // q * scale (by channel: * key scale)
    std::vector<float> bias(static_cast<size_t>(group), 0.0f);
    std::vector<float> logits(static_cast<size_t>(group * n));  // [G, n]
    const bool u4 = layout.levels == 15;
    for (int64_t r0 = 0; r0 < n; r0 += bs) {
      const int64_t blk = t.table[first + r0 / bs];
      if (blk < 0 || blk >= num_blocks)
        throw std::out_of_range("less: block " + std::to_string(blk) + " outside 0.." +
                                std::to_string(num_blocks - 1));
      const uint8_t* block = cache + blk * layout.head_block_bytes;
      const int64_t rows = std::min(bs, n - r0);
      if (format == KeyFormat::by_channel) {
        // q . ((code - zp) * s) = sum_c (q_c s_c) code_c - sum_c q_c s_c zp_c: the block's
        // header is read once, each row is one dot product over its codes
        for (int64_t g = 0; g < group; ++g) {
          float b = 0.0f;
          for (int64_t c = 0; c < d; ++c) {
            float sc, zp;
            std::memcpy(&sc, block + 4 * c, sizeof(float));
            std::memcpy(&zp, block + 4 * (d + c), sizeof(float));
            qs[g * d + c] = qh[g * d + c] * sc * scale;
            b += qs[g * d + c] * zp;
          }
          bias[g] = b;
        }
        for (int64_t r = 0; r < rows; ++r)
          codes_to_float(block + layout.header_bytes + r * layout.row_bytes, d, u4,
                         tile.data() + r * d);
        block_logits(qs.data(), tile.data(), rows, group, d, 1.0f, bias.data(),
                     logits.data() + r0, n);
      } else {
        for (int64_t r = 0; r < rows; ++r)
          decode_key(block, r, layout, format, tile.data() + r * d);
        block_logits(qh, tile.data(), rows, group, d, scale, nullptr, logits.data() + r0, n);
      }
    }
    for (int64_t g = 0; g < group; ++g)  // log-sum-exp of each query head's logits
      out[i * hq + h * group + g] = log_sum_exp(logits.data() + g * n, n);
  });
}

}  // namespace kvcrush

namespace kvcrush {

namespace {

/// gelu, tanh approximation: 0.5 x (1 + tanh(u)) = x / (1 + e^{-2u}), u = sqrt(2/pi) (x +
/// 0.044715 x^3), with exp_core (|2u| clamped to 87, where the result is x or 0 in float).
inline float gelu_tanh(float x) {
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  float t = -2.0f * c * (x + 0.044715f * x * x * x);
  t = t < -87.0f ? -87.0f : (t > 87.0f ? 87.0f : t);
  return x / (1.0f + exp_core(t));
}

/// hid = gelu(q W1 + b1) [Y] and feat = |gelu(hid W2 + b2)| [F] of one query head.
KVCRUSH_HOT void query_features(const float* qv, const float* w1, const float* b1,
                                const float* w2, const float* b2, int64_t d, int64_t y,
                                int64_t f, float* hid, float* feat) {
  for (int64_t k = 0; k < y; ++k) hid[k] = b1[k];
  for (int64_t c = 0; c < d; ++c) {
    const float x = qv[c];
    const float* w = w1 + c * y;
    for (int64_t k = 0; k < y; ++k) hid[k] += x * w[k];
  }
  for (int64_t k = 0; k < y; ++k) hid[k] = gelu_tanh(hid[k]);
  for (int64_t k = 0; k < f; ++k) feat[k] = b2[k];
  for (int64_t c = 0; c < y; ++c)
    for (int64_t k = 0; k < f; ++k) feat[k] += hid[c] * w2[c * f + k];
  for (int64_t k = 0; k < f; ++k) feat[k] = std::fabs(gelu_tanh(feat[k]));
}

}  // namespace

void less_mix(const uint8_t* cache, int64_t num_blocks, const BlockLayout& layout,
              KeyFormat format, const HeadTables& tables, const float* q, const float* o_kept,
              const RowSelection& sel, int64_t m, int64_t num_kv_heads, int64_t group,
              int64_t v_dim, float scale,
              const int32_t* seq, const int32_t* off, bool sequence_major,
              const QueryFeatureMap& phi, const float* state_h, const float* state_z,
              float* out) {
  const int64_t hq = num_kv_heads * group, d = layout.head_dim;
  const int64_t y = phi.hidden, f = phi.features;
  if (y <= 0 || f <= 0 || v_dim <= 0)
    throw std::invalid_argument("phi: allowed positive hidden, features and v_dim");
  std::vector<float> lse(static_cast<size_t>(m * hq));
  kept_lse(cache, num_blocks, layout, format, tables, q, sel, m, num_kv_heads, group, scale, seq,
           off, sequence_major, lse.data());
  parallel_for(m * hq, d * y + y * f + f * v_dim, [&](int64_t item) {
    const int64_t i = item / hq, head = item % hq, kv = head / group;
    const int64_t s = seq[i], r = sel.row(i);
    std::vector<float> hid(static_cast<size_t>(y)), feat(static_cast<size_t>(f));
    query_features(q + r * hq * d + head * d, phi.w1 + head * d * y, phi.b1 + head * y,
                   phi.w2 + head * y * f, phi.b2 + head * f, d, y, f, hid.data(), feat.data());
    const float* zs = state_z + (s * num_kv_heads + kv) * f;
    const float* hs = state_h + (s * num_kv_heads + kv) * f * v_dim;
    float z = 0.0f;
    for (int64_t k = 0; k < f; ++k) z += feat[k] * zs[k];
    const float* o = o_kept + r * hq * v_dim + head * v_dim;
    float* dst = out + r * hq * v_dim + head * v_dim;
    if (!(z > 0.0f)) {  // empty state: exactly the kept part
      if (dst != o) std::copy(o, o + v_dim, dst);
      return;
    }
    const float a = 1.0f / (1.0f + std::exp(std::log(z) - lse[static_cast<size_t>(item)]));
    const float b = (1.0f - a) / z;
    for (int64_t c = 0; c < v_dim; ++c) {
      float n = 0.0f;
      for (int64_t k = 0; k < f; ++k) n += feat[k] * hs[k * v_dim + c];
      dst[c] = a * o[c] + b * n;
    }
  });
}

}  // namespace kvcrush
