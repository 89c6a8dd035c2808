// kvcrush's OpenVINO extension library (libkvcrush_ov_ext.so): ``LESSMix``, the whole LESS
// mixing of one layer (transformations/less.py), as an op the CPU plugin runs natively (no call
// into Python per layer and step). Its Python twin, kvcrush_ov/engine/less_op.py's LESSMix, has
// the same inputs, attributes and output; both run kvcrush::less_mix (cpp/src/less.cpp).
//
// Inputs: 0 q f32 [M, Hq*D], 1 the kept output f32 [M, Hq*Dv], 2 key_cache.L,
// 3 head_past_lens.L, 4 block_indices.L, 5 block_indices_begins.L, 6 less_token_seq,
// 7 less_token_offset, 8 scale, 9 less_state_H.L [B, Hkv, F, Dv], 10 less_state_z.L
// [B, Hkv, F], 11..14 phi's w1 [Hq, D, Y], b1 [Hq, Y], w2 [Hq, Y, F], b2 [Hq, F].
// Output f32 [M, Hq*Dv].
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/op/op.hpp>

#include <cstdint>
#include <memory>
#include <stdexcept>
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
    const auto m = static_cast<int64_t>(q.get_shape()[0]);
    const int64_t hq = num_kv_heads_ * group_;
    outputs[0].set_shape(o.get_shape());
    if (m == 0) return true;
    const auto& w1 = inputs[11];
    const auto& w2 = inputs[13];
    const auto v_dim = static_cast<int64_t>(o.get_shape()[1]) / hq;
    const auto b = static_cast<int64_t>(inputs[9].get_shape()[0]);
    if (static_cast<int64_t>(inputs[3].get_size()) != b * num_kv_heads_ ||
        static_cast<int64_t>(inputs[9].get_size()) !=
            b * num_kv_heads_ * static_cast<int64_t>(w2.get_shape()[2]) * v_dim)
      throw std::invalid_argument("LESSMix: less_state_H.L must be [B, Hkv, F, Dv] for the "
                                  "step's B sequences");
    const auto& cache = inputs[2];
    HeadTables t{inputs[3].data<const int32_t>(), inputs[4].data<const int32_t>(),
                 inputs[5].data<const int32_t>(), static_cast<int64_t>(inputs[3].get_size()),
                 static_cast<int64_t>(inputs[4].get_size())};
    QueryFeatureMap phi{w1.data<const float>(), inputs[12].data<const float>(),
                        w2.data<const float>(), inputs[14].data<const float>(),
                        static_cast<int64_t>(w1.get_shape()[2]),
                        static_cast<int64_t>(w2.get_shape()[2])};
    less_mix(static_cast<const uint8_t*>(cache.data()),
             static_cast<int64_t>(cache.get_byte_size()) / layout_.head_block_bytes, layout_,
             static_cast<KeyFormat>(format_), t, q.data<const float>(), o.data<const float>(), m,
             num_kv_heads_, group_, v_dim, *inputs[8].data<const float>(),
             inputs[6].data<const int32_t>(), inputs[7].data<const int32_t>(), sequence_major_,
             phi, inputs[9].data<const float>(), inputs[10].data<const float>(),
             outputs[0].data<float>());
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
