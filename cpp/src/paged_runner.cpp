#include "paged_runner.hpp"

#include <chrono>
#include <cstring>
#include <stdexcept>

#include "kvcrush/passes.hpp"
#include "kvcrush/properties.hpp"

namespace kvcrush {

PagedRunner::PagedRunner(ov::Core& core, const std::filesystem::path& model_dir,
                         const std::string& device, const std::string& precision) {
  PagedOptions options;
  options.score_outputs = false;
  compiled_ = core.compile_model(read_paged_model(core, model_dir.string(), options), device,
                                 kv_cache_properties(core, device, precision));
  request_ = compiled_.create_infer_request();
  for (const auto& in : compiled_.inputs())
    if (in.get_any_name().rfind("key_cache.", 0) == 0) ++num_layers_;
  auto shape_of = [](const ov::Output<const ov::Node>& port) {
    ov::Shape s;  // one block: every dim but the first (the number of blocks)
    const auto ps = port.get_partial_shape();
    for (size_t i = 1; i < ps.size(); ++i) s.push_back(ps[i].get_length());
    return s;
  };
  const auto k = compiled_.input("key_cache.0"), v = compiled_.input("value_cache.0");
  key_shape_ = shape_of(k);
  value_shape_ = shape_of(v);
  key_type_ = k.get_element_type();
  value_type_ = v.get_element_type();
  block_size_ = static_cast<int64_t>(value_shape_[1]);  // values: [kv_heads, block, cols]
  const auto logits = compiled_.output("logits");
  if (logits.get_element_type() != ov::element::f32)
    throw std::runtime_error("the model's logits are " + logits.get_element_type().get_type_name() +
                             ", expected f32");
  vocab_ = logits.get_partial_shape()[2].get_length();
  auto bytes = [](ov::element::Type t, const ov::Shape& s) {
    ov::Shape one{1};
    one.insert(one.end(), s.begin(), s.end());
    return static_cast<int64_t>(ov::Tensor(t, one).get_byte_size());
  };
  block_bytes_ = (bytes(key_type_, key_shape_) + bytes(value_type_, value_shape_)) * num_layers_;
}

void PagedRunner::reserve(int64_t num_blocks) {
  if (num_blocks <= num_blocks_) return;
  auto grow = [&](const ov::Tensor& old, ov::element::Type type, const ov::Shape& block) {
    ov::Shape shape{static_cast<size_t>(num_blocks)};
    shape.insert(shape.end(), block.begin(), block.end());
    ov::Tensor t(type, shape);
    std::memset(t.data(), 0, t.get_byte_size());  // fresh tensors hold garbage
    if (old) std::memcpy(t.data(), old.data(), old.get_byte_size());  // blocks are outermost
    return t;
  };
  keys_.resize(static_cast<size_t>(num_layers_));
  values_.resize(static_cast<size_t>(num_layers_));
  for (int64_t l = 0; l < num_layers_; ++l) {
    const auto i = static_cast<size_t>(l);
    keys_[i] = grow(keys_[i], key_type_, key_shape_);
    values_[i] = grow(values_[i], value_type_, value_shape_);
    request_.set_tensor("key_cache." + std::to_string(l), keys_[i]);
    request_.set_tensor("value_cache." + std::to_string(l), values_[i]);
  }
  num_blocks_ = num_blocks;
}

void put_paged_step(InputTensors& inputs, ov::InferRequest& req, const int64_t* ids,
                    int64_t count, int64_t start, const std::vector<int32_t>& blocks) {
  const auto n = static_cast<size_t>(count);
  std::vector<int64_t> pos(n);
  for (size_t i = 0; i < n; ++i) pos[i] = start + static_cast<int64_t>(i);
  const int32_t past = static_cast<int32_t>(start), total = static_cast<int32_t>(start + count);
  const int32_t begins[2] = {0, static_cast<int32_t>(count)};
  const int32_t block_begins[2] = {0, static_cast<int32_t>(blocks.size())};
  const int64_t last = count - 1;
  using ov::element::i32, ov::element::i64;
  inputs.put(req, "input_ids", i64, {n}, ids);
  inputs.put(req, "position_ids", i64, {n}, pos.data());
  inputs.put(req, "past_lens", i32, {1}, &past);
  inputs.put(req, "subsequence_begins", i32, {2}, begins);
  inputs.put(req, "block_indices", i32, {blocks.size()}, blocks.data());
  inputs.put(req, "block_indices_begins", i32, {2}, block_begins);
  inputs.put(req, "max_context_len", i32, {}, &total);
  inputs.put(req, "logits_indices", i64, {1}, &last);
}

const float* PagedRunner::run(const int64_t* ids, int64_t count, int64_t start,
                              const std::vector<int32_t>& blocks) {
  put_paged_step(inputs_, request_, ids, count, start, blocks);
  const auto t0 = std::chrono::steady_clock::now();
  request_.infer();
  infer_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return request_.get_tensor("logits").data<const float>();
}

}  // namespace kvcrush
