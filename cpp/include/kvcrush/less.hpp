// LESS (kvcrush_ov/less): the kept part's attention normaliser, read from the paged cache.
//
// PagedAttention returns only its normalised output; LESS mixes its state in with the
// log-sum-exp of the logits over the keys each query sees. kept_lse computes it from the cache
// bytes (any key format of kv_codec) through per-(sequence, KV head) block tables, the layout of
// transformations/per_head.py. The LESSMix op (less_mix_op.hpp) runs less_mix, which calls it.
#pragma once

#include <cstdint>

#include "kvcrush/compaction.hpp"

namespace kvcrush {

/// How key rows are stored: by channel (u8 / u4, BlockLayout::by_channel) or plain rows.
enum class KeyFormat : int { by_channel = 0, f32 = 1, f16 = 2, bf16 = 3 };

/// Per-head block tables of one layer: subsequence ``j`` (``J`` of them) has ``past[j]`` cached
/// rows before this step and the blocks ``table[begins[j] .. begins[j + 1])``.
struct HeadTables {
  const int32_t* past = nullptr;
  const int32_t* table = nullptr;
  const int32_t* begins = nullptr;
  int64_t num_subsequences = 0;  ///< J = B * num_kv_heads
  int64_t table_len = 0;
};

/// Which rows of a step's ``[T, width]`` arrays the ``m`` selected tokens are: token ``i`` is row
/// ``rows[i]`` (strictly increasing, each in ``[0, num_rows)``), or row ``i`` when ``rows`` is
/// null (then ``num_rows`` is ``m``). check_rows throws std::out_of_range / invalid_argument
/// naming ``less_token_index`` otherwise.
struct RowSelection {
  const int32_t* rows = nullptr;
  int64_t num_rows = 0;  ///< T
  int64_t row(int64_t i) const { return rows != nullptr ? rows[i] : i; }
};
void check_rows(const RowSelection& sel, int64_t m);

/// For ``m`` selected tokens: token ``i`` of sequence ``seq[i]`` at offset ``off[i]`` among the
/// sequence's new tokens, and every query head ``h * group + g`` (q f32 [T, Hq * D], token
/// ``i`` in row ``sel.row(i)``; out f32 [m, Hq]):
/// ``out[i, h*group+g] = log sum_{r <= past[j] + off[i]} exp(scale * q . key_j[r])`` with
/// ``j = seq*Hkv + h`` (sequence_major) or ``h*B + seq``, ``B = J / Hkv``. ``cache``: head-block
/// ``b`` at ``cache + b * layout.head_block_bytes``, ``0 <= b < num_blocks``. Parallel over
/// (token, KV head). Throws std::out_of_range for a block, row or sequence index outside its
/// range (nothing is written then for that item; the call rethrows after the others finish).
void kept_lse(const uint8_t* cache, int64_t num_blocks, const BlockLayout& layout,
              KeyFormat format, const HeadTables& tables, const float* q,
              const RowSelection& sel, int64_t m, int64_t num_kv_heads, int64_t group,
              float scale, const int32_t* seq, const int32_t* off, bool sequence_major,
              float* out);

}  // namespace kvcrush

namespace kvcrush {

/// One layer's LESS feature map of the queries (kvcrush_ov/less/kernels.py): per query head,
/// ``phi(q) = |gelu(gelu(q W1 + b1) W2 + b2)|`` (tanh gelu); w1 [Hq, D, Y], b1 [Hq, Y],
/// w2 [Hq, Y, F], b2 [Hq, F].
struct QueryFeatureMap {
  const float* w1 = nullptr;
  const float* b1 = nullptr;
  const float* w2 = nullptr;
  const float* b2 = nullptr;
  int64_t hidden = 0;    ///< Y
  int64_t features = 0;  ///< F
};

/// The whole LESS mixing of one layer for ``m`` selected tokens (rows ``sel.row(i)`` of the
/// step's T tokens), in place of kept_lse + the graph ops around it: ``out[r, head] = a *
/// o_kept[r, head] + (1 - a) * N / Z`` for each selected row ``r``, with ``L`` = kept_lse,
/// ``N = phi(q) H[seq, kv]``, ``Z = phi(q) z[seq, kv]``, ``a = sigmoid(L - log Z)`` and ``a = 1``
/// exactly when ``Z = 0``. q: f32 [T, Hq * D]; o_kept / out: f32 [T, Hq * Dv] (may alias; rows
/// not selected are not written); state_h: f32 [B, Hkv, F, Dv], state_z: f32 [B, Hkv, F].
/// Other arguments as kept_lse. The rows are checked (check_rows) before anything is written.
void less_mix(const uint8_t* cache, int64_t num_blocks, const BlockLayout& layout,
              KeyFormat format, const HeadTables& tables, const float* q, const float* o_kept,
              const RowSelection& sel, int64_t m, int64_t num_kv_heads, int64_t group,
              int64_t v_dim, float scale, const int32_t* seq, const int32_t* off, bool sequence_major,
              const QueryFeatureMap& phi, const float* state_h, const float* state_z,
              float* out);

}  // namespace kvcrush
