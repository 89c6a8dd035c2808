// AddLESS and SetCacheTypes (passes.hpp; layout: transformations/less.py's module docstring).
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include <openvino/core/model.hpp>
#include <openvino/op/constant.hpp>
#include <openvino/op/convert.hpp>
#include <openvino/op/parameter.hpp>
#include <openvino/pass/manager.hpp>

#include "common.hpp"
#include "kvcrush/less_mix_op.hpp"
#include "kvcrush/passes.hpp"

namespace kvcrush {

std::string less_state_h_name(int64_t layer) { return "less_state_H." + std::to_string(layer); }
std::string less_state_z_name(int64_t layer) { return "less_state_z." + std::to_string(layer); }

namespace {

using Output = ov::Output<ov::Node>;
using NodePtr = std::shared_ptr<ov::Node>;
using ParamPtr = std::shared_ptr<ov::op::v0::Parameter>;

// PagedAttentionExtension inputs read here.
enum PaInput : size_t { kQuery = 0, kKeyCache = 3, kScale = 9 };

[[noreturn]] void fail(const std::string& message) {
  throw LESSPatternError("add_less: " + message);
}

/// L of the key_cache.L Parameter feeding input 3.
int64_t layer_of(const ov::Node& pa) {
  const std::string prefix = "key_cache.";
  for (const auto& name : pa.input_value(kKeyCache).get_names()) {
    if (!detail::starts_with(name, prefix)) continue;
    if (const auto layer = detail::index_after(name, prefix)) return *layer;
    break;
  }
  fail("input 3 of " + pa.get_friendly_name() + " is not key_cache.L");
}

/// Through the per-head rewrite's reshapes / transposes named ``prefix...`` to their source.
Output walk_back(Output value, const std::string& prefix) {
  while (detail::starts_with(value.get_node()->get_friendly_name(), prefix))
    value = value.get_node()->input_value(0);
  return value;
}

/// The per-head rewrite's [T, Hq*Dv] output of ``pa`` (its "/per_head_out/merge").
Output merged_output(const NodePtr& pa) {
  const std::string& tag = pa->get_friendly_name();
  Output value = pa->output(0);
  for (int i = 0; i < 4; ++i) {
    const auto targets = value.get_target_inputs();
    if (targets.size() != 1) break;
    ov::Node* node = targets.begin()->get_node();
    if (!detail::starts_with(node->get_friendly_name(), tag + "/per_head_out")) break;
    value = node->output(0);
    if (node->get_friendly_name() == tag + "/per_head_out/merge") return value;
  }
  fail(tag + " has no per-head output merge (run to_per_head first)");
}

Output to_f32(const Output& x) {
  if (x.get_element_type() == ov::element::f32) return x;
  return std::make_shared<ov::op::v0::Convert>(x, ov::element::f32)->output(0);
}

ParamPtr parameter(ov::element::Type type, const ov::PartialShape& shape,
                   const std::string& name) {
  auto p = std::make_shared<ov::op::v0::Parameter>(type, shape);
  p->set_friendly_name(name);
  return p;
}

/// Layer ``layer``'s slice [dims...] of a row-major [L, dims...] array, as a Constant.
Output layer_constant(const std::vector<float>& all, int64_t layer, const ov::Shape& dims) {
  const size_t size = ov::shape_size(dims);
  return ov::op::v0::Constant::create(
             ov::element::f32, dims,
             std::vector<float>(all.begin() + static_cast<std::ptrdiff_t>(layer * size),
                                all.begin() + static_cast<std::ptrdiff_t>((layer + 1) * size)))
      ->output(0);
}

void check_weights(const LESSWeights& w) {
  const auto l = static_cast<size_t>(w.num_layers), hq = static_cast<size_t>(w.num_heads);
  const auto d = static_cast<size_t>(w.head_dim), y = static_cast<size_t>(w.hidden),
             f = static_cast<size_t>(w.feature_dim);
  if (w.num_layers <= 0 || w.num_heads <= 0 || w.num_kv_heads <= 0 || w.head_dim <= 0 ||
      w.hidden <= 0 || w.feature_dim <= 0 || w.num_heads % w.num_kv_heads != 0)
    throw std::invalid_argument("add_less: weights: positive sizes with num_heads a multiple of "
                                "num_kv_heads");
  if (w.q_w1.size() != l * hq * d * y || w.q_b1.size() != l * hq * y ||
      w.q_w2.size() != l * hq * y * f || w.q_b2.size() != l * hq * f)
    throw std::invalid_argument("add_less: weights: q_w1 / q_b1 / q_w2 / q_b2 must be "
                                "[L, Hq, D, Y] / [L, Hq, Y] / [L, Hq, Y, F] / [L, Hq, F]");
  for (int64_t layer : w.active_layers)
    if (layer < 0 || layer >= w.num_layers)
      throw std::invalid_argument("add_less: weights: active layer " + std::to_string(layer) +
                                  " outside 0.." + std::to_string(w.num_layers - 1));
}

/// One active layer's attachment points (all checked before anything changes).
struct Site {
  NodePtr pa;
  int64_t layer;
  Output q, out;
  int64_t dv;
  std::vector<Output> tables;  // head_past_lens.L, block_indices.L, block_indices_begins.L
};

}  // namespace

bool AddLESS::run_on_model(const std::shared_ptr<ov::Model>& model) {
  const LESSWeights& w = weights_;
  check_weights(w);
  if (model->has_rt_info(std::vector<std::string>{kLESSRtKey, "feature_dim"}))
    fail("the model already has LESS");
  if (!model->has_rt_info(std::vector<std::string>{kPerHeadRtKey, "num_kv_heads"}))
    fail("run to_per_head first");
  std::vector<NodePtr> pas;
  for (const auto& node : model->get_ordered_ops())
    if (detail::is_type(*node, kPagedAttentionType)) pas.push_back(node);
  std::unordered_map<std::string, ParamPtr> params;
  for (const auto& p : model->get_parameters())
    for (const auto& n : p->output(0).get_names()) params[n] = p;
  const std::vector<std::string> major_key{kPerHeadRtKey, "sequence_major"};
  const bool sequence_major =
      model->has_rt_info(major_key) && model->get_rt_info<bool>(major_key);
  const int64_t hq = w.num_heads, d = w.head_dim;
  if (static_cast<int64_t>(pas.size()) != w.num_layers)
    fail("the model has " + std::to_string(pas.size()) + " attention layers, the weights " +
         std::to_string(w.num_layers));
  const std::set<int64_t> active(w.active_layers.begin(), w.active_layers.end());

  std::vector<Site> sites;
  for (const auto& pa : pas) {
    const int64_t layer = layer_of(*pa);
    if (!active.count(layer)) continue;  // switched off: attention there is PagedAttention's
    const std::string& tag = pa->get_friendly_name();
    const Output q = walk_back(pa->input_value(kQuery), tag + "/per_head_q");
    const Output out = merged_output(pa);
    const auto& q_shape = q.get_partial_shape();
    const ov::Dimension width = q_shape.rank().is_static() && q_shape.rank().get_length() >= 2
                                    ? q_shape[1]
                                    : ov::Dimension::dynamic();
    if (width.is_dynamic() || width.get_length() != hq * d)
      fail(tag + ": query width " + width.to_string() + ", the weights need " +
           std::to_string(hq) + "*" + std::to_string(d));
    const auto& out_shape = out.get_partial_shape();
    if (out_shape.rank().is_dynamic() || out_shape.rank().get_length() != 2 ||
        out_shape[1].is_dynamic())
      fail(tag + ": output shape " + detail::to_string(out_shape) + "; expected [T, Hq*Dv]");
    std::vector<Output> tables;
    for (const std::string& name : {head_past_lens_name(layer), block_indices_name(layer),
                                    block_indices_begins_name(layer)}) {
      const auto it = params.find(name);
      if (it == params.end()) fail(tag + ": the model has no input '" + name + "'");
      tables.push_back(it->second->output(0));
    }
    sites.push_back({pa, layer, q, out, out_shape[1].get_length() / hq, tables});
  }

  const auto idx = parameter(ov::element::i32, {-1}, kLESSTokenIndex);
  const auto seq = parameter(ov::element::i32, {-1}, kLESSTokenSeq);
  const auto off = parameter(ov::element::i32, {-1}, kLESSTokenOffset);
  ov::ParameterVector new_params{idx, seq, off};
  const LESSMixAttributes attributes{w.num_kv_heads, w.num_heads / w.num_kv_heads,
                                     sequence_major, key_format_, key_layout_};
  const auto hq_u = static_cast<size_t>(hq), d_u = static_cast<size_t>(d);
  const auto y_u = static_cast<size_t>(w.hidden), f_u = static_cast<size_t>(w.feature_dim);
  for (const auto& site : sites) {
    const auto targets = site.out.get_target_inputs();
    auto scale = std::make_shared<ov::op::v0::Convert>(site.pa->input_value(kScale),
                                                       ov::element::f32);
    auto h_state = parameter(ov::element::f32, {-1, w.num_kv_heads, w.feature_dim, site.dv},
                             less_state_h_name(site.layer));
    auto z_state = parameter(ov::element::f32, {-1, w.num_kv_heads, w.feature_dim},
                             less_state_z_name(site.layer));
    new_params.insert(new_params.end(), {h_state, z_state});
    const ov::OutputVector args{
        to_f32(site.q), to_f32(site.out), idx->output(0),
        site.pa->input_value(kKeyCache), site.tables[0], site.tables[1], site.tables[2],
        seq->output(0), off->output(0), scale->output(0), h_state->output(0),
        z_state->output(0), layer_constant(w.q_w1, site.layer, {hq_u, d_u, y_u}),
        layer_constant(w.q_b1, site.layer, {hq_u, y_u}),
        layer_constant(w.q_w2, site.layer, {hq_u, y_u, f_u}),
        layer_constant(w.q_b2, site.layer, {hq_u, f_u})};
    NodePtr new_out = std::make_shared<LESSMixOp>(args, attributes);
    if (site.out.get_element_type() != ov::element::f32)
      new_out = std::make_shared<ov::op::v0::Convert>(new_out, site.out.get_element_type());
    new_out->set_friendly_name(site.pa->get_friendly_name() + "/less_out");
    for (auto target : targets) target.replace_source_output(new_out->output(0));
  }
  for (const auto& p : new_params) p->output(0).set_names({p->get_friendly_name()});
  model->add_parameters(new_params);
  model->set_rt_info(w.feature_dim, std::vector<std::string>{kLESSRtKey, "feature_dim"});
  model->validate_nodes_and_infer_types();
  return true;
}

bool SetCacheTypes::run_on_model(const std::shared_ptr<ov::Model>& model) {
  auto shape = [](const std::vector<int64_t>& dims) {
    std::vector<ov::Dimension> all{ov::Dimension::dynamic()};
    for (int64_t dim : dims) all.emplace_back(dim);
    return ov::PartialShape(all);
  };
  for (const auto& p : model->get_parameters()) {
    for (const auto& name : p->output(0).get_names()) {
      if (detail::starts_with(name, "key_cache.")) {
        p->set_element_type(types_.key_type);
        p->set_partial_shape(shape(types_.key_dims));
      } else if (detail::starts_with(name, "value_cache.")) {
        p->set_element_type(types_.value_type);
        p->set_partial_shape(shape(types_.value_dims));
      }
    }
  }
  model->validate_nodes_and_infer_types();
  return true;
}

void add_less(const std::shared_ptr<ov::Model>& model, const LESSWeights& weights,
              KeyFormat key_format, const BlockLayout& key_layout) {
  ov::pass::Manager manager;
  manager.register_pass<AddLESS>(weights, key_format, key_layout);
  manager.run_passes(model);
}

void set_cache_types(const std::shared_ptr<ov::Model>& model, const CacheTypes& types) {
  ov::pass::Manager manager;
  manager.register_pass<SetCacheTypes>(types);
  manager.run_passes(model);
}

}  // namespace kvcrush
