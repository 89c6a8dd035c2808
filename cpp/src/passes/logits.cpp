// LogitsIndices and find_lm_head (passes.hpp).
#include <algorithm>
#include <array>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include <openvino/core/model.hpp>
#include <openvino/op/constant.hpp>
#include <openvino/op/gather.hpp>
#include <openvino/op/parameter.hpp>
#include <openvino/pass/manager.hpp>

#include "common.hpp"
#include "kvcrush/passes.hpp"

namespace kvcrush {
namespace {

// Ops that may sit between the lm_head MatMul and the logits Result (output casts, scaling,
// soft-capping). Each must have exactly one input that depends on a model Parameter.
constexpr std::array<std::string_view, 8> kPassThrough{"Convert", "Multiply", "Divide", "Add",
                                                       "Subtract", "Tanh", "Clamp", "Result"};

bool passes_through(std::string_view kind) {
  return std::find(kPassThrough.begin(), kPassThrough.end(), kind) != kPassThrough.end();
}
constexpr int kMaxWalk = 16;

/// Whether ``value`` is computed (transitively) from a Parameter or ReadValue, i.e. no weight.
bool depends_on_parameter(const ov::Output<ov::Node>& value) {
  std::vector<ov::Node*> stack{value.get_node()};
  std::unordered_set<const ov::Node*> seen;
  while (!stack.empty()) {
    ov::Node* node = stack.back();
    stack.pop_back();
    if (!seen.insert(node).second) continue;
    if (detail::is_type(*node, "Parameter") || detail::is_type(*node, "ReadValue")) return true;
    for (const auto& in : node->input_values()) stack.push_back(in.get_node());
  }
  return false;
}

std::shared_ptr<ov::Node> find_logits_result(const ov::Model& model) {
  for (const auto& result : model.get_results()) {
    if (result->output(0).get_names().count(kLogitsName) ||
        result->input_value(0).get_names().count(kLogitsName))
      return result;
  }
  std::vector<std::string> names;
  for (const auto& out : model.outputs())
    for (const auto& n : out.get_names()) names.push_back(n);
  throw LogitsPatternError(std::string("add_logits_indices: the model has no output named '") +
                           kLogitsName + "' (outputs: " + detail::py_list(names, true) + ")");
}

/// The token axis of the hidden states entering lm_head: 0 for the paged layout [T, 1, H].
int64_t token_axis(const ov::Output<ov::Node>& hidden) {
  const auto& shape = hidden.get_partial_shape();
  bool paged = false;
  if (shape.rank().is_static()) {
    const auto rank = shape.rank().get_length();
    paged = (rank == 2 || rank == 3) && shape[0].is_dynamic() && shape[rank - 1].is_static() &&
            (rank == 2 || (shape[1].is_static() && shape[1].get_length() == 1));
  }
  if (!paged)
    throw LogitsPatternError("add_logits_indices: hidden states entering lm_head have shape " +
                             detail::to_string(shape) +
                             "; expected the paged-attention layout [T, 1, H] (run to_paged "
                             "first)");
  return 0;
}

}  // namespace

std::shared_ptr<ov::Node> find_lm_head(const ov::Model& model) {
  std::shared_ptr<ov::Node> node = find_logits_result(model);
  std::string path;
  for (int i = 0; i < kMaxWalk; ++i) {
    const std::string kind = node->get_type_name();
    if (!path.empty()) path += " <- ";
    path += kind + "(" + node->get_friendly_name() + ")";
    if (kind == "MatMul") return node;
    if (!passes_through(kind)) break;
    std::vector<ov::Output<ov::Node>> activations;
    for (const auto& in : node->input_values())
      if (depends_on_parameter(in)) activations.push_back(in);
    if (activations.size() != 1) break;
    node = activations[0].get_node_shared_ptr();
  }
  throw LogitsPatternError(
      "add_logits_indices: could not find the lm_head MatMul above the 'logits' Result; walked " +
      path);
}

bool LogitsIndices::run_on_model(const std::shared_ptr<ov::Model>& model) {
  for (const auto& param : model->get_parameters())
    if (param->output(0).get_names().count(kLogitsIndicesName))
      throw LogitsPatternError(
          std::string("add_logits_indices: the model already has an input '") +
          kLogitsIndicesName + "'");
  const auto lm_head = find_lm_head(*model);
  // The hidden-state operand is the one computed from the inputs; the other is the weight.
  std::vector<size_t> operands;
  for (size_t i = 0; i < 2; ++i)
    if (depends_on_parameter(lm_head->input_value(i))) operands.push_back(i);
  if (operands.size() != 1)
    throw LogitsPatternError("add_logits_indices: lm_head '" + lm_head->get_friendly_name() +
                             "' has " + std::to_string(operands.size()) +
                             " activation operands, expected 1");
  auto port = lm_head->input(operands[0]);
  const auto hidden = port.get_source_output();
  const int64_t axis = token_axis(hidden);

  auto indices = std::make_shared<ov::op::v0::Parameter>(
      ov::element::i64, ov::PartialShape{ov::Dimension::dynamic()});
  indices->set_friendly_name(kLogitsIndicesName);
  indices->output(0).set_names({kLogitsIndicesName});
  auto gathered = std::make_shared<ov::op::v8::Gather>(
      hidden, indices, ov::op::v0::Constant::create(ov::element::i64, ov::Shape{}, {axis}));
  gathered->set_friendly_name(lm_head->get_friendly_name() + "/logits_indices_gather");
  port.replace_source_output(gathered->output(0));
  model->add_parameters({indices});
  model->validate_nodes_and_infer_types();
  return true;
}

void add_logits_indices(const std::shared_ptr<ov::Model>& model) {
  ov::pass::Manager manager;
  manager.register_pass<LogitsIndices>();
  manager.run_passes(model);
}

}  // namespace kvcrush
