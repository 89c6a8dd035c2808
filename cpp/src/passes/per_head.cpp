// ToPerHead (passes.hpp; layout: transformations/per_head.py's module docstring).
#include <algorithm>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <unordered_set>
#include <vector>

#include <openvino/core/model.hpp>
#include <openvino/op/constant.hpp>
#include <openvino/op/parameter.hpp>
#include <openvino/op/reshape.hpp>
#include <openvino/op/tile.hpp>
#include <openvino/op/transpose.hpp>
#include <openvino/pass/manager.hpp>

#include "common.hpp"
#include "kvcrush/passes.hpp"

namespace kvcrush {

std::string head_past_lens_name(int64_t layer) { return "head_past_lens." + std::to_string(layer); }
std::string block_indices_name(int64_t layer) { return "block_indices." + std::to_string(layer); }
std::string block_indices_begins_name(int64_t layer) {
  return "block_indices_begins." + std::to_string(layer);
}

namespace {

using Output = ov::Output<ov::Node>;
using NodePtr = std::shared_ptr<ov::Node>;

// Inputs 0..13 of PagedAttentionExtension used here; 14.. are rotation / xattention / sinks /
// adaptive-RKV / qq-bias extensions that this pass does not support (they must be empty).
enum PaInput : size_t {
  kQuery = 0, kKey = 1, kValue = 2, kKeyCache = 3, kPast = 5, kBegins = 6, kBlocks = 7,
  kBlockBegins = 8, kAlibi = 11, kMaxContext = 12, kScoreWindow = 13, kFirstExtension = 14,
};

[[noreturn]] void fail(const std::string& message) {
  throw PerHeadPatternError("to_per_head: " + message);
}

/// An integer rt_info value, whatever integer type (or decimal string) holds it.
bool any_to_int(const ov::Any& any, int64_t& out) {
  if (any.is<int64_t>()) out = any.as<int64_t>();
  else if (any.is<int32_t>()) out = any.as<int32_t>();
  else if (any.is<uint64_t>()) out = static_cast<int64_t>(any.as<uint64_t>());
  else if (any.is<uint32_t>()) out = any.as<uint32_t>();
  else if (any.is<std::string>()) {
    const auto& s = any.as<std::string>();
    size_t used = 0;
    try {
      out = std::stoll(s, &used);
    } catch (const std::exception&) {
      return false;
    }
    return used == s.size();
  } else {
    return false;
  }
  return true;
}

int64_t rt_int(const ov::Node& node, const std::string& key) {
  const auto& rt = node.get_rt_info();
  const auto it = rt.find(key);
  if (it == rt.end()) {
    std::vector<std::string> keys;
    for (const auto& kv : rt) keys.push_back(kv.first);
    fail(node.get_friendly_name() + " has no rt_info '" + key + "' (keys: " +
         detail::py_list(keys, false) + ")");
  }
  int64_t value = 0;
  if (!any_to_int(it->second, value))
    fail(node.get_friendly_name() + ": rt_info '" + key + "' is not an integer");
  return value;
}

int64_t static_width(const Output& value, const char* what, const ov::Node& node) {
  const auto& shape = value.get_partial_shape();
  if (shape.rank().is_dynamic() || shape.rank().get_length() != 2 || shape[1].is_dynamic())
    fail(std::string(what) + " of " + node.get_friendly_name() + " has shape " +
         detail::to_string(shape) + "; expected [T, heads*head_size] with a static width");
  return shape[1].get_length();
}

bool is_empty_or_scalar_constant(const Output& value) {
  if (!detail::is_type(*value.get_node(), "Constant")) return false;
  const auto shape = value.get_shape();
  return shape.empty() || ov::shape_size(shape) == 0;
}

/// Layer index from the ``key_cache.L`` Parameter feeding input 3.
int64_t layer_of(const ov::Node& pa) {
  const auto cache = pa.input_value(kKeyCache);
  const std::string prefix = "key_cache.";
  for (const auto& name : cache.get_names()) {
    if (!detail::starts_with(name, prefix)) continue;
    if (const auto layer = detail::index_after(name, prefix)) return *layer;
    fail("input 3 of " + pa.get_friendly_name() + " is named '" + name +
         "': no layer index after 'key_cache.'");
  }
  fail("input 3 of " + pa.get_friendly_name() + " is not a 'key_cache.L' Parameter (names " +
       detail::py_list(detail::names_of(cache.get_names()), true) + ")");
}

void check_pa(const ov::Node& pa) {
  const std::string& name = pa.get_friendly_name();
  if (pa.get_input_size() <= kScoreWindow)
    fail(name + " has only " + std::to_string(pa.get_input_size()) + " inputs");
  for (size_t i : {kPast, kBegins, kBlocks, kBlockBegins, kMaxContext})
    if (!detail::is_type(*pa.get_input_node_ptr(i), "Parameter"))
      fail("input " + std::to_string(i) + " of " + name + " is not a Parameter");
  if (!is_empty_or_scalar_constant(pa.input_value(kAlibi)))
    fail(name + " uses ALiBi slopes (not supported)");
  for (size_t i = kFirstExtension; i < pa.get_input_size(); ++i)
    if (!is_empty_or_scalar_constant(pa.input_value(i)))
      fail("input " + std::to_string(i) + " of " + name +
           " is not an empty constant: cache rotation, xattention, sinks, adaptive RKV and "
           "qq-bias are not supported");
  if (pa.get_output_size() < 2 || pa.output(1).get_target_inputs().empty())
    fail("scores output of " + name + " is unused; convert with score_outputs=True");
}

NodePtr i64_constant(std::vector<int64_t> values) {
  return ov::op::v0::Constant::create(ov::element::i64, ov::Shape{values.size()}, values);
}

NodePtr named(NodePtr node, const std::string& name) {
  node->set_friendly_name(name);
  return node;
}

/// [T, Hkv*width] -> [Hkv*T, width]: head-major rows, or token-major (a plain reshape).
Output heads_to_rows(const Output& x, int64_t hkv, int64_t width, const std::string& name,
                     bool sequence_major) {
  using ov::op::v1::Reshape;
  if (sequence_major)
    return named(std::make_shared<Reshape>(x, i64_constant({-1, width}), false), name + "/rows");
  auto split = named(std::make_shared<Reshape>(x, i64_constant({0, hkv, width}), true),
                     name + "/split");
  auto moved = named(std::make_shared<ov::op::v1::Transpose>(split, i64_constant({1, 0, 2})),
                     name + "/heads_first");
  return named(std::make_shared<Reshape>(moved, i64_constant({-1, width}), false),
               name + "/rows");
}

/// [Hkv*T, width] (head-major, or token-major) -> [T, Hkv*width].
Output rows_to_heads(const Output& x, int64_t hkv, int64_t width, const std::string& name,
                     bool sequence_major) {
  using ov::op::v1::Reshape;
  if (sequence_major)
    return named(std::make_shared<Reshape>(x, i64_constant({-1, hkv * width}), false),
                 name + "/merge");
  auto split = named(std::make_shared<Reshape>(x, i64_constant({hkv, -1, width}), false),
                     name + "/split");
  auto moved = named(std::make_shared<ov::op::v1::Transpose>(split, i64_constant({1, 0, 2})),
                     name + "/tokens_first");
  return named(std::make_shared<Reshape>(moved, i64_constant({0, hkv * width}), true),
               name + "/merge");
}

std::shared_ptr<ov::op::v0::Parameter> i32_parameter(const std::string& name) {
  auto p = std::make_shared<ov::op::v0::Parameter>(ov::element::i32,
                                                   ov::PartialShape{ov::Dimension::dynamic()});
  p->set_friendly_name(name);
  return p;
}

/// One PagedAttention op and what the rewrite needs to know of it (all checked).
struct Layer {
  NodePtr pa;
  int64_t index;  // L of key_cache.L
  int64_t hkv, d, dv, group;
};

std::string int_list(const std::set<int64_t>& values) {
  std::string out = "[";
  for (auto it = values.begin(); it != values.end(); ++it)
    out += (it == values.begin() ? "" : ", ") + std::to_string(*it);
  return out + "]";
}

/// Checks every PagedAttention op (nothing is changed before all passed).
std::vector<Layer> check_layers(const std::vector<NodePtr>& pas) {
  std::vector<Layer> layers;
  std::set<int64_t> indices, hkv_all;
  for (const auto& pa : pas) {
    check_pa(*pa);
    const int64_t index = layer_of(*pa);
    if (!indices.insert(index).second)
      fail("two PagedAttention ops use key_cache." + std::to_string(index));
    const int64_t hkv = rt_int(*pa, "num_k_heads"), d = rt_int(*pa, "k_head_size");
    const int64_t hkv_v = rt_int(*pa, "num_v_heads"), dv = rt_int(*pa, "v_head_size");
    const int64_t q_width = static_width(pa->input_value(kQuery), "query", *pa);
    const int64_t k_width = static_width(pa->input_value(kKey), "key", *pa);
    const int64_t v_width = static_width(pa->input_value(kValue), "value", *pa);
    if (hkv <= 0 || d <= 0 || dv <= 0 || hkv_v != hkv || k_width != hkv * d ||
        v_width != hkv * dv || q_width % (hkv * d) != 0)
      fail(pa->get_friendly_name() + ": inconsistent widths q=" + std::to_string(q_width) +
           " k=" + std::to_string(k_width) + " v=" + std::to_string(v_width) +
           " for num_k_heads=" + std::to_string(hkv) + " k_head_size=" + std::to_string(d) +
           " num_v_heads=" + std::to_string(hkv_v) + " v_head_size=" + std::to_string(dv));
    hkv_all.insert(hkv);
    layers.push_back({pa, index, hkv, d, dv, q_width / (hkv * d)});
  }
  if (hkv_all.size() != 1) fail("layers differ in KV heads: " + int_list(hkv_all));
  if (*indices.begin() != 0 || *indices.rbegin() != static_cast<int64_t>(pas.size()) - 1)
    fail("layer indices " + int_list(indices) + " are not 0..N-1");
  return layers;
}

}  // namespace

bool ToPerHead::run_on_model(const std::shared_ptr<ov::Model>& model) {
  if (model->has_rt_info(std::vector<std::string>{kPerHeadRtKey, "num_kv_heads"}))
    fail("the model is already per-head");
  std::vector<NodePtr> pas;
  for (const auto& node : model->get_ordered_ops())
    if (detail::is_type(*node, kPagedAttentionType)) pas.push_back(node);
  if (pas.empty()) fail("no PagedAttentionExtension op (run to_paged first)");
  std::unordered_set<std::string> names;
  for (const auto& p : model->get_parameters())
    for (const auto& n : p->output(0).get_names()) names.insert(n);
  for (const std::string& taken :
       {std::string(kHeadSubsequenceBegins), head_past_lens_name(0), block_indices_begins_name(0)})
    if (names.count(taken)) fail("the model already has an input '" + taken + "'");
  const std::vector<Layer> layers = check_layers(pas);

  auto begins = i32_parameter(kHeadSubsequenceBegins);
  ov::ParameterVector new_params{begins};
  std::vector<NodePtr> old_params;  // the shared inputs the rewrite disconnects, in order
  for (const auto& layer : layers) {
    const auto& pa = layer.pa;
    const std::string& tag = pa->get_friendly_name();
    const auto out_targets = pa->output(0).get_target_inputs();
    for (size_t i : {kPast, kBegins, kBlocks, kBlockBegins}) {
      auto node = pa->get_input_node_shared_ptr(i);
      if (std::find(old_params.begin(), old_params.end(), node) == old_params.end())
        old_params.push_back(node);
    }
    const Output q = heads_to_rows(pa->input_value(kQuery), layer.hkv, layer.group * layer.d,
                                   tag + "/per_head_q", sequence_major_);
    const Output k = heads_to_rows(pa->input_value(kKey), layer.hkv, layer.d,
                                   tag + "/per_head_k", sequence_major_);
    const Output v = heads_to_rows(pa->input_value(kValue), layer.hkv, layer.dv,
                                   tag + "/per_head_v", sequence_major_);
    auto past = i32_parameter(head_past_lens_name(layer.index));
    auto blocks = i32_parameter(block_indices_name(layer.index));
    auto block_begins = i32_parameter(block_indices_begins_name(layer.index));
    new_params.insert(new_params.end(), {past, blocks, block_begins});
    pa->input(kQuery).replace_source_output(q);
    pa->input(kKey).replace_source_output(k);
    pa->input(kValue).replace_source_output(v);
    pa->input(kPast).replace_source_output(past->output(0));
    pa->input(kBegins).replace_source_output(begins->output(0));
    pa->input(kBlocks).replace_source_output(blocks->output(0));
    pa->input(kBlockBegins).replace_source_output(block_begins->output(0));
    const Output window = pa->input_value(kScoreWindow);
    if (!detail::is_type(*window.get_node(), "Constant")) {
      // per-sequence window [B] -> per subsequence j = h*B + s
      auto tiled = named(std::make_shared<ov::op::v0::Tile>(window, i64_constant({layer.hkv})),
                         tag + "/window_tile");
      pa->input(kScoreWindow).replace_source_output(tiled->output(0));
    }
    auto& rt = pa->get_rt_info();
    rt["num_k_heads"] = int64_t{1};
    rt["num_v_heads"] = int64_t{1};
    rt["k_head_size"] = layer.d;
    rt["v_head_size"] = layer.dv;
    pa->validate_and_infer_types();
    const Output out = rows_to_heads(pa->output(0), layer.hkv, layer.group * layer.dv,
                                     tag + "/per_head_out", sequence_major_);
    for (auto target : out_targets) target.replace_source_output(out);
  }

  for (const auto& node : old_params) {
    auto param = ov::as_type_ptr<ov::op::v0::Parameter>(node);
    if (param && param->output(0).get_target_inputs().empty()) model->remove_parameter(param);
  }
  for (const auto& p : new_params) p->output(0).set_names({p->get_friendly_name()});
  model->add_parameters(new_params);
  model->set_rt_info(layers.front().hkv, std::vector<std::string>{kPerHeadRtKey, "num_kv_heads"});
  model->set_rt_info(static_cast<int64_t>(layers.size()),
                     std::vector<std::string>{kPerHeadRtKey, "num_layers"});
  model->set_rt_info(sequence_major_, std::vector<std::string>{kPerHeadRtKey, "sequence_major"});
  model->validate_nodes_and_infer_types();
  return true;
}

void to_per_head(const std::shared_ptr<ov::Model>& model, bool sequence_major) {
  ov::pass::Manager manager;
  manager.register_pass<ToPerHead>(sequence_major);
  manager.run_passes(model);
}

}  // namespace kvcrush
