// kvcrush_ov._core: the C++ kernels of kvcrush (cpp/include/kvcrush) for Python, on numpy
// arrays. The Python wrappers with shapes and docstrings are in kvcrush_ov/eviction/.
// Every kernel runs without the GIL. Invalid arguments raise ValueError naming the field.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <openvino/core/model.hpp>
#include <openvino/core/version.hpp>

#include "kvcrush/compaction.hpp"
#include "kvcrush/less.hpp"
#include "kvcrush/less_mix_op.hpp"
#include "kvcrush/parallel.hpp"
#include "kvcrush/passes.hpp"
#include "kvcrush/pooling.hpp"
#include "kvcrush/selection.hpp"

namespace nb = nanobind;

namespace {

template <class T, size_t R>
using In = nb::ndarray<const T, nb::ndim<R>, nb::c_contig, nb::device::cpu>;

template <class T>
using Out = nb::ndarray<nb::numpy, T>;

/// A new numpy array of ``shape`` that owns its (uninitialised) memory.
template <class T, size_t R>
Out<T> new_array(const std::array<size_t, R>& shape) {
  size_t total = 1;
  for (size_t s : shape) total *= s;
  auto buf = std::make_unique<T[]>(total > 0 ? total : 1);
  nb::capsule owner(buf.get(), [](void* p) noexcept { delete[] static_cast<T*>(p); });
  T* data = buf.release();  // the capsule owns it from here
  return Out<T>(data, R, shape.data(), owner);
}

inline const uint8_t* bytes(const bool* p) { return reinterpret_cast<const uint8_t*>(p); }
inline uint8_t* bytes(bool* p) { return reinterpret_cast<uint8_t*>(p); }

[[noreturn]] void bad_shape(const std::string& field, const std::string& allowed) {
  throw std::invalid_argument(field + ": allowed " + allowed);
}

template <class T>
Out<bool> top_k_mask(In<T, 2> values, In<int64_t, 1> k) {
  const size_t rows = values.shape(0), n = values.shape(1);
  if (k.shape(0) != rows)
    bad_shape("k", "one entry per row of values (" + std::to_string(rows) + ")");
  auto out = new_array<bool, 2>({rows, n});
  {
    nb::gil_scoped_release unlocked;
    kvcrush::top_k_mask<T>(values.data(), static_cast<int64_t>(rows), static_cast<int64_t>(n),
                           k.data(), bytes(out.data()));
  }
  return out;
}

Out<int64_t> hamming(In<bool, 3> vectors, In<bool, 3> anchors) {
  const size_t layers = vectors.shape(0), m = vectors.shape(1), d = vectors.shape(2);
  const size_t num_anchors = anchors.shape(0);
  if (anchors.shape(1) != layers || anchors.shape(2) != d)
    bad_shape("anchors", "shape [A, L, D] with vectors [L, M, D]");
  auto out = new_array<int64_t, 3>({num_anchors, layers, m});
  {
    nb::gil_scoped_release unlocked;
    kvcrush::hamming(bytes(vectors.data()), bytes(anchors.data()),
                     static_cast<int64_t>(num_anchors), static_cast<int64_t>(layers),
                     static_cast<int64_t>(m), static_cast<int64_t>(d), out.data());
  }
  return out;
}

Out<bool> make_anchor(const std::string& kind, In<bool, 3> vectors, In<bool, 2> valid,
                      std::optional<In<bool, 2>> random_bits) {
  const auto parsed = kvcrush::parse_anchor(kind);
  const size_t layers = vectors.shape(0), m = vectors.shape(1), d = vectors.shape(2);
  if (valid.shape(0) != layers || valid.shape(1) != m)
    bad_shape("valid", "shape [L, M] with vectors [L, M, D]");
  const uint8_t* bits = nullptr;
  if (random_bits) {
    if (random_bits->shape(0) != layers || random_bits->shape(1) != d)
      bad_shape("random_bits", "shape [L, D] with vectors [L, M, D]");
    bits = bytes(random_bits->data());
  }
  auto out = new_array<bool, 2>({layers, d});
  {
    nb::gil_scoped_release unlocked;
    kvcrush::make_anchor(parsed, bytes(vectors.data()), bytes(valid.data()),
                         static_cast<int64_t>(layers), static_cast<int64_t>(m),
                         static_cast<int64_t>(d), bits, bytes(out.data()));
  }
  return out;
}

Out<int64_t> split_largest_remainder(In<int64_t, 1> total, In<int64_t, 2> sizes) {
  const size_t rows = sizes.shape(0), groups = sizes.shape(1);
  if (total.shape(0) != rows) bad_shape("total", "one entry per row of sizes");
  auto out = new_array<int64_t, 2>({rows, groups});
  for (size_t r = 0; r < rows; ++r)
    kvcrush::split_largest_remainder(total.data()[r], sizes.data() + r * groups,
                                     static_cast<int64_t>(groups), out.data() + r * groups);
  return out;
}

Out<int64_t> stride_indices(In<int64_t, 1> n, In<int64_t, 1> k, In<int64_t, 1> i) {
  const size_t size = i.shape(0);
  if (n.shape(0) != size || k.shape(0) != size) bad_shape("n, k, i", "arrays of one length");
  auto out = new_array<int64_t, 1>({size});
  for (size_t j = 0; j < size; ++j)
    out.data()[j] = kvcrush::stride_index(n.data()[j], k.data()[j], i.data()[j]);
  return out;
}

Out<bool> pick_representatives(In<bool, 3> vectors, In<bool, 2> valid, In<bool, 3> anchors,
                               In<int64_t, 1> k) {
  const size_t layers = vectors.shape(0), m = vectors.shape(1), d = vectors.shape(2);
  const size_t num_anchors = anchors.shape(0);
  if (valid.shape(0) != layers || valid.shape(1) != m)
    bad_shape("valid", "shape [L, M] with vectors [L, M, D]");
  if (anchors.shape(1) != layers || anchors.shape(2) != d)
    bad_shape("anchors", "shape [A, L, D] with vectors [L, M, D]");
  if (k.shape(0) != layers) bad_shape("k", "one entry per layer (" + std::to_string(layers) + ")");
  auto out = new_array<bool, 2>({layers, m});
  {
    nb::gil_scoped_release unlocked;
    kvcrush::pick_representatives(bytes(vectors.data()), bytes(valid.data()),
                                  bytes(anchors.data()), k.data(),
                                  static_cast<int64_t>(num_anchors),
                                  static_cast<int64_t>(layers), static_cast<int64_t>(m),
                                  static_cast<int64_t>(d), bytes(out.data()));
  }
  return out;
}

// ---- pooling

template <void (*Kernel)(const float*, int64_t, int64_t, int64_t, int64_t, float*)>
Out<float> pool_rows(In<float, 2> values, int64_t before, int64_t after) {
  const size_t rows = values.shape(0), n = values.shape(1);
  auto out = new_array<float, 2>({rows, n});
  {
    nb::gil_scoped_release unlocked;
    Kernel(values.data(), static_cast<int64_t>(rows), static_cast<int64_t>(n), before, after,
           out.data());
  }
  return out;
}

// ---- compaction

using Cache = nb::ndarray<uint8_t, nb::ndim<3>, nb::c_contig, nb::device::cpu>;

void compact_blocks(Cache cache, int64_t head, const kvcrush::BlockLayout& layout,
                    In<int64_t, 1> dst, In<int64_t, 1> offsets, In<int64_t, 2> pairs,
                    bool lossless_single_source) {
  const auto num_blocks = static_cast<int64_t>(cache.shape(0));
  const auto heads = static_cast<int64_t>(cache.shape(1));
  const auto hbb = static_cast<int64_t>(cache.shape(2));
  if (hbb != layout.head_block_bytes)
    bad_shape("cache", "[NB, H, " + std::to_string(layout.head_block_bytes) + "] bytes");
  if (head < 0 || head >= heads)
    throw std::out_of_range("kv_codec: head " + std::to_string(head) + " outside 0.." +
                            std::to_string(heads - 1));
  const auto num_dst = static_cast<int64_t>(dst.shape(0));
  if (static_cast<int64_t>(offsets.shape(0)) != num_dst + 1)
    bad_shape("offsets", "one entry more than dst");
  if (pairs.shape(1) != 2 || static_cast<int64_t>(pairs.shape(0)) != offsets.data()[num_dst])
    bad_shape("pairs", "shape [offsets[-1], 2]");
  nb::gil_scoped_release unlocked;
  kvcrush::compact_blocks(cache.data() + head * hbb, num_blocks, heads * hbb, layout,
                          dst.data(), num_dst, offsets.data(), pairs.data(),
                          lossless_single_source);
}

Out<uint8_t> encode_by_channel(In<float, 3> x, In<int64_t, 1> counts,
                               const kvcrush::BlockLayout& layout) {
  kvcrush::validate_layout(layout);
  const size_t n = x.shape(0);
  if (!layout.by_channel) bad_shape("layout", "a by-channel (u8 / u4 key) layout");
  if (static_cast<int64_t>(x.shape(1)) != layout.block_size ||
      static_cast<int64_t>(x.shape(2)) != layout.head_dim)
    bad_shape("x", "shape [N, block_size, head_dim]");
  if (counts.shape(0) != n) bad_shape("counts", "one entry per block of x");
  for (size_t i = 0; i < n; ++i)
    if (counts.data()[i] < 0 || counts.data()[i] > layout.block_size)
      bad_shape("counts", "0 .. block_size rows per block");
  const auto hbb = static_cast<size_t>(layout.head_block_bytes);
  auto out = new_array<uint8_t, 2>({n, hbb});
  {
    nb::gil_scoped_release unlocked;
    const int64_t rows = layout.block_size * layout.head_dim;
    kvcrush::parallel_for(static_cast<int64_t>(n), rows * 8, [&](int64_t i) {
      kvcrush::encode_by_channel(x.data() + i * rows, counts.data()[i], layout,
                                 out.data() + i * layout.head_block_bytes);
    });
  }
  return out;
}

Out<float> decode_by_channel(In<uint8_t, 2> blocks, In<int64_t, 1> which, In<int64_t, 1> rows,
                             const kvcrush::BlockLayout& layout) {
  kvcrush::validate_layout(layout);
  if (!layout.by_channel) bad_shape("layout", "a by-channel (u8 / u4 key) layout");
  if (static_cast<int64_t>(blocks.shape(1)) != layout.head_block_bytes)
    bad_shape("blocks", "[U, head_block_bytes]");
  const size_t m = which.shape(0);
  if (rows.shape(0) != m) bad_shape("rows", "one entry per entry of which");
  const auto u = static_cast<int64_t>(blocks.shape(0));
  for (size_t i = 0; i < m; ++i) {
    if (which.data()[i] < 0 || which.data()[i] >= u)
      throw std::out_of_range("kv_codec: block " + std::to_string(which.data()[i]) +
                              " outside 0.." + std::to_string(u - 1));
    if (rows.data()[i] < 0 || rows.data()[i] >= layout.block_size)
      throw std::out_of_range("kv_codec: row " + std::to_string(rows.data()[i]) +
                              " outside 0.." + std::to_string(layout.block_size - 1));
  }
  const auto d = static_cast<size_t>(layout.head_dim);
  auto out = new_array<float, 2>({m, d});
  for (size_t i = 0; i < m; ++i)
    kvcrush::decode_by_channel(blocks.data() + which.data()[i] * layout.head_block_bytes,
                               rows.data()[i], layout, out.data() + i * d);
  return out;
}

// ---- graph passes (kvcrush/passes.hpp) on models owned by the openvino Python package

/// The ov::Model behind a Python ``openvino.Model``: ``address`` is its
/// ``_get_raw_address()`` (the C++ object's address; the caller's Python object keeps it alive
/// during the call). The returned pointer shares ownership with the Python object through
/// ov::Model's enable_shared_from_this (no second owner, no no-op deleter). Only the wrappers in
/// kvcrush_ov/transformations call this, after checking the type and that this module and the
/// openvino package use the same libopenvino (openvino_build()).
std::shared_ptr<ov::Model> model_at(uintptr_t address) {
  if (address == 0) throw std::invalid_argument("model: null address");
  auto* raw = reinterpret_cast<ov::Model*>(address);
  try {
    return raw->shared_from_this();
  } catch (const std::bad_weak_ptr&) {
    throw std::invalid_argument("model: the ov::Model is not owned by a std::shared_ptr");
  }
}

kvcrush::KeyFormat key_format(int format) {
  if (format < 0 || format > 3) bad_shape("format", "0 (by channel), 1 (f32), 2 (f16), 3 (bf16)");
  return static_cast<kvcrush::KeyFormat>(format);
}

/// kvcrush::AddLESS with the weights' arrays (shapes give the sizes; sliced per layer in C++).
void add_less(uintptr_t model, int64_t num_kv_heads, const std::vector<int64_t>& active_layers,
              In<float, 4> w1, In<float, 3> b1, In<float, 4> w2, In<float, 3> b2, int format,
              const kvcrush::BlockLayout& key_layout) {
  kvcrush::validate_layout(key_layout);
  kvcrush::LESSWeights w;
  w.num_layers = static_cast<int64_t>(w1.shape(0));
  w.num_heads = static_cast<int64_t>(w1.shape(1));
  w.num_kv_heads = num_kv_heads;
  w.head_dim = static_cast<int64_t>(w1.shape(2));
  w.hidden = static_cast<int64_t>(w1.shape(3));
  w.feature_dim = static_cast<int64_t>(w2.shape(3));
  w.active_layers = active_layers;
  w.q_w1.assign(w1.data(), w1.data() + w1.size());
  w.q_b1.assign(b1.data(), b1.data() + b1.size());
  w.q_w2.assign(w2.data(), w2.data() + w2.size());
  w.q_b2.assign(b2.data(), b2.data() + b2.size());
  kvcrush::add_less(model_at(model), w, key_format(format), key_layout);
}

/// The model's one Result reads LESSMix(its 16 Parameters, in order) afterwards (the op alone,
/// for tests and benchmarks of the op).
void less_mix_model(uintptr_t address, int64_t num_kv_heads, int64_t group, bool sequence_major,
                    int format, const kvcrush::BlockLayout& key_layout) {
  kvcrush::validate_layout(key_layout);
  const auto model = model_at(address);
  if (model->get_parameters().size() != kvcrush::LESSMixOp::kNumInputs ||
      model->get_results().size() != 1)
    bad_shape("model", "16 Parameters (the op's inputs) and one Result");
  ov::OutputVector args;
  for (const auto& p : model->get_parameters()) args.push_back(p->output(0));
  const kvcrush::LESSMixAttributes attributes{num_kv_heads, group, sequence_major,
                                              key_format(format), key_layout};
  auto op = std::make_shared<kvcrush::LESSMixOp>(args, attributes);
  model->get_results().front()->input(0).replace_source_output(op->output(0));
  model->validate_nodes_and_infer_types();
}

std::string openvino_build() { return ov::get_openvino_version().buildNumber; }

std::string openvino_compiled_version() {
  return std::to_string(OPENVINO_VERSION_MAJOR) + "." + std::to_string(OPENVINO_VERSION_MINOR) +
         "." + std::to_string(OPENVINO_VERSION_PATCH);
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "kvcrush C++ kernels (eviction selection); see kvcrush_ov.eviction for the API";
  m.def("available_cores", &kvcrush::available_cores,
        "Cores the kernels may use (the process's CPU affinity).");
  m.def("anchor_kinds", &kvcrush::anchor_kinds, "The anchor names KVCrush allows.");
  // One overload per dtype, tried without conversion first (the Python wrapper casts).
  m.def("top_k_mask", &top_k_mask<float>, nb::arg("values").noconvert(), nb::arg("k"));
  m.def("top_k_mask", &top_k_mask<double>, nb::arg("values").noconvert(), nb::arg("k"));
  m.def("top_k_mask", &top_k_mask<int64_t>, nb::arg("values").noconvert(), nb::arg("k"),
        "bool [R, N]: the k[r] largest of every row (ties: lower index first).");
  m.def("hamming", &hamming, nb::arg("vectors"), nb::arg("anchors"),
        "int64 [A, L, M]: Hamming distance of vectors [L, M, D] to anchors [A, L, D].");
  m.def("make_anchor", &make_anchor, nb::arg("kind"), nb::arg("vectors"), nb::arg("valid"),
        nb::arg("random_bits").none() = nb::none(), "bool [L, D]: one anchor per layer.");
  m.def("split_largest_remainder", &split_largest_remainder, nb::arg("total"), nb::arg("sizes"),
        "int64 [R, A]: total[r] split over sizes[r] by largest remainder.");
  m.def("stride_indices", &stride_indices, nb::arg("n"), nb::arg("k"), nb::arg("i"),
        "int64 [S]: floor((2 i + 1) n / (2 k)).");
  m.def("sliding_max", &pool_rows<kvcrush::sliding_max>, nb::arg("values"), nb::arg("before"),
        nb::arg("after"), "f32 [R, N]: max over [j - before, j + after] (outside: -inf).");
  m.def("window_sums", &pool_rows<kvcrush::window_sums>, nb::arg("values"), nb::arg("before"),
        nb::arg("after"), "f32 [R, N]: sum over [j - before, j + after] (outside: 0).");
  nb::class_<kvcrush::BlockLayout>(m, "BlockLayout", "One head-block's format (C++ side of "
                                   "kv_codec.CacheLayout).")
      .def(
          "__init__",
          [](kvcrush::BlockLayout* self, bool by_channel, int levels, int64_t block_size,
             int64_t head_dim, int64_t head_block_bytes, int64_t header_bytes,
             int64_t row_bytes) {
            new (self) kvcrush::BlockLayout{by_channel, levels, block_size, head_dim,
                                            head_block_bytes, header_bytes, row_bytes};
            kvcrush::validate_layout(*self);
          },
          nb::kw_only(), nb::arg("by_channel"), nb::arg("levels"), nb::arg("block_size"),
          nb::arg("head_dim"), nb::arg("head_block_bytes"), nb::arg("header_bytes"),
          nb::arg("row_bytes"))
      .def_ro("by_channel", &kvcrush::BlockLayout::by_channel)
      .def_ro("levels", &kvcrush::BlockLayout::levels)
      .def_ro("block_size", &kvcrush::BlockLayout::block_size)
      .def_ro("head_dim", &kvcrush::BlockLayout::head_dim)
      .def_ro("head_block_bytes", &kvcrush::BlockLayout::head_block_bytes)
      .def_ro("header_bytes", &kvcrush::BlockLayout::header_bytes)
      .def_ro("row_bytes", &kvcrush::BlockLayout::row_bytes);
  m.def("compact_blocks", &compact_blocks, nb::arg("cache").noconvert(), nb::arg("head"),
        nb::arg("layout"), nb::arg("dst"), nb::arg("offsets"), nb::arg("pairs"),
        nb::arg("lossless_single_source"),
        "Rewrites destination head-blocks of cache u8 [NB, H, HB] (head ``head``) in place.");
  m.def("encode_by_channel", &encode_by_channel, nb::arg("x"), nb::arg("counts"),
        nb::arg("layout"), "u8 [N, HB]: f32 rows [N, bs, D] as by-channel key head-blocks.");
  m.def("decode_by_channel", &decode_by_channel, nb::arg("blocks"), nb::arg("which"),
        nb::arg("rows"), nb::arg("layout"), "f32 [M, D]: rows of by-channel key head-blocks.");
  m.def("pick_representatives", &pick_representatives, nb::arg("vectors"), nb::arg("valid"),
        nb::arg("anchors"), nb::arg("k"), "bool [L, M]: KVCrush's representatives per layer.");

  // ---- graph passes: ``model`` is an openvino.Model's _get_raw_address() (see model_at)
  nb::exception<kvcrush::PerHeadPatternError>(m, "PerHeadPatternError", PyExc_RuntimeError);
  nb::exception<kvcrush::LogitsPatternError>(m, "LogitsPatternError", PyExc_RuntimeError);
  nb::exception<kvcrush::FastKVPatternError>(m, "FastKVPatternError", PyExc_ValueError);
  nb::exception<kvcrush::LESSPatternError>(m, "LESSPatternError", PyExc_RuntimeError);
  m.def("openvino_build", &openvino_build,
        "Build number of the libopenvino this module runs on (openvino.get_version() format).");
  m.def("openvino_compiled_version", &openvino_compiled_version,
        "The OpenVINO version (major.minor.patch) whose headers this module was compiled with.");
  m.def(
      "to_paged",
      [](uintptr_t model, bool score_outputs, bool score_aggregation, bool per_layer_blocks) {
        kvcrush::to_paged(model_at(model), {score_outputs, score_aggregation, per_layer_blocks});
      },
      nb::arg("model"), nb::arg("score_outputs"), nb::arg("score_aggregation"),
      nb::arg("per_layer_blocks"), "kvcrush::ToPaged on the model in place.");
  m.def(
      "add_logits_indices", [](uintptr_t model) { kvcrush::add_logits_indices(model_at(model)); },
      nb::arg("model"), "kvcrush::LogitsIndices on the model in place.");
  m.def(
      "find_lm_head",
      [](uintptr_t model) { return kvcrush::find_lm_head(*model_at(model))->get_name(); },
      nb::arg("model"), "The unique name (Node.get_name()) of the lm_head MatMul.");
  m.def(
      "to_per_head",
      [](uintptr_t model, bool sequence_major) {
        kvcrush::to_per_head(model_at(model), sequence_major);
      },
      nb::arg("model"), nb::arg("sequence_major"), "kvcrush::ToPerHead on the model in place.");
  m.def(
      "fastkv_cut",
      [](uintptr_t model, int64_t split_layer, bool front) {
        kvcrush::fastkv_cut(model_at(model), split_layer,
                            front ? kvcrush::FastKVPart::front : kvcrush::FastKVPart::back);
      },
      nb::arg("model"), nb::arg("split_layer"), nb::arg("front"),
      "kvcrush::FastKVCut on the model in place (the front part, or the back part).");
  m.def(
      "fastkv_residual_stream",
      [](uintptr_t model) {
        std::vector<std::pair<std::string, size_t>> out;
        for (const auto& h : kvcrush::residual_stream(*model_at(model)))
          out.emplace_back(h.get_node()->get_name(), h.get_index());
        return out;
      },
      nb::arg("model"),
      "kvcrush::residual_stream as (unique node name (Node.get_name()), output index) pairs.");
  m.def(
      "fastkv_num_layers",
      [](uintptr_t model) { return kvcrush::count_layers(*model_at(model)); }, nb::arg("model"),
      "kvcrush::count_layers: the model's key_cache.* Parameters.");
  m.def("add_less", &add_less, nb::arg("model"), nb::arg("num_kv_heads"),
        nb::arg("active_layers"), nb::arg("q_w1"), nb::arg("q_b1"), nb::arg("q_w2"),
        nb::arg("q_b2"), nb::arg("format"), nb::arg("key_layout"),
        "kvcrush::AddLESS on the model in place: phi's weights f32 q_w1 [L, Hq, D, Y], "
        "q_b1 [L, Hq, Y], q_w2 [L, Hq, Y, F], q_b2 [L, Hq, F]; the key cache's format "
        "(kvcrush::KeyFormat) and head-block layout.");
  m.def(
      "set_cache_types",
      [](uintptr_t model, const std::string& key_type, const std::vector<int64_t>& key_dims,
         const std::string& value_type, const std::vector<int64_t>& value_dims) {
        kvcrush::set_cache_types(model_at(model),
                                 {ov::element::Type(key_type), ov::element::Type(value_type),
                                  key_dims, value_dims});
      },
      nb::arg("model"), nb::arg("key_type"), nb::arg("key_dims"), nb::arg("value_type"),
      nb::arg("value_dims"),
      "kvcrush::SetCacheTypes on the model in place (types by name: 'u8', 'f32', ...).");
  m.def("less_mix_model", &less_mix_model, nb::arg("model"), nb::arg("num_kv_heads"),
        nb::arg("group"), nb::arg("sequence_major"), nb::arg("format"), nb::arg("key_layout"),
        "A model of 16 Parameters and one Result -> its Result reads LESSMix(Parameters).");
}
