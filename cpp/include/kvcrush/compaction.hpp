// KV-cache compaction: rewrite destination head-blocks densely from source rows, in place, for
// every cache precision of the CPU plugin's paged cache (byte layouts in
// kvcrush_ov/engine/kv_codec.py, which builds a BlockLayout and calls compact_blocks).
//
// Invalid moves throw std::invalid_argument (duplicate destinations, too many rows) or
// std::out_of_range (a block or row index outside the cache); nothing is written then.
#pragma once

#include <cstdint>

namespace kvcrush {

/// One head-block's format (see kv_codec.CacheLayout).
struct BlockLayout {
  /// u8 / u4 keys: quantized per channel over the block's rows, behind a header of
  /// scale[D] f32 then zero point[D] f32. Everything else (values quantized per token, bf16,
  /// f16, f32) is made of self-contained token rows, moved as bytes.
  bool by_channel = false;
  int levels = 255;  ///< 255 (u8) or 15 (u4, two codes a byte, even channel high nibble)
  int64_t block_size = 0;
  int64_t head_dim = 0;
  int64_t head_block_bytes = 0;
  int64_t header_bytes = 0;  ///< 8 * head_dim for by-channel keys, else 0
  int64_t row_bytes = 0;     ///< bytes of one token row after the header
};

/// Throws std::invalid_argument naming ``layout`` unless it is a consistent geometry.
void validate_layout(const BlockLayout& layout);

/// Row ``row`` of a by-channel key head-block -> f32 [D]: ``(q - zp) * scale`` in f32.
void decode_by_channel(const uint8_t* block, int64_t row, const BlockLayout& layout, float* out);

/// Rows x [n, D] (f32, n <= block_size) -> one by-channel key head-block ``out``
/// [head_block_bytes], quantized over the n rows with the plugin's formula (below); rows >= n
/// and, for n == 0, the whole block are zero.
void encode_by_channel(const float* x, int64_t n, const BlockLayout& layout, uint8_t* out);

/// Rewrites ``num_dst`` destination head-blocks: destination ``i`` (block ``dst[i]``) receives
/// the source rows ``pairs[j] = (source block, source row)`` for ``j`` in
/// ``[offsets[i], offsets[i + 1])`` as rows ``0 .. n - 1`` in that order; rows ``>= n`` are
/// zeroed (a destination without rows becomes a zero block). Every source is read before any
/// destination is written, so sources may lie in destination blocks of the same call.
///
/// By-channel keys: a destination whose rows all come from ONE source block keeps that block's
/// header and codes when ``lossless_single_source`` (lossless); others are dequantized
/// (``x = (q - zp) * scale`` in f32) and re-quantized with the plugin's formula
/// (``scale = (max - min) * (1 / levels)``, 0 -> 0.0001; ``zp = -min / scale``;
/// ``q = clamp(rint(f32(f64(x) * f64(1 / scale) + f64(zp))), 0, levels)``), bit for bit what
/// kv_codec's numpy encoder produced. Other formats: rows copied as bytes.
///
/// cache: head-block ``b`` starts at ``cache + b * block_stride`` (bytes), ``0 <= b <
/// num_blocks``; dst: [num_dst]; offsets: [num_dst + 1] (offsets[0] == 0, non-decreasing);
/// pairs: [offsets[num_dst], 2]. Parallel over destinations.
void compact_blocks(uint8_t* cache, int64_t num_blocks, int64_t block_stride,
                    const BlockLayout& layout, const int64_t* dst, int64_t num_dst,
                    const int64_t* offsets, const int64_t* pairs, bool lossless_single_source);

}  // namespace kvcrush
