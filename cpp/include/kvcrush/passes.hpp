// kvcrush's graph transformations as OpenVINO model passes (the one implementation; the Python
// modules kvcrush_ov.transformations.{paged,logits,per_head} call these through
// kvcrush_ov._core). Every pass rewrites the model in place.
//
// ToPaged: an optimum-exported stateful SDPA model -> PagedAttentionExtension ops (OpenVINO's
//   ov::pass::SDPAToPagedAttention with this project's flags). Inputs afterwards (T = scheduled
//   tokens of all sequences, B = sequences): input_ids [T] i64, position_ids [T] i64,
//   max_context_len [] i32, past_lens [B], subsequence_begins [B+1], block_indices_begins [B+1],
//   block_indices [total blocks] (all i32), key_cache.L / value_cache.L per layer; outputs
//   logits [T, 1, V] and, with score outputs, scores.L per layer.
//
// LogitsIndices: adds Parameter logits_indices [N] i64 and, directly before the lm_head MatMul,
//   Gather(hidden [T, 1, H], logits_indices, axis 0) named "<lm_head>/logits_indices_gather";
//   logits becomes [N, 1, V]. The MatMul is found from the Result named "logits" through
//   single-activation ops (Convert, Multiply, Divide, Add, Subtract, Tanh, Clamp).
//
// ToPerHead: every (sequence, KV head) pair becomes its own PagedAttention subsequence (the
//   layout is specified in transformations/per_head.py's module docstring). Per layer L, with
//   Hkv KV heads, G query heads per KV head, head sizes D (keys) and Dv (values):
//
//     query [T, Hq*D]  -> Reshape [T, Hkv, G*D] -> Transpose -> [Hkv, T, G*D] -> [Hkv*T, G*D]
//     key   [T, Hkv*D] -> Reshape [T, Hkv, D]   -> Transpose -> [Hkv*T, D]   (value with Dv)
//     PagedAttention (rt_info num_k_heads = num_v_heads = 1)
//     out [Hkv*T, G*Dv] -> [Hkv, T, G*Dv] -> Transpose -> [T, Hkv, G*Dv] -> [T, Hq*Dv]
//
//   (nodes named "<pa>/per_head_{q,k,v}/{split,heads_first,rows}" and
//   "<pa>/per_head_out/{split,tokens_first,merge}"). With sequence_major (decode graphs, one
//   token per sequence) q / k / v / out are single Reshapes ("<pa>/per_head_{q,k,v}/rows",
//   "<pa>/per_head_out/merge") and no Transpose is added. New inputs: head_subsequence_begins
//   [B*Hkv+1] (shared), per layer head_past_lens.L [B*Hkv], block_indices.L [*],
//   block_indices_begins.L [B*Hkv+1] (all i32); score_aggregation_window [B], when present, is
//   tiled per head ("<pa>/window_tile"). past_lens, subsequence_begins, block_indices and
//   block_indices_begins are removed when nothing else reads them. The model's rt_info gets
//   kvcrush_per_head/{num_kv_heads (int64), num_layers (int64), sequence_major (bool)}.
//
// FastKVCut: the per-KV-head (or plain) paged model cut after decoder layer L into FastKV's front
//   or back part (the layout is specified in transformations/fastkv.py's module docstring). The
//   cut point is the residual stream h_L [T, 1, D]: from the first rank-3 float output reached
//   from the input_ids Parameter, every Add of that output's shape that reads it is the next
//   residual; decoder layer l outputs stream[2l + 2].
//     front: Result h_L (tensor name "hidden_states") and the scores.l results with l <= L; the
//       Parameters those read (in the model's order); model name "fastkv_front".
//     back: Parameter "hidden_states" (h_L's type and shape, first) in place of h_L; the logits
//       and scores.l (l > L) results and the Parameters they read; model name "fastkv_back".
//   Either part drops the model's rt_info (the former Python code built new ov::Models).
//
// AddLESS: LESS decode attention in the per-KV-head graph (layout: transformations/less.py's
//   module docstring). PagedAttention is unchanged; per active layer L (only the weights' active
//   layers: elsewhere LESS is exactly PagedAttention), with q the per-head rewrite's input
//   [T, Hq*D] (walking back through "<pa>/per_head_q*") and out its "<pa>/per_head_out/merge"
//   [T, Hq*Dv]:
//
//     out' = LESSMix(f32(q), f32(out), less_token_index, key_cache.L, head_past_lens.L,
//                    block_indices.L, block_indices_begins.L, less_token_seq,
//                    less_token_offset, Convert(scale, f32), less_state_H.L, less_state_z.L,
//                    Constant w1 [Hq, D, Y], b1 [Hq, Y], w2 [Hq, Y, F], b2 [Hq, F])
//
//   (less_mix_op.hpp; f32(x) a Convert unless x is f32), converted back to out's type when that
//   is not f32, named "<pa>/less_out", in place of out for all its readers. New inputs:
//   less_token_index, less_token_seq, less_token_offset [M] i32, per active layer
//   less_state_H.L [B, Hkv, F, Dv] and less_state_z.L [B, Hkv, F] f32; the model's rt_info gets
//   kvcrush_less/feature_dim (int64).
//
// SetCacheTypes: every key_cache.L / value_cache.L Parameter gets the element type and shape
//   [?, dims...] the plugin compiles a one-head paged cache to (a cache read by another op than
//   PagedAttention is left untyped by the plugin).
//
// Errors: LogitsPatternError / PerHeadPatternError (std::runtime_error) name the pass and the
// node that does not match. ToPerHead checks every PagedAttention op before it changes anything.
// FastKVPatternError (std::invalid_argument, as a split_layer out of range) likewise; FastKVCut
// checks everything before it changes the model. LESSPatternError (std::runtime_error) likewise;
// AddLESS checks every layer before it changes anything.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <openvino/core/model.hpp>
#include <openvino/core/type/element_type.hpp>
#include <openvino/pass/pass.hpp>

