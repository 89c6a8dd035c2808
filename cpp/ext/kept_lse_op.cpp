// kvcrush's OpenVINO extension library (libkvcrush_ov_ext.so): the ``KeptLogSumExp`` op of
// kvcrush_ov/engine/less_op.py as a native op, so the CPU plugin runs it without a call into
// Python per layer and step. Same inputs, attributes and output as the Python op; the work is
// kvcrush::kept_lse (cpp/src/less.cpp), shared with the Python module.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/op/op.hpp>

#include <cstdint>
#include <memory>
#include <vector>

#include "kvcrush/less.hpp"

namespace kvcrush {

class KeptLogSumExpOp : public ov::op::Op {
 public:
  OPENVINO_OP("KeptLogSumExp", "kvcrush");

  KeptLogSumExpOp() = default;

  explicit KeptLogSumExpOp(const ov::OutputVector& args) : Op(args) {
    constructor_validate_and_infer_types();
  }

  void validate_and_infer_types() override {
    set_output_type(0, ov::element::f32,
                    ov::PartialShape{ov::Dimension::dynamic(), num_kv_heads_ * group_});
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
    auto op = std::make_shared<KeptLogSumExpOp>();
    op->set_arguments(args);
    op->num_kv_heads_ = num_kv_heads_;
    op->group_ = group_;
    op->sequence_major_ = sequence_major_;
    op->format_ = format_;
    op->layout_ = layout_;
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
    const auto m = static_cast<int64_t>(q.get_shape()[0]);
    const int64_t hq = num_kv_heads_ * group_;
    outputs[0].set_shape({static_cast<size_t>(m), static_cast<size_t>(hq)});
    if (m == 0) return true;
    const auto& cache = inputs[1];
    const auto num_blocks = static_cast<int64_t>(cache.get_byte_size()) / layout_.head_block_bytes;
    HeadTables t{inputs[2].data<const int32_t>(), inputs[3].data<const int32_t>(),
                 inputs[4].data<const int32_t>(), static_cast<int64_t>(inputs[2].get_size()),
                 static_cast<int64_t>(inputs[3].get_size())};
    kept_lse(static_cast<const uint8_t*>(cache.data()), num_blocks, layout_,
             static_cast<KeyFormat>(format_), t, q.data<const float>(), m, num_kv_heads_, group_,
             *inputs[7].data<const float>(), inputs[5].data<const int32_t>(),
             inputs[6].data<const int32_t>(), sequence_major_, outputs[0].data<float>());
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
    {std::make_shared<ov::OpExtension<kvcrush::KeptLogSumExpOp>>()}));
