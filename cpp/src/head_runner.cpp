#include "head_runner.hpp"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <stdexcept>

#include "kvcrush/passes.hpp"
#include "kvcrush/properties.hpp"
#include "paged_runner.hpp"

namespace kvcrush {

double HeadTable::mean_len() const {
  int64_t rows = 0, n = 0;
  for (const auto& layer : positions)
    for (const auto& p : layer) {
      rows += static_cast<int64_t>(p.size());
      ++n;
    }
  return n ? static_cast<double>(rows) / static_cast<double>(n) : 0.0;
}

int64_t HeadTable::num_blocks() const {
  int64_t n = 0;
  for (const auto& layer : blocks)
    for (const auto& b : layer) n += static_cast<int64_t>(b.size());
  return n;
}

namespace {

using ov::element::i32, ov::element::i64;

/// kv_codec.CacheLayout of a compiled key_cache / value_cache input [?, 1, rows, cols].
BlockLayout layout_of(const ov::Output<const ov::Node>& port, bool key) {
  const auto ps = port.get_partial_shape();
  const int64_t rows = ps[2].get_length(), cols = ps[3].get_length();
  const auto type = port.get_element_type();
  const bool quantized = type == ov::element::u8 || type == ov::element::u4;
  const int64_t bits = static_cast<int64_t>(type.bitwidth());
  const int64_t extra = quantized ? 8 * 8 / bits : 0;  // the scale / zero-point header
  BlockLayout l;
  l.by_channel = key && quantized;
  l.levels = type == ov::element::u4 ? 15 : 255;
  l.block_size = key ? rows - extra : rows;
  l.head_dim = key ? cols : cols - extra;
  l.head_block_bytes = rows * cols * bits / 8;
  l.header_bytes = l.by_channel ? 8 * l.head_dim : 0;
  l.row_bytes = (l.head_block_bytes - l.header_bytes) / l.block_size;
  validate_layout(l);
  return l;
}

int64_t blocks_for(int64_t tokens, int64_t block_size) {
  return (tokens + block_size - 1) / block_size;
}

/// Removes the scores.L results (a graph for the steps nobody scores).
void drop_scores(const std::shared_ptr<ov::Model>& model) {
  const ov::ResultVector results = model->get_results();  // a copy: removal changes it
  for (const auto& r : results)
    for (const auto& name : r->output(0).get_names())
      if (name.rfind("scores.", 0) == 0) {
        model->remove_result(r);
        break;
      }
  model->validate_nodes_and_infer_types();
}

}  // namespace

HeadRunner::HeadRunner(ov::Core& core, const std::filesystem::path& model_dir,
                       const std::string& device, const std::string& precision,
                       bool plain_prefill) {
  PagedOptions options;
  options.score_outputs = true;
  options.score_aggregation = true;
  auto scored = read_paged_model(core, model_dir.string(), options, true);
  const ov::AnyMap props = kv_cache_properties(core, device, precision);
  if (plain_prefill) {  // a clone shares the read model's weights
    auto plain = scored->clone();
    drop_scores(plain);
    plain_ = core.compile_model(plain, device, props);
    plain_req_.req = plain_.create_infer_request();
  }
  auto decode = scored->clone();
  to_per_head(decode, /*sequence_major=*/true);
  drop_scores(decode);
  to_per_head(scored, /*sequence_major=*/false);
  decode_ = core.compile_model(decode, device, props);
  scored_ = core.compile_model(scored, device, props);
  decode_req_.req = decode_.create_infer_request();
  scored_req_.req = scored_.create_infer_request();
  for (const auto& in : scored_.inputs())
    if (in.get_any_name().rfind("key_cache.", 0) == 0) ++num_layers_;
  num_heads_ = scored->get_rt_info<int64_t>(kPerHeadRtKey, "num_kv_heads");
  const auto k = scored_.input("key_cache.0"), v = scored_.input("value_cache.0");
  key_layout_ = layout_of(k, true);
  value_layout_ = layout_of(v, false);
  key_type_ = k.get_element_type();
  value_type_ = v.get_element_type();
  for (size_t i = 1; i < 4; ++i) {
    key_shape_.push_back(k.get_partial_shape()[i].get_length());
    value_shape_.push_back(v.get_partial_shape()[i].get_length());
  }
  block_size_ = value_layout_.block_size;
  const auto logits = scored_.output("logits");
  if (logits.get_element_type() != ov::element::f32)
    throw std::runtime_error("the model's logits are " +
                             logits.get_element_type().get_type_name() + ", expected f32");
  vocab_ = logits.get_partial_shape()[2].get_length();
}

void HeadRunner::allocate(int64_t blocks_per_head) {
  const int64_t total = blocks_per_head * num_heads_;
  if (total > pool_blocks_) {
    keys_.assign(static_cast<size_t>(num_layers_), {});
    values_.assign(static_cast<size_t>(num_layers_), {});
    auto make = [&](ov::element::Type type, const ov::Shape& block) {
      ov::Shape shape{static_cast<size_t>(total)};
      shape.insert(shape.end(), block.begin(), block.end());
      ov::Tensor t(type, shape);
      std::memset(t.data(), 0, t.get_byte_size());  // fresh tensors hold garbage
      return t;
    };
    for (int64_t l = 0; l < num_layers_; ++l) {
      const auto i = static_cast<size_t>(l);
      keys_[i] = make(key_type_, key_shape_);
      values_[i] = make(value_type_, value_shape_);
      for (auto* r : {&scored_req_, &decode_req_}) {
        r->req.set_tensor("key_cache." + std::to_string(l), keys_[i]);
        r->req.set_tensor("value_cache." + std::to_string(l), values_[i]);
      }
      if (plain_) {  // the same memory seen as [blocks, H, rows, cols]
        auto view = [&](const ov::Tensor& pool, const ov::Shape& block) {
          ov::Shape shape{static_cast<size_t>(total / num_heads_), static_cast<size_t>(num_heads_)};
          shape.insert(shape.end(), block.begin() + 1, block.end());
          return ov::Tensor(pool.get_element_type(), shape, pool.data());
        };
        plain_req_.req.set_tensor("key_cache." + std::to_string(l), view(keys_[i], key_shape_));
        plain_req_.req.set_tensor("value_cache." + std::to_string(l),
                                  view(values_[i], value_shape_));
      }
    }
    pool_blocks_ = total;
    warm_decode_graph();
  }
  free_.assign(static_cast<size_t>(num_layers_), {});
  for (auto& f : free_) {
    f.resize(static_cast<size_t>(pool_blocks_));
    std::iota(f.rbegin(), f.rend(), 0);  // block 0 is handed out first
  }
}

void HeadRunner::warm_decode_graph() {
  // The decode graph's first inference is slow (about 0.3 s on SmolLM2-135M): run it once on a
  // dummy token in head block 0 of every (layer, head), then zero that block again.
  HeadTable t;
  t.blocks.assign(static_cast<size_t>(num_layers_),
                  std::vector<std::vector<int32_t>>(static_cast<size_t>(num_heads_), {0}));
  t.positions.assign(static_cast<size_t>(num_layers_),
                     std::vector<std::vector<int64_t>>(static_cast<size_t>(num_heads_), {0}));
  t.num_written = 1;
  t.version = ++versions_;
  const int64_t id = 0;
  run(&id, 1, t, 0, nullptr);
  for (auto* caches : {&keys_, &values_})
    for (auto& c : *caches) std::memset(c.data(), 0, c.get_byte_size() / static_cast<size_t>(pool_blocks_));
}

void HeadRunner::append(HeadTable& t, int64_t count) {
  if (t.blocks.empty()) {
    t.blocks.assign(static_cast<size_t>(num_layers_),
                    std::vector<std::vector<int32_t>>(static_cast<size_t>(num_heads_)));
    t.positions.assign(static_cast<size_t>(num_layers_),
                       std::vector<std::vector<int64_t>>(static_cast<size_t>(num_heads_)));
  }
  for (size_t l = 0; l < t.blocks.size(); ++l) {
    // heads take blocks in turn, so a fresh table holds whole groups (head h of group g is
    // block g * H + h: the plain graph's view)
    for (bool more = true; more;) {
      more = false;
      for (size_t h = 0; h < t.blocks[l].size(); ++h) {
        auto& blocks = t.blocks[l][h];
        const auto rows = static_cast<int64_t>(t.positions[l][h].size()) + count;
        if (static_cast<int64_t>(blocks.size()) >= blocks_for(rows, block_size_)) continue;
        t.version = versions_ + 1;
        if (free_[l].empty())
          throw std::runtime_error("the KV cache is full (" + std::to_string(pool_blocks_) +
                                   " head blocks per layer)");
        blocks.push_back(free_[l].back());
        free_[l].pop_back();
        more = true;
      }
    }
    for (auto& pos : t.positions[l])
      for (int64_t i = 0; i < count; ++i) pos.push_back(t.num_written + i);
  }
  if (t.version > versions_) versions_ = t.version;  // a block list changed
  t.num_written += count;
}

void HeadRunner::compact(HeadTable& t,
                         const std::vector<std::vector<std::vector<int64_t>>>& rows) {
  const int64_t bs = block_size_;
  std::vector<std::vector<Move>> by_layer(t.blocks.size());
  for (size_t l = 0; l < t.blocks.size(); ++l)
    for (size_t h = 0; h < t.blocks[l].size(); ++h) {
      const auto& order = rows[l][h];
      auto& blocks = t.blocks[l][h];
      const std::vector<int32_t> old = blocks;  // sources: the blocks as they were
      const auto k = static_cast<int64_t>(order.size());
      // a destination block is rewritten only if one of its rows changes (fill_holes keeps
      // most rows where they are)
      for (int64_t i = 0; i < blocks_for(k, bs); ++i) {
        bool moved = false;
        for (int64_t r = i * bs; r < std::min(k, (i + 1) * bs); ++r)
          moved = moved || order[static_cast<size_t>(r)] != r;
        if (!moved) continue;
        Move m{l, blocks[static_cast<size_t>(i)], {}};
        for (int64_t r = i * bs; r < std::min(k, (i + 1) * bs); ++r) {
          const int64_t src = order[static_cast<size_t>(r)];
          m.pairs.push_back(old[static_cast<size_t>(src / bs)]);
          m.pairs.push_back(src % bs);
        }
        by_layer[l].push_back(std::move(m));
      }
      const auto keep_blocks = static_cast<size_t>(blocks_for(k, bs));
      free_[l].insert(free_[l].end(), blocks.begin() + static_cast<std::ptrdiff_t>(keep_blocks),
                      blocks.end());
      blocks.resize(keep_blocks);
      std::vector<int64_t> pos(order.size());
      for (size_t i = 0; i < order.size(); ++i)
        pos[i] = t.positions[l][h][static_cast<size_t>(order[i])];
      t.positions[l][h] = std::move(pos);
    }
  t.version = ++versions_;
  for (size_t l = 0; l < by_layer.size(); ++l) {
    const auto& moves = by_layer[l];
    if (moves.empty()) continue;
    std::vector<int64_t> dst, offsets{0}, pairs;
    for (const auto& m : moves) {
      dst.push_back(m.dst);
      pairs.insert(pairs.end(), m.pairs.begin(), m.pairs.end());
      offsets.push_back(static_cast<int64_t>(pairs.size() / 2));
    }
    for (auto [cache, layout] : {std::pair{&keys_[l], &key_layout_}, {&values_[l], &value_layout_}})
      compact_blocks(static_cast<uint8_t*>(cache->data()), pool_blocks_, layout->head_block_bytes,
                     *layout, dst.data(), static_cast<int64_t>(dst.size()), offsets.data(),
                     pairs.data(), /*lossless_single_source=*/true);
  }
}

void HeadRunner::set_tables(Request& r, const HeadTable& t, int64_t count, bool decode) {
  const auto heads = static_cast<size_t>(num_heads_);
  // one sequence: head-major and sequence-major subsequences are both h = 0..H-1
  std::vector<int32_t> begins(heads + 1), past(heads);
  for (size_t h = 0; h <= heads; ++h)
    begins[h] = static_cast<int32_t>(decode ? static_cast<int64_t>(h)
                                            : static_cast<int64_t>(h) * count);
  r.inputs.put(r.req, kHeadSubsequenceBegins, i32, {heads + 1}, begins.data());
  const bool tables = r.table_version != t.version;  // else the request holds them already
  for (size_t l = 0; l < t.blocks.size(); ++l) {
    const auto layer = static_cast<int64_t>(l);
    for (size_t h = 0; h < heads; ++h) past[h] = static_cast<int32_t>(t.len(l, h) - count);
    r.inputs.put(r.req, head_past_lens_name(layer), i32, {heads}, past.data());
    if (!tables) continue;
    std::vector<int32_t> flat, block_begins{0};
    for (size_t h = 0; h < heads; ++h) {
      flat.insert(flat.end(), t.blocks[l][h].begin(), t.blocks[l][h].end());
      block_begins.push_back(static_cast<int32_t>(flat.size()));
    }
    r.inputs.put(r.req, block_indices_name(layer), i32, {flat.size()}, flat.data());
    r.inputs.put(r.req, block_indices_begins_name(layer), i32, {block_begins.size()},
                 block_begins.data());
  }
  r.table_version = t.version;
}

std::vector<int32_t> HeadRunner::plain_table(const HeadTable& t) const {
  const auto heads = static_cast<size_t>(num_heads_);
  if (t.blocks.empty() || t.blocks[0].size() != heads) return {};
  std::vector<int32_t> groups;
  for (const int32_t b : t.blocks[0][0]) {
    if (b % num_heads_ != 0) return {};
    groups.push_back(b / static_cast<int32_t>(num_heads_));
  }
  for (size_t l = 0; l < t.blocks.size(); ++l)
    for (size_t h = 0; h < heads; ++h) {
      const auto& blocks = t.blocks[l][h];
      // an eviction leaves fewer rows than positions written, for good
      if (blocks.size() != groups.size() || t.len(l, h) != t.num_written) return {};
      for (size_t g = 0; g < groups.size(); ++g)
        if (blocks[g] != groups[g] * static_cast<int32_t>(num_heads_) + static_cast<int32_t>(h))
          return {};
    }
  return groups;
}

const float* HeadRunner::run_plain(const int64_t* ids, int64_t count, const HeadTable& t,
                                   const std::vector<int32_t>& blocks) {
  Request& r = plain_req_;
  put_paged_step(r.inputs, r.req, ids, count, t.num_written - count, blocks);
  const int32_t one = 1;  // scores nobody reads (the graph drops them)
  r.inputs.put(r.req, "score_aggregation_window", i32, {1}, &one);
  r.req.infer();
  ++plain_steps_;
  return r.req.get_tensor("logits").data<const float>();
}

const float* HeadRunner::run(const int64_t* ids, int64_t count, const HeadTable& t,
                             int64_t window, std::vector<std::vector<float>>* scores) {
  if (plain_ && window == 0 && count > 1)
    if (const auto blocks = plain_table(t); !blocks.empty()) return run_plain(ids, count, t, blocks);
  const bool decode = window == 0 && count == 1;
  Request& r = decode ? decode_req_ : scored_req_;
  ov::InferRequest& req = r.req;
  set_tables(r, t, count, decode);
  const auto n = static_cast<size_t>(count);
  std::vector<int64_t> pos(n);
  for (size_t i = 0; i < n; ++i) pos[i] = t.num_written - count + static_cast<int64_t>(i);
  int64_t max_len = 0;
  for (size_t l = 0; l < t.positions.size(); ++l)
    for (size_t h = 0; h < t.positions[l].size(); ++h) max_len = std::max(max_len, t.len(l, h));
  const auto max_ctx = static_cast<int32_t>(max_len);
  const int64_t last = count - 1;
  r.inputs.put(req, "input_ids", i64, {n}, ids);
  r.inputs.put(req, "position_ids", i64, {n}, pos.data());
  r.inputs.put(req, "max_context_len", i32, {}, &max_ctx);
  r.inputs.put(req, "logits_indices", i64, {1}, &last);
  if (!decode) {  // scores nobody asked for (a prefill chunk) are computed and dropped
    const auto w = static_cast<int32_t>(window > 0 ? window : 1);
    r.inputs.put(req, "score_aggregation_window", i32, {1}, &w);
  }
  req.infer();
  if (window > 0 && scores) {
    scores->resize(static_cast<size_t>(num_layers_));
    for (int64_t l = 0; l < num_layers_; ++l) {
      const ov::Tensor s = req.get_tensor("scores." + std::to_string(l));
      const auto* p = s.data<const float>();
      (*scores)[static_cast<size_t>(l)].assign(p, p + s.get_size());
    }
  }
  return req.get_tensor("logits").data<const float>();
}

}  // namespace kvcrush