#include "kvcrush/compaction.hpp"
#include "kvcrush/less.hpp"

namespace ov {
class Core;
}

namespace kvcrush {

inline constexpr const char* kLogitsName = "logits";
inline constexpr const char* kLogitsIndicesName = "logits_indices";
inline constexpr const char* kPagedAttentionType = "PagedAttentionExtension";
inline constexpr const char* kHeadSubsequenceBegins = "head_subsequence_begins";
inline constexpr const char* kPerHeadRtKey = "kvcrush_per_head";
inline constexpr const char* kHiddenStatesName = "hidden_states";
inline constexpr const char* kLESSTokenIndex = "less_token_index";
inline constexpr const char* kLESSTokenSeq = "less_token_seq";
inline constexpr const char* kLESSTokenOffset = "less_token_offset";
inline constexpr const char* kLESSRtKey = "kvcrush_less";

std::string head_past_lens_name(int64_t layer);
std::string block_indices_name(int64_t layer);
std::string block_indices_begins_name(int64_t layer);
std::string less_state_h_name(int64_t layer);  ///< less_state_H.L
std::string less_state_z_name(int64_t layer);  ///< less_state_z.L

/// The model does not have the logits -> lm_head MatMul layout LogitsIndices expects.
class LogitsPatternError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The model does not have the paged-attention layout ToPerHead expects.
class PerHeadPatternError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The model's residual stream does not have the decoder-layer shape FastKVCut expects.
class FastKVPatternError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// The model does not have the per-head paged layout AddLESS expects.
class LESSPatternError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// LESS's trained weights as AddLESS needs them (kvcrush_ov.less.kernels.LESSWeights): phi's
/// kernels of every layer, row-major f32: q_w1 [L, Hq, D, Y], q_b1 [L, Hq, Y], q_w2 [L, Hq, Y, F],
/// q_b2 [L, Hq, F]. Only ``active_layers`` get a LESSMix op.
struct LESSWeights {
  int64_t num_layers = 0;
  int64_t num_heads = 0;     ///< Hq
  int64_t num_kv_heads = 0;  ///< Hkv
  int64_t head_dim = 0;      ///< D
  int64_t hidden = 0;        ///< Y
  int64_t feature_dim = 0;   ///< F
  std::vector<int64_t> active_layers;
  std::vector<float> q_w1, q_b1, q_w2, q_b2;
};

/// Flags of the paged-attention conversion (the order of ov::pass::SDPAToPagedAttention's).
struct PagedOptions {
  bool score_outputs = true;       ///< scores.L output per layer (head-summed scores)
  bool score_aggregation = false;  ///< score_aggregation_window [B] i32 input
  bool per_layer_blocks = false;   ///< block_indices.L input per layer
};

/// SDPA -> PagedAttentionExtension (ov::pass::SDPAToPagedAttention(per_layer_blocks,
/// score_outputs, score_aggregation, no rotation, no xattention, no adaptive RKV, no qq-bias)).
class ToPaged : public ov::pass::ModelPass {
 public:
  OPENVINO_MODEL_PASS_RTTI("kvcrush::ToPaged");
  explicit ToPaged(PagedOptions options = {}) : options_(options) {}
  bool run_on_model(const std::shared_ptr<ov::Model>& model) override;

