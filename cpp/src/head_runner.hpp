// The per-KV-head model runner used with eviction (Python: engine/head_model_runner.py), for one
// sequence: every (layer, KV head) has its own block table in the layer's pool of head blocks
// (one block of one KV head), so layers and heads may hold different tokens after eviction.
//
// Two compiled graphs share the cache tensors: the scored graph (head-major subsequences,
// scores.L outputs summed over the last score_aggregation_window queries) runs every step that
// needs scores and every multi-token step; the decode graph (sequence-major, no score outputs)
// runs the decode steps that need none. With plain_prefill, a third one, the plain paged graph,
// runs the unscored multi-token steps while the table holds whole block groups (head h of
// plain block g is head block g * H + h in every layer, so the pools seen as
// [blocks, H, rows, cols] are a plain paged cache; Python: HeadTable.plain_table).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <openvino/runtime/core.hpp>
#include <openvino/runtime/infer_request.hpp>
#include <openvino/runtime/tensor.hpp>

#include "input_tensors.hpp"
#include "kvcrush/compaction.hpp"

namespace kvcrush {

/// One sequence's per-layer, per-head block tables (Python: HeadTable). Row r of (l, h) is
/// row r % block_size of head block blocks[l][h][r / block_size] and holds position
/// positions[l][h][r].
struct HeadTable {
  std::vector<std::vector<std::vector<int32_t>>> blocks;    // [L][H] head-block ids
  std::vector<std::vector<std::vector<int64_t>>> positions;  // [L][H] position of each row
  int64_t num_written = 0;  ///< positions whose K/V were written (the next one's RoPE position)
  int64_t version = 0;      ///< changes whenever a block list changes (set by HeadRunner)

  int64_t len(size_t layer, size_t head) const {
    return static_cast<int64_t>(positions[layer][head].size());
  }
  /// Rows per (layer, head) on average (Python: Evictor._held).
  double mean_len() const;
  int64_t num_blocks() const;  ///< head blocks held, every layer and head
};

/// (layer, destination head block, [(source block, source row)...]): after an eviction, the
/// listed rows become rows 0.. of the destination (Python: head_cache_manager.Move).
struct Move {
  size_t layer;
  int32_t dst;
  std::vector<int64_t> pairs;  // [n, 2] flattened
};

class HeadRunner {
 public:
  HeadRunner(ov::Core& core, const std::filesystem::path& model_dir, const std::string& device,
             const std::string& precision, bool plain_prefill = false);

  /// Pools of ``blocks_per_head * num_kv_heads`` head blocks per layer, zeroed; frees every
  /// table (one request at a time).
  void allocate(int64_t blocks_per_head);
  /// ``count`` more rows in every (layer, head) of ``t`` at positions num_written.. .
  void append(HeadTable& t, int64_t count);
  /// Keeps rows ``rows[l][h]`` of every (layer, head) (new row i = old row rows[l][h][i]),
  /// moving K/V in the cache (re-quantizing u8 / u4 key blocks that gather several sources)
  /// and freeing emptied blocks (Python: HeadKVCacheManager.compact + apply_moves).
  void compact(HeadTable& t, const std::vector<std::vector<std::vector<int64_t>>>& rows);

  /// One step: ``count`` tokens at positions ``t.num_written - count ..`` (rows appended).
  /// ``window`` > 0: the scored graph, scores summed over the last ``window`` queries, written
  /// to ``scores`` ([L] flat per layer, head segments of t.len(l, h) each, head-major);
  /// 0: no scores (the decode graph when count == 1, the plain graph for a chunk of a table
  /// of whole groups when built with plain_prefill). Returns the last token's logits.
  const float* run(const int64_t* ids, int64_t count, const HeadTable& t, int64_t window,
                   std::vector<std::vector<float>>* scores);

  int64_t num_layers() const { return num_layers_; }
  int64_t num_kv_heads() const { return num_heads_; }
  int64_t block_size() const { return block_size_; }
  int64_t vocab_size() const { return vocab_; }
  /// Bytes of one head block (block_size tokens of one KV head in one layer, K and V).
  int64_t head_block_bytes() const { return key_layout_.head_block_bytes + value_layout_.head_block_bytes; }
  /// Bytes of a full block (every layer and head), comparable with the plain runner's.
  int64_t block_bytes() const { return head_block_bytes() * num_heads_ * num_layers_; }
  /// Steps run on the plain graph so far.
  int64_t plain_steps() const { return plain_steps_; }

 private:
  /// One compiled graph's request, its input tensors and the table version they hold.
  struct Request {
    ov::InferRequest req;
    InputTensors inputs;
    int64_t table_version = -1;
  };
  void set_tables(Request& r, const HeadTable& t, int64_t count, bool decode);
  void warm_decode_graph();
  /// The plain block table of ``t`` when every (layer, head) holds whole groups in the same
  /// order and nothing was evicted; empty otherwise.
  std::vector<int32_t> plain_table(const HeadTable& t) const;
  const float* run_plain(const int64_t* ids, int64_t count, const HeadTable& t,
                         const std::vector<int32_t>& blocks);

  ov::CompiledModel scored_, decode_, plain_;  // plain_: only with plain_prefill
  Request scored_req_, decode_req_, plain_req_;
  int64_t plain_steps_ = 0;
  int64_t versions_ = 0;  // the last version given to a table
  int64_t num_layers_ = 0, num_heads_ = 0, block_size_ = 0, vocab_ = 0, pool_blocks_ = 0;
  ov::element::Type key_type_, value_type_;
  ov::Shape key_shape_, value_shape_;  // one head block: [1, rows, cols]
  BlockLayout key_layout_, value_layout_;
  std::vector<ov::Tensor> keys_, values_;
  std::vector<std::vector<int32_t>> free_;  // [L] free head blocks (popped from the back)
};

}  // namespace kvcrush
