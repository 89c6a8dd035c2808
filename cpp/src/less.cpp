#include "kvcrush/less.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

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

}  // namespace

void kept_lse(const uint8_t* cache, int64_t num_blocks, const BlockLayout& layout,
              KeyFormat format, const HeadTables& t, const float* q, int64_t m,
              int64_t num_kv_heads, int64_t group, float scale, const int32_t* seq,
              const int32_t* off, bool sequence_major, float* out) {
  validate_layout(layout);
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
    const float* qh = q + i * hq * d + h * group * d;
    std::vector<float> key(static_cast<size_t>(d));
    std::vector<float> qs(static_cast<size_t>(group * d));  // q * scale (by channel: * key scale)
    std::vector<float> bias(static_cast<size_t>(group), 0.0f);
    std::vector<float> logits(static_cast<size_t>(group * n));  // [G, n]
    const bool u4 = layout.levels == 15;
    auto add = [&](int64_t g, int64_t r, float x) { logits[g * n + r] = x; };
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
        for (int64_t r = 0; r < rows; ++r) {
          const uint8_t* codes = block + layout.header_bytes + r * layout.row_bytes;
          if (u4) {
            for (int64_t c = 0; c < d; c += 2) {
              key[c] = static_cast<float>(codes[c / 2] >> 4);
              key[c + 1] = static_cast<float>(codes[c / 2] & 0x0F);
            }
          } else {
            for (int64_t c = 0; c < d; ++c) key[c] = static_cast<float>(codes[c]);
          }
          for (int64_t g = 0; g < group; ++g) {
            const float* qv = qs.data() + g * d;
            float x = 0.0f;
            for (int64_t c = 0; c < d; ++c) x += qv[c] * key[c];
            add(g, r0 + r, x - bias[g]);
          }
        }
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          decode_key(block, r, layout, format, key.data());
          for (int64_t g = 0; g < group; ++g) {
            const float* qv = qh + g * d;
            float x = 0.0f;
            for (int64_t c = 0; c < d; ++c) x += qv[c] * key[c];
            add(g, r0 + r, x * scale);
          }
        }
      }
    }
    for (int64_t g = 0; g < group; ++g) {  // log-sum-exp of each query head's logits
      const float* x = logits.data() + g * n;
      float top = x[0];
      for (int64_t r = 1; r < n; ++r) top = std::max(top, x[r]);
      float sum = 0.0f;
      for (int64_t r = 0; r < n; ++r) sum += std::exp(x[r] - top);
      out[i * hq + h * group + g] = top + std::log(sum);
    }
  });
}

}  // namespace kvcrush

namespace kvcrush {

namespace {

inline float gelu_tanh(float x) {
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + std::tanh(c * (x + 0.044715f * x * x * x)));
}

}  // namespace

void less_mix(const uint8_t* cache, int64_t num_blocks, const BlockLayout& layout,
              KeyFormat format, const HeadTables& tables, const float* q, const float* o_kept,
              int64_t m, int64_t num_kv_heads, int64_t group, int64_t v_dim, float scale,
              const int32_t* seq, const int32_t* off, bool sequence_major,
              const QueryFeatureMap& phi, const float* state_h, const float* state_z,
              float* out) {
  const int64_t hq = num_kv_heads * group, d = layout.head_dim;
  const int64_t y = phi.hidden, f = phi.features;
  if (y <= 0 || f <= 0 || v_dim <= 0)
    throw std::invalid_argument("phi: allowed positive hidden, features and v_dim");
  std::vector<float> lse(static_cast<size_t>(m * hq));
  kept_lse(cache, num_blocks, layout, format, tables, q, m, num_kv_heads, group, scale, seq, off,
           sequence_major, lse.data());
  parallel_for(m * hq, d * y + y * f + f * v_dim, [&](int64_t item) {
    const int64_t i = item / hq, head = item % hq, kv = head / group;
    const int64_t s = seq[i];
    std::vector<float> hid(static_cast<size_t>(y)), feat(static_cast<size_t>(f));
    const float* qv = q + i * hq * d + head * d;
    const float* w1 = phi.w1 + head * d * y;
    for (int64_t k = 0; k < y; ++k) hid[k] = phi.b1[head * y + k];
    for (int64_t c = 0; c < d; ++c)
      for (int64_t k = 0; k < y; ++k) hid[k] += qv[c] * w1[c * y + k];
    for (int64_t k = 0; k < y; ++k) hid[k] = gelu_tanh(hid[k]);
    const float* w2 = phi.w2 + head * y * f;
    for (int64_t k = 0; k < f; ++k) feat[k] = phi.b2[head * f + k];
    for (int64_t c = 0; c < y; ++c)
      for (int64_t k = 0; k < f; ++k) feat[k] += hid[c] * w2[c * f + k];
    const float* zs = state_z + (s * num_kv_heads + kv) * f;
    const float* hs = state_h + (s * num_kv_heads + kv) * f * v_dim;
    float z = 0.0f;
    for (int64_t k = 0; k < f; ++k) {
      feat[k] = std::fabs(gelu_tanh(feat[k]));
      z += feat[k] * zs[k];
    }
    const float* o = o_kept + i * hq * v_dim + head * v_dim;
    float* dst = out + i * hq * v_dim + head * v_dim;
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
