// FastKVCut, residual_stream and split_at_layer (passes.hpp; layout: transformations/fastkv.py's
// module docstring).
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include <openvino/core/model.hpp>
#include <openvino/op/parameter.hpp>
#include <openvino/op/result.hpp>
#include <openvino/pass/manager.hpp>

#include "common.hpp"
#include "kvcrush/passes.hpp"

namespace kvcrush {
namespace {

using Output = ov::Output<ov::Node>;

[[noreturn]] void fail(const std::string& message) {
  throw FastKVPatternError("split_at_layer: " + message);
}

/// The token-embedding output: the first rank-3 float output reached (breadth first, through
/// output 0 of each node) from the Parameter whose friendly name is input_ids.
Output embedding(const ov::Model& model) {
  std::shared_ptr<ov::Node> start;
  for (const auto& p : model.get_parameters())
    if (p->get_friendly_name() == "input_ids") {
      start = p;
      break;
    }
  if (!start) fail("the model has no input_ids parameter");
  std::deque<ov::Node*> frontier{start.get()};
  std::unordered_set<const ov::Node*> seen;
  while (!frontier.empty()) {
    ov::Node* node = frontier.front();
    frontier.pop_front();
    if (node->get_output_size() == 0) continue;
    for (const auto& target : node->output(0).get_target_inputs()) {
      ov::Node* next = target.get_node();
      if (!seen.insert(next).second) continue;
      if (next->get_output_size() == 0) continue;
      const Output out = next->output(0);
      const auto& rank = out.get_partial_shape().rank();
      if (rank.is_static() && rank.get_length() == 3 && out.get_element_type().is_real())
        return out;
      frontier.push_back(next);
    }
  }
  fail("no embedding output found after input_ids");
}

/// All tensor names of a Result: its own output's and its input's.
std::unordered_set<std::string> result_names(const ov::Node& result) {
  auto names = result.output(0).get_names();
  for (const auto& n : result.input_value(0).get_names()) names.insert(n);
  return names;
}

/// L of a ``scores.L`` Result, nothing for other Results.
std::optional<int64_t> layer_of_result(const ov::Node& result) {
  const std::string prefix = "scores.";
  for (const auto& name : result_names(result)) {
    if (!detail::starts_with(name, prefix)) continue;
    if (const auto layer = detail::index_after(name, prefix)) return *layer;
    fail("output '" + name + "' of " + result.get_friendly_name() +
         ": no layer index after 'scores.'");
  }
  return std::nullopt;
}

bool is_logits(const ov::Node& result) { return result_names(result).count(kLogitsName) > 0; }

/// ``model``'s Parameters that ``results`` depend on, in the model's order.
ov::ParameterVector reachable_parameters(const ov::Model& model, const ov::ResultVector& results) {
  std::vector<const ov::Node*> stack;
  for (const auto& r : results) stack.push_back(r.get());
  std::unordered_set<const ov::Node*> seen;
  while (!stack.empty()) {
    const ov::Node* node = stack.back();
    stack.pop_back();
    if (!seen.insert(node).second) continue;
    for (const auto& in : node->input_values()) stack.push_back(in.get_node());
  }
  ov::ParameterVector out;
  for (const auto& p : model.get_parameters())
    if (seen.count(p.get())) out.push_back(p);
  return out;
}

/// Replaces the model's Results and Parameters by these (in this order).
void reset_io(ov::Model& model, const ov::ResultVector& results,
              const ov::ParameterVector& params) {
  for (const auto& r : ov::ResultVector(model.get_results())) model.remove_result(r);
  for (const auto& p : ov::ParameterVector(model.get_parameters())) model.remove_parameter(p);
  model.add_results(results);
  model.add_parameters(params);
}

}  // namespace

int64_t count_layers(const ov::Model& model) {
  int64_t n = 0;
  for (const auto& p : model.get_parameters())
    if (detail::starts_with(p->get_friendly_name(), "key_cache.")) ++n;
  return n;
}

std::vector<Output> residual_stream(const ov::Model& model) {
  Output h = embedding(model);
  std::vector<Output> stream{h};
  while (true) {
    std::vector<ov::Node*> adds;
    for (const auto& target : h.get_target_inputs()) {
      ov::Node* node = target.get_node();
      if (detail::is_type(*node, "Add") &&
          node->output(0).get_partial_shape() == h.get_partial_shape())
        adds.push_back(node);
    }
    if (adds.empty()) return stream;
    if (adds.size() > 1)
      fail(std::to_string(adds.size()) + " residual Adds read " +
           h.get_node()->get_friendly_name());
    h = adds.front()->output(0);
    stream.push_back(h);
  }
}

bool FastKVCut::run_on_model(const std::shared_ptr<ov::Model>& model) {
  const int64_t n = count_layers(*model);
  if (split_layer_ < 0 || split_layer_ > n - 2)
    throw std::invalid_argument("split_layer=" + std::to_string(split_layer_) +
                                ": must be in [0, " + std::to_string(n - 2) +
                                "] for a model of " + std::to_string(n) + " layers");
  const std::vector<Output> stream = residual_stream(*model);
  if (static_cast<int64_t>(stream.size()) != 2 * n + 1)
    fail(std::to_string(stream.size() - 1) + " residual Adds for " + std::to_string(n) +
         " layers (expected " + std::to_string(2 * n) + ")");
  const Output h = stream[static_cast<size_t>(2 * split_layer_ + 2)];
  // every check is done (a scores.L name without a layer fails here): rewrite from now on
  std::vector<std::optional<int64_t>> layers;
  for (const auto& r : model->get_results()) layers.push_back(layer_of_result(*r));

  ov::ResultVector kept;
  if (part_ == FastKVPart::front) {
    auto hidden = std::make_shared<ov::op::v0::Result>(h);
    hidden->output(0).set_names({kHiddenStatesName});
    kept.push_back(hidden);
    for (size_t i = 0; i < layers.size(); ++i)
      if (layers[i] && *layers[i] <= split_layer_) kept.push_back(model->get_results()[i]);
    const auto params = reachable_parameters(*model, kept);
    reset_io(*model, kept, params);
    model->set_friendly_name("fastkv_front");
  } else {
    auto param = std::make_shared<ov::op::v0::Parameter>(h.get_element_type(),
                                                         h.get_partial_shape());
    param->set_friendly_name(kHiddenStatesName);
    param->output(0).set_names({kHiddenStatesName});
    for (auto target : h.get_target_inputs()) target.replace_source_output(param->output(0));
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& r = model->get_results()[i];
      if (is_logits(*r) || (layers[i] && *layers[i] > split_layer_)) kept.push_back(r);
    }
    ov::ParameterVector params{param};
    for (const auto& p : reachable_parameters(*model, kept)) params.push_back(p);
    reset_io(*model, kept, params);
    model->set_friendly_name("fastkv_back");
  }
  model->get_rt_info().clear();
  model->validate_nodes_and_infer_types();
  return true;
}

void fastkv_cut(const std::shared_ptr<ov::Model>& model, int64_t split_layer, FastKVPart part) {
  ov::pass::Manager manager;
  manager.register_pass<FastKVCut>(split_layer, part);
  manager.run_passes(model);
}

std::pair<std::shared_ptr<ov::Model>, std::shared_ptr<ov::Model>> split_at_layer(
    const ov::Model& model, int64_t split_layer) {
  auto front = model.clone();
  auto back = model.clone();
  fastkv_cut(front, split_layer, FastKVPart::front);
  fastkv_cut(back, split_layer, FastKVPart::back);
  return {front, back};
}

}  // namespace kvcrush
