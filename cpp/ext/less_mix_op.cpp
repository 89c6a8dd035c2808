// kvcrush's OpenVINO extension library (libkvcrush_ov_ext.so): ``LESSMix``, the whole LESS
// mixing of one layer (transformations/less.py), as an op the CPU plugin runs natively (no call
// into Python per layer and step). Its Python twin, kvcrush_ov/engine/less_op.py's LESSMix, has
// the same inputs, attributes and output; both run kvcrush::less_mix (cpp/src/less.cpp).
//
// Inputs: 0 q f32 [T, Hq*D] (every token of the step), 1 the kept output f32 [T, Hq*Dv]
// (PagedAttention's, merged over heads), 2 less_token_index i32 [M] (the rows to mix),
// 3 key_cache.L, 4 head_past_lens.L, 5 block_indices.L, 6 block_indices_begins.L,
// 7 less_token_seq, 8 less_token_offset, 9 scale, 10 less_state_H.L [B, Hkv, F, Dv],
// 11 less_state_z.L [B, Hkv, F], 12..15 phi's w1 [Hq, D, Y], b1 [Hq, Y], w2 [Hq, Y, F],
// b2 [Hq, F]. Output f32 [T, Hq*Dv]: input 1 with the M rows mixed. One op per layer does the
// row selection too: each op of the decode graph costs a dispatch, most of it for small ones.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/op/op.hpp>

#include <cstdint>
#include <memory>
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvcrush/less.hpp"

namespace kvcrush {

class LESSMixOp : public ov::op::Op {
 public:
  OPENVINO_OP("LESSMix", "kvcrush");

  LESSMixOp() = default;

  void validate_and_infer_types() override {
    set_output_type(0, ov::element::f32, get_input_partial_shape(1));
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
    auto op = std::make_shared<LESSMixOp>(*this);
    op->set_arguments(args);
    op->constructor_validate_and_infer_types();
    return op;
  }

  bool visit_attributes(ov::AttributeVisitor& v) override {
    v.on_attribute("num_kv_heads", num_kv_heads_);
    v.on_attribute("group", group_);
    v.on_attribute("sequence_major", sequence_major_);
    v.on_attribute("format", format_);
    v.on_attribute("by_channel", layout_.by_channel);
    v.on_attribute("levels", levels_);
    v.on_attribute("block_size", layout_.block_size);
    v.on_attribute("head_dim", layout_.head_dim);
    v.on_attribute("head_block_bytes", layout_.head_block_bytes);
    v.on_attribute("header_bytes", layout_.header_bytes);
    v.on_attribute("row_bytes", layout_.row_bytes);
    layout_.levels = static_cast<int>(levels_);
    return true;
  }

  bool has_evaluate() const override { return true; }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    const auto& q = inputs[0];
    const auto& o = inputs[1];
    const auto& idx = inputs[2];
    outputs[0].set_shape(o.get_shape());
    const auto t = static_cast<int64_t>(o.get_shape()[0]);
    const auto width = static_cast<int64_t>(o.get_shape()[1]);
    float* dst = outputs[0].data<float>();
    if (t * width > 0 && dst != o.data<const float>())
      std::copy(o.data<const float>(), o.data<const float>() + t * width, dst);
    const auto m = static_cast<int64_t>(idx.get_size());
    if (m == 0) return true;
    const int64_t hq = num_kv_heads_ * group_;
    const auto& w1 = inputs[12];
    const auto& w2 = inputs[14];
    const int64_t v_dim = width / hq;
    const auto b = static_cast<int64_t>(inputs[10].get_shape()[0]);
    if (static_cast<int64_t>(inputs[4].get_size()) != b * num_kv_heads_ ||
        static_cast<int64_t>(inputs[10].get_size()) !=
            b * num_kv_heads_ * static_cast<int64_t>(w2.get_shape()[2]) * v_dim)
      throw std::invalid_argument("LESSMix: less_state_H.L must be [B, Hkv, F, Dv] for the "
                                  "step's B sequences");
    // i32 as declared; i64 (a model built by hand) is narrowed after a range check
    std::vector<int32_t> narrowed;
    const int32_t* rows = nullptr;
    if (idx.get_element_type() == ov::element::i64) {
      const int64_t* wide = idx.data<const int64_t>();
      narrowed.resize(static_cast<size_t>(m));
      for (int64_t i = 0; i < m; ++i) {
        if (wide[i] < 0 || wide[i] >= t)
          throw std::out_of_range("LESSMix: less_token_index " + std::to_string(wide[i]) +
                                  " outside 0.." + std::to_string(t - 1));
        narrowed[static_cast<size_t>(i)] = static_cast<int32_t>(wide[i]);
      }
      rows = narrowed.data();
    } else {
      rows = idx.data<const int32_t>();
    }
    if (q.get_shape().size() != 2 || static_cast<int64_t>(q.get_shape()[0]) != t ||
        static_cast<int64_t>(q.get_shape()[1]) != hq * layout_.head_dim)
      throw std::invalid_argument("LESSMix: q must be [T, Hq * D] for the kept output's T rows");
    const auto& cache = inputs[3];
    HeadTables tables{inputs[4].data<const int32_t>(), inputs[5].data<const int32_t>(),
                      inputs[6].data<const int32_t>(), static_cast<int64_t>(inputs[4].get_size()),
                      static_cast<int64_t>(inputs[5].get_size())};
    QueryFeatureMap phi{w1.data<const float>(), inputs[13].data<const float>(),
                        w2.data<const float>(), inputs[15].data<const float>(),
                        static_cast<int64_t>(w1.get_shape()[2]),
                        static_cast<int64_t>(w2.get_shape()[2])};
    less_mix(static_cast<const uint8_t*>(cache.data()),
             static_cast<int64_t>(cache.get_byte_size()) / layout_.head_block_bytes, layout_,
             static_cast<KeyFormat>(format_), tables, q.data<const float>(), dst,
             RowSelection{rows, t}, m, num_kv_heads_, group_, v_dim, *inputs[9].data<const float>(), inputs[7].data<const int32_t>(),
             inputs[8].data<const int32_t>(), sequence_major_, phi,
             inputs[10].data<const float>(), inputs[11].data<const float>(), dst);
    return true;
  }

 private:
  int64_t num_kv_heads_ = 1;
  int64_t group_ = 1;
  bool sequence_major_ = false;
  int64_t format_ = 0;
  int64_t levels_ = 255;
  BlockLayout layout_{};
};

}  // namespace kvcrush

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<kvcrush::LESSMixOp>>()}));
