// ``LESSMix`` (opset "kvcrush"): the whole LESS mixing of one layer (transformations/less.py) as
// an OpenVINO op the CPU plugin runs natively (no call into Python per layer and step). It runs
// kvcrush::less_mix (less.hpp). kvcrush::AddLESS (passes.hpp) creates one per active layer. Its
// code lives in kvcrush_passes, which kvcrush_ov._core links: loaded for the whole process, so
// the nodes and every compiled model holding them can never outlive it.
//
// Inputs: 0 q f32 [T, Hq*D] (every token of the step), 1 the kept output f32 [T, Hq*Dv]
// (PagedAttention's, merged over heads), 2 less_token_index i32 [M] (the rows to mix),
// 3 key_cache.L (per-head pool [NB, 1, rows, cols]), 4 head_past_lens.L [J], 5 block_indices.L,
// 6 block_indices_begins.L [J+1], 7 less_token_seq [M], 8 less_token_offset [M], 9 scale [],
// 10 less_state_H.L [B, Hkv, F, Dv], 11 less_state_z.L [B, Hkv, F], 12..15 phi's w1 [Hq, D, Y],
// b1 [Hq, Y], w2 [Hq, Y, F], b2 [Hq, F]. J = B * Hkv subsequences, head-major (j = h*B + s) or
// sequence-major (j = s*Hkv + h); token m sees rows 0 .. past[j] + offset[m] of subsequence j
// (its own key included, causal). Output f32 [T, Hq*Dv]: input 1 with its rows idx mixed. One op
// per layer does the row selection too: each op of the decode graph costs a dispatch, most of
// it for small ones.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include <openvino/op/op.hpp>

#include "kvcrush/compaction.hpp"
#include "kvcrush/less.hpp"

namespace kvcrush {

/// The attributes of a LESSMix op: the step's head layout and the key cache's format.
struct LESSMixAttributes {
  int64_t num_kv_heads = 1;
  int64_t group = 1;  ///< query heads per KV head
  bool sequence_major = false;
  KeyFormat format = KeyFormat::by_channel;
  BlockLayout layout{};  ///< one key head-block (kv_codec.CacheLayout.native)
};

class LESSMixOp : public ov::op::Op {
 public:
  OPENVINO_OP("LESSMix", "kvcrush")
  static constexpr size_t kNumInputs = 16;

  LESSMixOp() = default;
  /// The op on ``args`` (the 16 inputs above).
  LESSMixOp(const ov::OutputVector& args, const LESSMixAttributes& attributes);

  void validate_and_infer_types() override;
  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override;
  bool visit_attributes(ov::AttributeVisitor& visitor) override;
  bool has_evaluate() const override { return true; }
  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;

  LESSMixAttributes attributes() const;

 private:
  int64_t num_kv_heads_ = 1;
  int64_t group_ = 1;
  bool sequence_major_ = false;
  int64_t format_ = 0;
  int64_t levels_ = 255;
  BlockLayout layout_{};
};

}  // namespace kvcrush
