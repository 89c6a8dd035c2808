#include "kvcrush/compaction.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kvcrush/parallel.hpp"

// The re-quantization's loops are vectorized for the CPU the process runs on (GCC / Clang on
// x86-64 pick the clone at load time); every clone rounds the same (-ffp-contract=off, no
// reassociation), so the results are bit for bit those of the portable build.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && defined(__linux__)
#define KVCRUSH_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KVCRUSH_CPU_CLONES
#endif

namespace kvcrush {

namespace {

inline float load_f32(const uint8_t* p) {
  float x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

inline void store_f32(uint8_t* p, float x) { std::memcpy(p, &x, sizeof(x)); }

/// Code of channel c in a by-channel key row (u8: one byte; u4: even channel = high nibble).
inline int code_at(const uint8_t* row, int64_t c, bool u4) {
  if (!u4) return row[c];
  const uint8_t b = row[c / 2];
  return (c % 2 == 0) ? (b >> 4) : (b & 0x0F);
}

void check_moves(int64_t num_blocks, const BlockLayout& layout, const int64_t* dst,
                 int64_t num_dst, const int64_t* offsets, const int64_t* pairs) {
  if (num_dst < 0 || offsets[0] != 0)
    throw std::invalid_argument("offsets: allowed offsets[0] == 0");
  std::vector<uint8_t> seen(static_cast<size_t>(std::max<int64_t>(num_blocks, 0)), 0);
  auto block_ok = [&](int64_t b) { return b >= 0 && b < num_blocks; };
  const std::string range = "0.." + std::to_string(num_blocks - 1);
  for (int64_t i = 0; i < num_dst; ++i) {
    const int64_t n = offsets[i + 1] - offsets[i];
    if (n < 0) throw std::invalid_argument("offsets: allowed non-decreasing offsets");
    if (n > layout.block_size)
      throw std::invalid_argument("kv_codec: more than " + std::to_string(layout.block_size) +
                                  " rows for one block");
    if (!block_ok(dst[i]))
      throw std::out_of_range("kv_codec: block index " + std::to_string(dst[i]) +
                              " outside " + range);
    if (seen[dst[i]]++)
      throw std::invalid_argument("kv_codec: destination blocks must be distinct");
  }
  for (int64_t j = 0; j < offsets[num_dst]; ++j) {
    if (!block_ok(pairs[2 * j]))
      throw std::out_of_range("kv_codec: block index " + std::to_string(pairs[2 * j]) +
                              " outside " + range);
    if (pairs[2 * j + 1] < 0 || pairs[2 * j + 1] >= layout.block_size)
      throw std::out_of_range("kv_codec: source row " + std::to_string(pairs[2 * j + 1]) +
                              " outside 0.." + std::to_string(layout.block_size - 1));
  }
}

/// Builds destination ``i``'s new head-block into ``out`` (zeroed, head_block_bytes).
void build_block(const uint8_t* cache, int64_t stride, const BlockLayout& layout,
                 const int64_t* pairs, int64_t n, bool lossless_single_source, uint8_t* out) {
  if (n == 0) return;
  const int64_t hb = layout.header_bytes, rb = layout.row_bytes;
  bool single = layout.by_channel && lossless_single_source;
  for (int64_t r = 1; single && r < n; ++r) single = pairs[2 * r] == pairs[0];
  if (!layout.by_channel || single) {  // bytes: the source block's header, then the rows
    if (single) std::memcpy(out, cache + pairs[0] * stride, static_cast<size_t>(hb));
    for (int64_t r = 0; r < n; ++r)
      std::memcpy(out + hb + r * rb, cache + pairs[2 * r] * stride + hb + pairs[2 * r + 1] * rb,
                  static_cast<size_t>(rb));
    return;
  }
  const int64_t d = layout.head_dim;
  thread_local std::vector<float> x;  // the rows decoded, [n, d]; kept by each thread
  x.resize(static_cast<size_t>(n * d));
  for (int64_t r = 0; r < n; ++r)
    decode_by_channel(cache + pairs[2 * r] * stride, pairs[2 * r + 1], layout, x.data() + r * d);
  encode_by_channel(x.data(), n, layout, out);
}

}  // namespace

void validate_layout(const BlockLayout& l) {
  const bool u4 = l.by_channel && l.levels == 15;
  const int64_t want_rows = l.by_channel ? (u4 ? l.head_dim / 2 : l.head_dim) : l.row_bytes;
  if (l.block_size <= 0 || l.head_dim <= 0 || l.row_bytes <= 0 || want_rows != l.row_bytes ||
      (l.by_channel && l.header_bytes != 8 * l.head_dim) ||
      (!l.by_channel && l.header_bytes != 0) ||
      (l.by_channel && l.levels != 255 && l.levels != 15) ||
      l.header_bytes + l.block_size * l.row_bytes != l.head_block_bytes)
    throw std::invalid_argument("layout: allowed a kv_codec.CacheLayout's geometry (block_size " +
                                std::to_string(l.block_size) + ", head_dim " +
                                std::to_string(l.head_dim) + ", row_bytes " +
                                std::to_string(l.row_bytes) + ")");
}

KVCRUSH_CPU_CLONES void decode_by_channel(const uint8_t* block, int64_t row, const BlockLayout& layout,
                       float* out) {
  const int64_t d = layout.head_dim;
  const uint8_t* codes = block + layout.header_bytes + row * layout.row_bytes;
  const uint8_t* scales = block;
  const uint8_t* zps = block + 4 * d;
  if (layout.levels != 15) {  // u8: one byte a channel (a loop that vectorizes)
    for (int64_t c = 0; c < d; ++c)
      out[c] = (static_cast<float>(codes[c]) - load_f32(zps + 4 * c)) * load_f32(scales + 4 * c);
    return;
  }
  for (int64_t c = 0; c < d; ++c)
    out[c] = (static_cast<float>(code_at(codes, c, true)) - load_f32(zps + 4 * c)) *
             load_f32(scales + 4 * c);
}

KVCRUSH_CPU_CLONES void encode_by_channel(const float* x, int64_t n, const BlockLayout& layout, uint8_t* out) {
  std::memset(out, 0, static_cast<size_t>(layout.head_block_bytes));
  if (n <= 0) return;
  const int64_t d = layout.head_dim;
  const bool u4 = layout.levels == 15;
  const auto levels = static_cast<float>(layout.levels);
  const auto inv_levels = static_cast<float>(1.0 / layout.levels);
  thread_local std::vector<float> per_channel;  // lo, hi, inv, zp: [4, d]
  per_channel.resize(static_cast<size_t>(4 * d));
  float* lo = per_channel.data();
  float* hi = lo + d;
  float* inv = hi + d;
  float* zp = inv + d;
  std::memcpy(lo, x, static_cast<size_t>(d) * sizeof(float));
  std::memcpy(hi, x, static_cast<size_t>(d) * sizeof(float));
  for (int64_t r = 1; r < n; ++r) {  // row by row: the channel loop vectorizes
    const float* xr = x + r * d;
    for (int64_t c = 0; c < d; ++c) {
      lo[c] = std::min(lo[c], xr[c]);
      hi[c] = std::max(hi[c], xr[c]);
    }
  }
  for (int64_t c = 0; c < d; ++c) {
    float scale = (hi[c] - lo[c]) * inv_levels;
    if (scale == 0.0f) scale = 0.0001f;
    zp[c] = -lo[c] / scale;
    inv[c] = 1.0f / scale;
    store_f32(out + 4 * c, scale);
    store_f32(out + 4 * (d + c), zp[c]);
  }
  // fma as the plugin's kernels: exact f64 product, sum rounded to f64 then to f32; rint
  // (round half to even) without a libm call: for |f| < 2^22, f + 1.5 * 2^23 lands where the
  // float spacing is 1; larger |f| are clamped below anyway; NaN -> 0
  auto quantize = [levels](float xv, float iv, float z) {
    const double t = static_cast<double>(xv) * static_cast<double>(iv) + static_cast<double>(z);
    const auto f = static_cast<float>(t);
    float q = (f + 12582912.0f) - 12582912.0f;
    q = q > levels ? levels : q;
    return q >= 0.0f ? q : 0.0f;
  };
  uint8_t* codes = out + layout.header_bytes;
  for (int64_t r = 0; r < n; ++r) {
    uint8_t* row = codes + r * layout.row_bytes;
    const float* xr = x + r * d;
    if (!u4) {
      for (int64_t c = 0; c < d; ++c) row[c] = static_cast<uint8_t>(quantize(xr[c], inv[c], zp[c]));
      continue;
    }
    for (int64_t c = 0; c < d; ++c) {
      const auto code = static_cast<uint8_t>(quantize(xr[c], inv[c], zp[c]));
      row[c / 2] |= static_cast<uint8_t>(c % 2 == 0 ? code << 4 : code);
    }
  }
}

void compact_blocks(uint8_t* cache, int64_t num_blocks, int64_t block_stride,
                    const BlockLayout& layout, const int64_t* dst, int64_t num_dst,
                    const int64_t* offsets, const int64_t* pairs, bool lossless_single_source) {
  validate_layout(layout);
  if (block_stride < layout.head_block_bytes)
    throw std::invalid_argument("block_stride=" + std::to_string(block_stride) +
                                ": allowed at least the head-block's bytes");
  check_moves(num_blocks, layout, dst, num_dst, offsets, pairs);
  const int64_t hbb = layout.head_block_bytes;
  // Read everything first: the new blocks go to a buffer, then over their destinations.
  std::vector<uint8_t> fresh(static_cast<size_t>(num_dst * hbb), 0);
  const int64_t work = layout.block_size * layout.head_dim * (layout.by_channel ? 8 : 1);
  parallel_for(num_dst, work, [&](int64_t i) {
    build_block(cache, block_stride, layout, pairs + 2 * offsets[i], offsets[i + 1] - offsets[i],
                lossless_single_source, fresh.data() + i * hbb);
  });
  parallel_for(num_dst, hbb, [&](int64_t i) {
    std::memcpy(cache + dst[i] * block_stride, fresh.data() + i * hbb, static_cast<size_t>(hbb));
  });
}

void compact_many(const CacheMoves* jobs, int64_t num_jobs, bool lossless_single_source,
                  std::vector<uint8_t>& scratch) {
  if (num_jobs < 0) throw std::invalid_argument("num_jobs: allowed >= 0");
  std::vector<int64_t> first(static_cast<size_t>(num_jobs + 1), 0);  // first destination
  std::vector<int64_t> at(static_cast<size_t>(num_jobs + 1), 0);      // its bytes in scratch
  int64_t work = 1;
  for (int64_t j = 0; j < num_jobs; ++j) {
    const CacheMoves& m = jobs[j];
    try {
      if (m.layout == nullptr) throw std::invalid_argument("layout: allowed a BlockLayout");
      validate_layout(*m.layout);
      if (m.block_stride < m.layout->head_block_bytes)
        throw std::invalid_argument("block_stride=" + std::to_string(m.block_stride) +
                                    ": allowed at least the head-block's bytes");
      check_moves(m.num_blocks, *m.layout, m.dst, m.num_dst, m.offsets, m.pairs);
    } catch (const std::out_of_range& e) {
      throw std::out_of_range("job " + std::to_string(j) + ": " + e.what());
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("job " + std::to_string(j) + ": " + e.what());
    }
    first[j + 1] = first[j] + m.num_dst;
    at[j + 1] = at[j] + m.num_dst * m.layout->head_block_bytes;
    work = std::max(work, m.layout->block_size * m.layout->head_dim *
                              (m.layout->by_channel ? 8 : 1));
  }
  const int64_t total = first[num_jobs];
  if (total == 0) return;
  scratch.resize(static_cast<size_t>(at[num_jobs]));
  auto locate = [&](int64_t i) {  // (job, destination within it)
    const int64_t j = std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1;
    return std::pair<int64_t, int64_t>(j, i - first[j]);
  };
  parallel_for(total, work, [&](int64_t i) {
    const auto [j, d] = locate(i);
    const CacheMoves& m = jobs[j];
    const int64_t hbb = m.layout->head_block_bytes;
    uint8_t* out = scratch.data() + at[j] + d * hbb;
    std::memset(out, 0, static_cast<size_t>(hbb));
    build_block(m.cache, m.block_stride, *m.layout, m.pairs + 2 * m.offsets[d],
                m.offsets[d + 1] - m.offsets[d], lossless_single_source, out);
  });
  parallel_for(total, 512, [&](int64_t i) {
    const auto [j, d] = locate(i);
    const CacheMoves& m = jobs[j];
    const int64_t hbb = m.layout->head_block_bytes;
    std::memcpy(m.cache + m.dst[d] * m.block_stride, scratch.data() + at[j] + d * hbb,
                static_cast<size_t>(hbb));
  });
}

}  // namespace kvcrush

namespace kvcrush {

void fill_holes(const int64_t* keep, int64_t k, int64_t* out) {
  const int64_t stay = std::lower_bound(keep, keep + k, k) - keep;  // keep[:stay] < k
  for (int64_t i = 0; i < k; ++i) out[i] = i;
  if (stay == k) return;
  std::vector<uint8_t> hole(static_cast<size_t>(k), 1);
  for (int64_t i = 0; i < stay; ++i) hole[static_cast<size_t>(keep[i])] = 0;
  int64_t next = stay;
  for (int64_t i = 0; i < k; ++i)
    if (hole[static_cast<size_t>(i)]) out[i] = keep[next++];
}

void gather_rows(const float* const* tables, const int64_t* have, const int64_t* order,
                 const int64_t* offsets, int64_t num_tables, float* out) {
  const int64_t total = num_tables > 0 ? offsets[num_tables] : 0;
  for (int64_t i = 0; i < total; ++i)
    if (order[i] < 0) throw std::invalid_argument("gather_rows: order holds a negative row");
  parallel_for(num_tables, num_tables > 0 ? total / num_tables * 2 : 0, [&](int64_t r) {
    const float* src = tables[r];
    const int64_t n = have[r];
    for (int64_t i = offsets[r]; i < offsets[r + 1]; ++i)
      out[i] = order[i] < n ? src[order[i]] : 0.0f;
  });
}

void plan_compaction(const TableRows& t, bool fill, CompactionPlan& plan) {
  if (t.num_tables < 0 || t.num_heads < 1 || t.num_tables % t.num_heads != 0)
    throw std::invalid_argument("num_heads: allowed >= 1, dividing the " +
                                std::to_string(t.num_tables) + " tables");
  if (t.block_size < 1) throw std::invalid_argument("block_size: allowed >= 1");
  const int64_t T = t.num_tables, bs = t.block_size;
  if (t.row_offsets[0] != 0 || t.block_offsets[0] != 0)
    throw std::invalid_argument("row_offsets, block_offsets: allowed arrays starting at 0");
  std::vector<int64_t> pos_offsets(static_cast<size_t>(T + 1), 0);
  for (int64_t r = 0; r < T; ++r) {
    const int64_t k = t.row_offsets[r + 1] - t.row_offsets[r];
    const int64_t nb = t.block_offsets[r + 1] - t.block_offsets[r];
    if (k < 0 || nb < 0)
      throw std::invalid_argument("row_offsets, block_offsets: allowed non-decreasing arrays");
    if (t.lens[r] < 0 || nb * bs < t.lens[r])
      throw std::invalid_argument("block_offsets: table " + std::to_string(r) + " holds " +
                                  std::to_string(nb) + " blocks for " +
                                  std::to_string(t.lens[r]) + " rows");
    pos_offsets[r + 1] = pos_offsets[r] + t.lens[r];
  }
  const int64_t K = t.row_offsets[T];
  plan.order.resize(static_cast<size_t>(K));
  plan.positions.resize(static_cast<size_t>(K));
  // pass 1 (parallel): validate, order, positions, blocks rewritten per table
  std::vector<int64_t> moved(static_cast<size_t>(T), 0);
  parallel_for(T, K / std::max<int64_t>(T, 1) * 4, [&](int64_t r) {
    const int64_t lo = t.row_offsets[r], k = t.row_offsets[r + 1] - lo, n = t.lens[r];
    const int64_t* rows = t.rows + lo;
    auto bad = [&](const char* what) {
      throw std::invalid_argument("compact: rows of layer " + std::to_string(r / t.num_heads) +
                                  " head " + std::to_string(r % t.num_heads) + " must be " +
                                  what + ", in [0, " + std::to_string(n) + ")");
    };
    for (int64_t i = 0; i < k; ++i)
      if (rows[i] < 0 || rows[i] >= n) bad("unique");
    int64_t* order = plan.order.data() + lo;
    if (fill) {
      for (int64_t i = 1; i < k; ++i)
        if (rows[i] <= rows[i - 1]) bad("sorted and unique");
      fill_holes(rows, k, order);
    } else {
      std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
      for (int64_t i = 0; i < k; ++i) {
        if (seen[static_cast<size_t>(rows[i])]) bad("unique");
        seen[static_cast<size_t>(rows[i])] = 1;
        order[i] = rows[i];
      }
    }
    int64_t* pos = plan.positions.data() + lo;
    const int64_t* old_pos = t.positions ? t.positions + pos_offsets[r] : nullptr;
    for (int64_t i = 0; i < k; ++i) pos[i] = old_pos ? old_pos[order[i]] : order[i];
    int64_t m = 0;
    for (int64_t b = 0; b * bs < k; ++b) {
      const int64_t end = std::min(k, (b + 1) * bs);
      for (int64_t i = b * bs; i < end; ++i)
        if (order[i] != i) {
          ++m;
          break;
        }
    }
    moved[static_cast<size_t>(r)] = m;
  });
  std::vector<int64_t> first(static_cast<size_t>(T + 1), 0);  // first move of each table
  for (int64_t r = 0; r < T; ++r) first[r + 1] = first[r] + moved[r];
  const int64_t M = first[T];
  plan.move_table.resize(static_cast<size_t>(M));
  plan.move_slot.resize(static_cast<size_t>(M));
  plan.move_offsets.resize(static_cast<size_t>(M + 1));
  // pass 2 (serial, cheap): which blocks move; their pair offsets
  int64_t m = 0, total = 0;
  plan.move_offsets[0] = 0;
  for (int64_t r = 0; r < T; ++r) {
    const int64_t lo = t.row_offsets[r], k = t.row_offsets[r + 1] - lo;
    const int64_t* order = plan.order.data() + lo;
    for (int64_t b = 0; b * bs < k && m < first[r + 1]; ++b) {
      const int64_t end = std::min(k, (b + 1) * bs);
      for (int64_t i = b * bs; i < end; ++i)
        if (order[i] != i) {
          plan.move_table[m] = r;
          plan.move_slot[m] = b;
          total += end - b * bs;
          plan.move_offsets[++m] = total;
          break;
        }
    }
  }
  plan.pairs.resize(static_cast<size_t>(2 * total));
  // pass 3 (parallel): the source pairs
  parallel_for(T, K / std::max<int64_t>(T, 1) * 2, [&](int64_t r) {
    const int64_t lo = t.row_offsets[r], k = t.row_offsets[r + 1] - lo;
    const int64_t* order = plan.order.data() + lo;
    const int64_t* blocks = t.blocks + t.block_offsets[r];
    for (int64_t j = first[r]; j < first[r + 1]; ++j) {
      const int64_t b = plan.move_slot[j];
      int64_t* out = plan.pairs.data() + 2 * plan.move_offsets[j];
      for (int64_t i = b * bs; i < std::min(k, (b + 1) * bs); ++i) {
        *out++ = blocks[order[i] / bs];
        *out++ = order[i] % bs;
      }
    }
  });
}

}  // namespace kvcrush