 private:
  PagedOptions options_;
};

/// Adds logits_indices [N] i64 and gathers those tokens before the lm_head MatMul.
class LogitsIndices : public ov::pass::ModelPass {
 public:
  OPENVINO_MODEL_PASS_RTTI("kvcrush::LogitsIndices");
  bool run_on_model(const std::shared_ptr<ov::Model>& model) override;
};

/// Per-KV-head subsequences (see the top of this file). Throws PerHeadPatternError.
class ToPerHead : public ov::pass::ModelPass {
 public:
  OPENVINO_MODEL_PASS_RTTI("kvcrush::ToPerHead");
  explicit ToPerHead(bool sequence_major = false) : sequence_major_(sequence_major) {}
  bool run_on_model(const std::shared_ptr<ov::Model>& model) override;

 private:
  bool sequence_major_;
};

/// Which part of FastKV's cut FastKVCut leaves.
enum class FastKVPart { front, back };

/// Rewrites the model into FastKV's front or back part cut after decoder layer ``split_layer``
/// (in [0, N - 2]; see the top of this file). Throws std::invalid_argument for a split_layer out
/// of range, FastKVPatternError for a residual stream that does not match.
class FastKVCut : public ov::pass::ModelPass {
 public:
  OPENVINO_MODEL_PASS_RTTI("kvcrush::FastKVCut");
  FastKVCut(int64_t split_layer, FastKVPart part) : split_layer_(split_layer), part_(part) {}
  bool run_on_model(const std::shared_ptr<ov::Model>& model) override;

 private:
  int64_t split_layer_;
  FastKVPart part_;
};

/// LESS mixing in a per-head paged model (see the top of this file). ``key_format`` /
/// ``key_layout``: the compiled key cache's format (the LESSMix attributes). Throws
/// LESSPatternError naming the node that does not match, std::invalid_argument for weights
/// whose arrays do not have their sizes.
class AddLESS : public ov::pass::ModelPass {
 public:
  OPENVINO_MODEL_PASS_RTTI("kvcrush::AddLESS");
  AddLESS(LESSWeights weights, KeyFormat key_format, const BlockLayout& key_layout)
      : weights_(std::move(weights)), key_format_(key_format), key_layout_(key_layout) {}
  bool run_on_model(const std::shared_ptr<ov::Model>& model) override;

 private:
  LESSWeights weights_;
  KeyFormat key_format_;
  BlockLayout key_layout_;
};

/// The element types and dims (after the block axis) of a compiled one-head paged cache.
struct CacheTypes {
  ov::element::Type key_type, value_type;
  std::vector<int64_t> key_dims, value_dims;
};

/// key_cache.L / value_cache.L Parameters -> [?, dims...] of those types (top of this file).
class SetCacheTypes : public ov::pass::ModelPass {
 public:
  OPENVINO_MODEL_PASS_RTTI("kvcrush::SetCacheTypes");
  explicit SetCacheTypes(CacheTypes types) : types_(std::move(types)) {}
  bool run_on_model(const std::shared_ptr<ov::Model>& model) override;

 private:
  CacheTypes types_;
};

/// ``[h_0, h_1, ...]``: the token embedding's output, then every residual Add's output in order
/// (two per decoder layer; layer l outputs element 2l + 2). Throws FastKVPatternError.
std::vector<ov::Output<ov::Node>> residual_stream(const ov::Model& model);

/// Decoder layers of a paged model: its Parameters named (friendly name) ``key_cache.*``.
int64_t count_layers(const ov::Model& model);

/// The MatMul producing the "logits" output (walking up from its Result). Throws
/// LogitsPatternError.
std::shared_ptr<ov::Node> find_lm_head(const ov::Model& model);

/// Each runs its pass through an ov::pass::Manager on ``model`` (in place).
void to_paged(const std::shared_ptr<ov::Model>& model, const PagedOptions& options = {});
void add_logits_indices(const std::shared_ptr<ov::Model>& model);
void to_per_head(const std::shared_ptr<ov::Model>& model, bool sequence_major = false);
void add_less(const std::shared_ptr<ov::Model>& model, const LESSWeights& weights,
              KeyFormat key_format, const BlockLayout& key_layout);
void set_cache_types(const std::shared_ptr<ov::Model>& model, const CacheTypes& types);
void fastkv_cut(const std::shared_ptr<ov::Model>& model, int64_t split_layer, FastKVPart part);

/// (front, back): FastKVCut on two clones of ``model``, which stays unchanged.
std::pair<std::shared_ptr<ov::Model>, std::shared_ptr<ov::Model>> split_at_layer(
    const ov::Model& model, int64_t split_layer);

/// Reads openvino_model.xml (or a folder holding it) and converts it: to_paged, then
/// add_logits_indices when ``logits_indices``. The result cannot be serialized: convert at load.
std::shared_ptr<ov::Model> read_paged_model(ov::Core& core, const std::string& path,
                                            const PagedOptions& options = {},
                                            bool logits_indices = true);

}  // namespace kvcrush
