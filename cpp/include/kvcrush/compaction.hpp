// KV-cache compaction: rewrite destination head-blocks densely from source rows, in place, for
// every cache precision of the CPU plugin's paged cache (byte layouts in
// kvcrush_ov/engine/kv_codec.py, which builds a BlockLayout and calls compact_blocks).
//
// Invalid moves throw std::invalid_argument (duplicate destinations, too many rows) or
// std::out_of_range (a block or row index outside the cache); nothing is written then.
#pragma once

#include <cstdint>
#include <vector>

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

/// One compact_blocks call's arguments (see there): the moves of one cache (one layer's keys or
/// values, one head of it: ``cache`` points at that head's first head-block).
struct CacheMoves {
  uint8_t* cache;
  int64_t num_blocks;
  int64_t block_stride;
  const BlockLayout* layout;
  const int64_t* dst;
  int64_t num_dst;
  const int64_t* offsets;
  const int64_t* pairs;
};

/// compact_blocks of ``num_jobs`` caches in one parallel pass over every destination of every
/// job (an eviction event's layers, keys and values: one set of threads instead of one per
/// cache). Every job is validated before anything is written (the first invalid one throws as
/// compact_blocks does, naming ``job i``); jobs must not write the same memory. ``scratch``
/// holds the new blocks and is reused (kept by the caller from one event to the next).
void compact_many(const CacheMoves* jobs, int64_t num_jobs, bool lossless_single_source,
                  std::vector<uint8_t>& scratch);

// ---- the bookkeeping of one sequence's compaction (HeadKVCacheManager.compact)

/// One sequence's block tables and what an eviction keeps, per table ``r`` (= layer * H + head,
/// T tables). Table r holds head-blocks blocks[block_offsets[r] .. block_offsets[r + 1]) and
/// its lens[r] rows (row i in block i / block_size, slot i % block_size); rows[row_offsets[r]
/// .. row_offsets[r + 1]) are the rows it keeps (unique, in [0, lens[r])): in the new order, or
/// sorted when ``fill_holes``; positions: i64 [sum lens] the rows' positions table after table,
/// or null for 0 .. lens[r] - 1 in every table. num_heads: H (names a table in errors).
struct TableRows {
  const int64_t* blocks;
  const int64_t* block_offsets;
  const int64_t* lens;
  const int64_t* rows;
  const int64_t* row_offsets;
  const int64_t* positions;
  int64_t num_tables;
  int64_t num_heads;
  int64_t block_size;
};

/// The result of plan_compaction, reused from one event to the next (its vectors keep their
/// capacity: nothing is allocated once they are large enough). order: i64 [K] the new row i of
/// table r is old row order[row_offsets[r] + i]; positions: i64 [K] the new rows' positions;
/// moves: the M rewritten blocks in table order, ascending within a table: block slot
/// move_slot[m] of table move_table[m] receives the (source block, source row) pairs
/// pairs[2 * move_offsets[m] .. 2 * move_offsets[m + 1]) (sources are the blocks as they were).
struct CompactionPlan {
  std::vector<int64_t> order;
  std::vector<int64_t> positions;
  std::vector<int64_t> move_table;
  std::vector<int64_t> move_slot;
  std::vector<int64_t> move_offsets;
  std::vector<int64_t> pairs;
};

/// order: the kept rows ``keep`` (k, sorted, unique) as fill_holes orders them: kept rows below
/// k stay where they are, the kept rows at or above k fill the holes below k (ascending into
/// ascending). Writes out[0 .. k).
void fill_holes(const int64_t* keep, int64_t k, int64_t* out);

/// Per-row values (e.g. accumulated attention scores) after a compaction: for table r, new row
/// i is old row order[offsets[r] + i] of ``tables[r]`` (``have[r]`` values), or 0 where that
/// row is at or past ``have[r]`` (a row the values do not cover yet). Writes out[0 ..
/// offsets[num_tables]). Parallel over tables. Throws std::invalid_argument on a negative row.
void gather_rows(const float* const* tables, const int64_t* have, const int64_t* order,
                 const int64_t* offsets, int64_t num_tables, float* out);

/// Plans the compaction of every table into ``plan`` (packed densely from each table's first
/// block; a block is rewritten iff one of its new rows comes from elsewhere). Throws
/// std::invalid_argument naming the table (``compact: rows of layer l head h must be unique,
/// in [0, n)``, or sorted with fill_holes) or the field (block_offsets, row_offsets: too few
/// blocks for lens). Parallel over tables.
void plan_compaction(const TableRows& t, bool fill_holes, CompactionPlan& plan);

}  // namespace kvcrush
