// LESSMixOp (less_mix_op.hpp).
#include "kvcrush/less_mix_op.hpp"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <openvino/core/attribute_visitor.hpp>

namespace kvcrush {

LESSMixOp::LESSMixOp(const ov::OutputVector& args, const LESSMixAttributes& attributes)
    : ov::op::Op(args),
      num_kv_heads_(attributes.num_kv_heads),
      group_(attributes.group),
      sequence_major_(attributes.sequence_major),
      format_(static_cast<int64_t>(attributes.format)),
      levels_(attributes.layout.levels),
      layout_(attributes.layout) {
  constructor_validate_and_infer_types();
}

LESSMixAttributes LESSMixOp::attributes() const {
  return {num_kv_heads_, group_, sequence_major_, static_cast<KeyFormat>(format_), layout_};
}

void LESSMixOp::validate_and_infer_types() {
  NODE_VALIDATION_CHECK(this, get_input_size() == kNumInputs, "LESSMix takes ", kNumInputs,
                        " inputs, got ", get_input_size());
  set_output_type(0, ov::element::f32, get_input_partial_shape(1));
}

std::shared_ptr<ov::Node> LESSMixOp::clone_with_new_inputs(const ov::OutputVector& args) const {
  auto op = std::make_shared<LESSMixOp>(*this);
  op->set_arguments(args);
  op->constructor_validate_and_infer_types();
  return op;
}

bool LESSMixOp::visit_attributes(ov::AttributeVisitor& v) {
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

bool LESSMixOp::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
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
           RowSelection{rows, t}, m, num_kv_heads_, group_, v_dim, *inputs[9].data<const float>(),
           inputs[7].data<const int32_t>(), inputs[8].data<const int32_t>(), sequence_major_, phi,
           inputs[10].data<const float>(), inputs[11].data<const float>(), dst);
  return true;
}

}  // namespace kvcrush
