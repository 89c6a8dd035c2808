// kvcrush_ov._core: the C++ kernels of kvcrush (cpp/include/kvcrush) for Python, on numpy
// arrays. The Python wrappers with shapes and docstrings are in kvcrush_ov/eviction/.
// Every kernel runs without the GIL. Invalid arguments raise ValueError naming the field.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <openvino/core/model.hpp>
#include <openvino/core/version.hpp>

#include "kvcrush/compaction.hpp"
#include "kvcrush/less.hpp"
#include "kvcrush/less_mix_op.hpp"
#include "kvcrush/parallel.hpp"
#include "kvcrush/passes.hpp"
#include "kvcrush/policy.hpp"
#include "kvcrush/properties.hpp"
#include "kvcrush/replay_scores.hpp"
#include "kvcrush/pooling.hpp"
#include "kvcrush/selection.hpp"
#include "kvcrush/upstream.hpp"

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

// ---- policies (policy.hpp)

/// A PolicyConfig from the names Python uses (validated).
void init_policy(kvcrush::PolicyConfig* self, const std::string& importance,
                 const std::string& aggregation_mode, const std::string& pooling,
                 int64_t kernel_size, int64_t offset, double beta, double alpha,
                 const std::string& scope, bool kvcrush, double share,
                 const std::vector<std::string>& anchors, const std::string& granularity,
                 bool dynamic_split, std::optional<std::pair<double, double>> taper,
                 std::optional<std::string> bit_aggregation) {
  kvcrush::PolicyConfig cfg;
  cfg.importance = kvcrush::parse_importance(importance);
  cfg.aggregation = kvcrush::parse_aggregation(aggregation_mode);
  cfg.pooling = kvcrush::parse_pooling(pooling);
  cfg.kernel_size = kernel_size;
  cfg.offset = offset;
  cfg.beta = beta;
  cfg.alpha = alpha;
  cfg.scope = kvcrush::parse_scope(scope);
  if (kvcrush) {
    kvcrush::KVCrushOptions o;
    o.share = share;
    o.anchors.clear();
    for (const auto& a : anchors) {
      try {
        o.anchors.push_back(kvcrush::parse_anchor(a));
      } catch (const std::invalid_argument&) {
        throw std::invalid_argument("kvcrush.anchor_point_mode='" + a + "' is invalid: allowed "
                                    "is one of " + kvcrush::anchor_kinds());
      }
    }
    o.granularity = kvcrush::parse_granularity(granularity);
    o.dynamic_split = dynamic_split;
    o.taper = taper.has_value();
    if (taper) std::tie(o.taper_low, o.taper_high) = *taper;
    if (bit_aggregation) o.bit_aggregation = kvcrush::parse_aggregation(*bit_aggregation);
    cfg.kvcrush = o;
  } else {
    cfg.kvcrush.reset();
  }
  kvcrush::validate(cfg);
  new (self) kvcrush::PolicyConfig(cfg);
}

/// The candidate arrays of one eviction event, checked against each other.
kvcrush::Candidates candidates(In<float, 3> scores, In<float, 3> counts,
                               In<int64_t, 3> positions, In<int64_t, 2> lengths,
                               int64_t block_size) {
  const size_t layers = scores.shape(0), heads = scores.shape(1), n = scores.shape(2);
  for (size_t i = 0; i < 3; ++i) {
    if (counts.shape(i) != scores.shape(i)) bad_shape("counts", "the shape of scores [L, H, N]");
    if (positions.shape(i) != scores.shape(i))
      bad_shape("positions", "the shape of scores [L, H, N]");
  }
  if (lengths.shape(0) != layers || lengths.shape(1) != heads)
    bad_shape("lengths", "shape [L, H] with scores [L, H, N]");
  return {scores.data(), counts.data(), positions.data(), lengths.data(),
          static_cast<int64_t>(layers), static_cast<int64_t>(heads), static_cast<int64_t>(n),
          block_size};
}

const uint8_t* random_of(const kvcrush::PolicyConfig& cfg, const kvcrush::Candidates& c,
                         const std::optional<In<bool, 3>>& random_bits) {
  const int64_t want = kvcrush::random_bits_size(cfg, c.num_heads, c.block_size, c.num_layers);
  if (want == 0) return nullptr;
  if (!random_bits || static_cast<int64_t>(random_bits->size()) != want ||
      static_cast<int64_t>(random_bits->shape(1)) != c.num_layers)
    bad_shape("random_bits", "bool [R, L, D] (R random anchors, D = " +
                                 std::to_string(kvcrush::anchor_bits(cfg, c.num_heads,
                                                                     c.block_size)) + ")");
  return bytes(random_bits->data());
}

Out<bool> select_keep(const kvcrush::PolicyConfig& cfg, In<float, 3> scores, In<float, 3> counts,
                      In<int64_t, 3> positions, In<int64_t, 2> lengths, int64_t block_size,
                      int64_t num_keep, std::optional<In<bool, 3>> random_bits) {
  const auto c = candidates(scores, counts, positions, lengths, block_size);
  const uint8_t* bits = random_of(cfg, c, random_bits);
  auto keep = new_array<bool, 3>({scores.shape(0), scores.shape(1), scores.shape(2)});
  {
    nb::gil_scoped_release unlocked;
    kvcrush::select_keep(cfg, c, num_keep, bits, bytes(keep.data()));
  }
  return keep;
}

std::tuple<Out<bool>, Out<bool>, Out<bool>, Out<int64_t>, Out<bool>> kvcrush_plan(
    const kvcrush::PolicyConfig& cfg, In<float, 3> scores, In<float, 3> counts,
    In<int64_t, 3> positions, In<int64_t, 2> lengths, int64_t block_size, int64_t num_keep,
    std::optional<In<bool, 3>> random_bits) {
  if (!cfg.kvcrush) bad_shape("cfg", "a policy with KVCrush");
  const auto c = candidates(scores, counts, positions, lengths, block_size);
  const uint8_t* bits = random_of(cfg, c, random_bits);
  const std::array<size_t, 3> shape{scores.shape(0), scores.shape(1), scores.shape(2)};
  auto keep = new_array<bool, 3>(shape), imp = new_array<bool, 3>(shape);
  auto crush = new_array<bool, 3>(shape), head_bits = new_array<bool, 3>(shape);
  auto budget = new_array<int64_t, 1>({shape[0]});
  kvcrush::SelectionDetail detail{bytes(imp.data()), bytes(crush.data()), budget.data(),
                                  bytes(head_bits.data())};
  {
    nb::gil_scoped_release unlocked;
    kvcrush::select_keep(cfg, c, num_keep, bits, bytes(keep.data()), &detail);
  }
  return {keep, imp, crush, budget, head_bits};
}

Out<float> policy_scores(const kvcrush::PolicyConfig& cfg, In<float, 3> scores,
                         In<float, 3> counts, In<int64_t, 3> positions, In<int64_t, 2> lengths,
                         int64_t block_size, std::optional<std::string> aggregation) {
  const auto c = candidates(scores, counts, positions, lengths, block_size);
  std::optional<kvcrush::Aggregation> agg;
  if (aggregation) agg = kvcrush::parse_aggregation(*aggregation);
  auto out = new_array<float, 3>({scores.shape(0), scores.shape(1), scores.shape(2)});
  {
    nb::gil_scoped_release unlocked;
    kvcrush::policy_scores(cfg, c, out.data(), agg);
  }
  return out;
}

Out<float> pool_scores(In<float, 2> values, In<int64_t, 1> lengths, const std::string& pooling,
                       int64_t kernel_size, int64_t offset) {
  const size_t rows = values.shape(0), n = values.shape(1);
  if (lengths.shape(0) != rows) bad_shape("lengths", "one entry per row of values");
  const auto kind = kvcrush::parse_pooling(pooling);
  auto out = new_array<float, 2>({rows, n});
  {
    nb::gil_scoped_release unlocked;
    kvcrush::pool_scores(values.data(), lengths.data(), static_cast<int64_t>(rows),
                         static_cast<int64_t>(n), kind, kernel_size, offset, out.data());
  }
  return out;
}

using PlanResult = std::tuple<Out<int64_t>, Out<int64_t>, int64_t, int64_t, int64_t>;

/// The cached rows of plan_event's arguments (checked).
kvcrush::SequenceRows sequence_rows(In<int64_t, 1> positions, std::optional<In<float, 1>>& scores,
                                    In<int64_t, 1> offsets, In<int64_t, 1> query_positions,
                                    int64_t num_layers, int64_t num_heads) {
  if (num_layers < 0 || num_heads < 0 ||
      static_cast<int64_t>(offsets.shape(0)) != num_layers * num_heads + 1)
    bad_shape("offsets", "L * H + 1 entries");
  const int64_t* off = offsets.data();
  if (off[0] != 0 || off[num_layers * num_heads] != static_cast<int64_t>(positions.shape(0)))
    bad_shape("offsets", "0 .. len(positions)");
  if (scores && scores->shape(0) != positions.shape(0))
    bad_shape("scores", "None or one entry per row of positions");
  return {positions.data(), scores ? scores->data() : nullptr, off, query_positions.data(),
          static_cast<int64_t>(query_positions.shape(0)), num_layers, num_heads};
}

/// (keep_rows, keep_offsets, num_sinks, num_recent, num_keep) as new arrays.
PlanResult plan_result(const kvcrush::EventPlan& plan) {
  auto kept = new_array<int64_t, 1>({plan.keep_rows.size()});
  std::copy(plan.keep_rows.begin(), plan.keep_rows.end(), kept.data());
  auto kept_off = new_array<int64_t, 1>({plan.keep_offsets.size()});
  std::copy(plan.keep_offsets.begin(), plan.keep_offsets.end(), kept_off.data());
  return {kept, kept_off, plan.num_sinks, plan.num_recent, plan.num_keep};
}

PlanResult plan_event_in(kvcrush::PlanWorkspace& ws, const kvcrush::PolicyConfig& cfg,
                         In<int64_t, 1> positions, std::optional<In<float, 1>> scores,
                         In<int64_t, 1> offsets, In<int64_t, 1> query_positions,
                         int64_t num_layers, int64_t num_heads, int64_t budget,
                         int64_t start_size, int64_t recent_size, int64_t num_written,
                         int64_t block_size, std::optional<In<bool, 3>> random_bits) {
  const kvcrush::SequenceRows rows =
      sequence_rows(positions, scores, offsets, query_positions, num_layers, num_heads);
  const int64_t want = kvcrush::random_bits_size(cfg, num_heads, block_size, num_layers);
  const uint8_t* bits = nullptr;
  if (want > 0) {
    if (!random_bits || static_cast<int64_t>(random_bits->size()) != want)
      bad_shape("random_bits", "bool [R, L, D] (R random anchors, D = " +
                                   std::to_string(kvcrush::anchor_bits(cfg, num_heads,
                                                                       block_size)) + ")");
    bits = bytes(random_bits->data());
  }
  const kvcrush::EventBudget b{budget, start_size, recent_size, num_written, block_size};
  {
    nb::gil_scoped_release unlocked;
    kvcrush::plan_event(cfg, rows, b, bits, ws);
  }
  return plan_result(ws.plan);
}

PlanResult plan_event(const kvcrush::PolicyConfig& cfg, In<int64_t, 1> positions,
                      std::optional<In<float, 1>> scores, In<int64_t, 1> offsets,
                      In<int64_t, 1> query_positions, int64_t num_layers, int64_t num_heads,
                      int64_t budget, int64_t start_size, int64_t recent_size,
                      int64_t num_written, int64_t block_size,
                      std::optional<In<bool, 3>> random_bits) {
  kvcrush::PlanWorkspace ws;
  return plan_event_in(ws, cfg, positions, scores, offsets, query_positions, num_layers,
                       num_heads, budget, start_size, recent_size, num_written, block_size,
                       random_bits);
}

/// A policy's answer ``keep`` (any Python object) into out u8 [L, H, N]; PlanError in
/// check_keep's words unless it is a numpy bool array of that shape. With the GIL.
void copy_keep(nb::handle keep, int64_t num_layers, int64_t num_heads, int64_t n,
               const std::string& who, uint8_t* out) {
  nb::module_ np = nb::module_::import_("numpy");
  const nb::object shape = keep.attr("shape"), dtype = keep.attr("dtype");
  const nb::tuple want = nb::make_tuple(num_layers, num_heads, n);
  if (!shape.equal(want) || dtype.not_equal(np.attr("bool_")))
    throw kvcrush::PlanError(
        nb::str("{}: keep must be bool {}, got {} {}").format(who, want, dtype, shape).c_str());
  const auto mask = nb::cast<In<bool, 3>>(np.attr("ascontiguousarray")(keep));
  std::copy_n(bytes(mask.data()), num_layers * num_heads * n, out);
}

/// _core.EventPlanner: plan_event's buffers, kept from one event to the next, and the numpy
/// arrays a Python policy's select received at the last event (EvictionInputs' scores, counts,
/// positions, lengths), written again at the next one when nothing else holds them any more and
/// the shape is the same (no fresh pages per event; a policy or caller that keeps them gets
/// new ones next time).
struct EventPlanner {
  kvcrush::PlanWorkspace ws;
  std::array<nb::object, 4> inputs;
};

/// ``cached`` if only it holds that array, of ``shape``; else a new array (stored in cached).
/// With the GIL.
template <class T, size_t R>
T* reusable(nb::object& cached, const std::array<size_t, R>& shape) {
  if (cached.is_valid() && Py_REFCNT(cached.ptr()) == 1) {
    auto a = nb::cast<nb::ndarray<T, nb::ndim<R>, nb::c_contig, nb::device::cpu>>(cached);
    bool same = true;
    for (size_t i = 0; i < R; ++i) same = same && a.shape(i) == shape[i];
    if (same) return a.data();
  }
  auto fresh = new_array<T, R>(shape);
  T* data = fresh.data();
  cached = nb::cast(fresh);
  return data;
}

/// kvcrush::SelectFn of a Python callable ``select(scores, counts, positions, lengths,
/// block_size, num_keep) -> keep`` (the candidates as numpy arrays, EvictionInputs' fields;
/// keep: bool [L, H, N]). It takes the GIL for the call; ``select``, ``who`` and ``planner``
/// must outlive the SelectFn.
kvcrush::SelectFn python_select(nb::handle select, const std::string& who,
                                EventPlanner& planner) {
  return [select, &who, &planner](const kvcrush::Candidates& c, int64_t num_keep,
                                  uint8_t* keep) {
    nb::gil_scoped_acquire locked;
    const auto layers = static_cast<size_t>(c.num_layers);
    const auto heads = static_cast<size_t>(c.num_heads), n = static_cast<size_t>(c.n);
    const size_t size = layers * heads * n;
    auto& in = planner.inputs;
    std::copy_n(c.scores, size, reusable<float, 3>(in[0], {layers, heads, n}));
    std::copy_n(c.counts, size, reusable<float, 3>(in[1], {layers, heads, n}));
    std::copy_n(c.positions, size, reusable<int64_t, 3>(in[2], {layers, heads, n}));
    std::copy_n(c.lengths, layers * heads, reusable<int64_t, 2>(in[3], {layers, heads}));
    const nb::object got = select(in[0], in[1], in[2], in[3], c.block_size, num_keep);
    copy_keep(got, c.num_layers, c.num_heads, c.n, who, keep);
  };
}

PlanResult plan_with(EventPlanner& planner, nb::callable select, const std::string& who,
                     In<int64_t, 1> positions, std::optional<In<float, 1>> scores,
                     In<int64_t, 1> offsets, In<int64_t, 1> query_positions,
                     int64_t num_layers, int64_t num_heads, int64_t budget, int64_t start_size,
                     int64_t recent_size, int64_t num_written, int64_t block_size) {
  const kvcrush::SequenceRows rows =
      sequence_rows(positions, scores, offsets, query_positions, num_layers, num_heads);
  const kvcrush::EventBudget b{budget, start_size, recent_size, num_written, block_size};
  const kvcrush::SelectFn fn = python_select(select, who, planner);
  {
    nb::gil_scoped_release unlocked;  // python_select takes it back for the policy's call
    kvcrush::plan_event(fn, who, rows, b, planner.ws);
  }
  return plan_result(planner.ws.plan);
}

PlanResult plan_in(EventPlanner& planner, const kvcrush::PolicyConfig& cfg,
                   In<int64_t, 1> positions, std::optional<In<float, 1>> scores,
                   In<int64_t, 1> offsets, In<int64_t, 1> query_positions, int64_t num_layers,
                   int64_t num_heads, int64_t budget, int64_t start_size, int64_t recent_size,
                   int64_t num_written, int64_t block_size,
                   std::optional<In<bool, 3>> random_bits) {
  return plan_event_in(planner.ws, cfg, positions, scores, offsets, query_positions,
                       num_layers, num_heads, budget, start_size, recent_size, num_written,
                       block_size, random_bits);
}

void check_keep(nb::handle keep, In<int64_t, 2> lengths, int64_t n, int64_t num_keep,
                const std::string& who) {
  const auto layers = static_cast<int64_t>(lengths.shape(0));
  const auto heads = static_cast<int64_t>(lengths.shape(1));
  if (n < 0) bad_shape("n", "a size >= 0");
  std::vector<uint8_t> mask(static_cast<size_t>(layers * heads * n));
  copy_keep(keep, layers, heads, n, who, mask.data());
  const kvcrush::Candidates c{nullptr, nullptr, nullptr, lengths.data(), layers, heads, n, 1};
  kvcrush::check_keep(c, mask.data(), num_keep, who);
}

Out<int64_t> water_fill(int64_t total, In<int64_t, 1> capacity) {
  auto out = new_array<int64_t, 1>({capacity.shape(0)});
  kvcrush::water_fill(total, capacity.data(), static_cast<int64_t>(capacity.shape(0)),
                      out.data());
  return out;
}

Out<int64_t> fit_budget(In<int64_t, 2> target, In<int64_t, 2> capacity) {
  if (capacity.shape(0) != target.shape(0) || capacity.shape(1) != target.shape(1))
    bad_shape("capacity", "the shape of target");
  auto out = new_array<int64_t, 2>({target.shape(0), target.shape(1)});
  kvcrush::fit_budget(target.data(), capacity.data(), static_cast<int64_t>(target.shape(0)),
                      static_cast<int64_t>(target.shape(1)), out.data());
  return out;
}

Out<int64_t> pyramid_budgets(int64_t num_layers, int64_t num_keep, double beta) {
  auto out = new_array<int64_t, 1>({static_cast<size_t>(std::max<int64_t>(num_layers, 0))});
  kvcrush::pyramid_budgets(num_layers, num_keep, beta, out.data());
  return out;
}

Out<int64_t> pyramid_layer_budgets(In<int64_t, 2> lengths, int64_t num_keep, double beta) {
  auto out = new_array<int64_t, 2>({lengths.shape(0), lengths.shape(1)});
  kvcrush::pyramid_layer_budgets(lengths.data(), static_cast<int64_t>(lengths.shape(0)),
                                 static_cast<int64_t>(lengths.shape(1)), num_keep, beta,
                                 out.data());
  return out;
}

template <class W>
Out<int64_t> apportion(int64_t total, In<W, 1> weights, int64_t cap) {
  auto out = new_array<int64_t, 1>({weights.shape(0)});
  kvcrush::apportion(total, weights.data(), static_cast<int64_t>(weights.shape(0)), cap,
                     out.data());
  return out;
}

nb::object match_heads(In<int64_t, 3> positions, In<int64_t, 2> lengths) {
  const std::array<size_t, 3> shape{positions.shape(0), positions.shape(1), positions.shape(2)};
  if (lengths.shape(0) != shape[0] || lengths.shape(1) != shape[1])
    bad_shape("lengths", "shape [L, H] with positions [L, H, N]");
  auto idx = new_array<int64_t, 3>(shape);
  auto found = new_array<bool, 3>(shape);
  bool aligned;
  {
    nb::gil_scoped_release unlocked;
    aligned = kvcrush::match_heads(positions.data(), lengths.data(),
                                   static_cast<int64_t>(shape[0]),
                                   static_cast<int64_t>(shape[1]),
                                   static_cast<int64_t>(shape[2]), idx.data(),
                                   bytes(found.data()));
  }
  if (aligned) return nb::none();
  return nb::make_tuple(idx, found);
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

/// The new blocks' buffer compact_many reuses (a HeadModelRunner keeps one).
struct CacheCompactor {
  std::vector<uint8_t> scratch;
};

void compact_caches(CacheCompactor& self, std::vector<Cache> caches, std::vector<int64_t> heads,
                    std::vector<const kvcrush::BlockLayout*> layouts,
                    std::vector<In<int64_t, 1>> dst, std::vector<In<int64_t, 1>> offsets,
                    std::vector<In<int64_t, 2>> pairs, bool lossless_single_source) {
  const size_t n = caches.size();
  if (heads.size() != n || layouts.size() != n || dst.size() != n || offsets.size() != n ||
      pairs.size() != n)
    bad_shape("heads, layouts, dst, offsets, pairs", "one entry per cache");
  std::vector<kvcrush::CacheMoves> jobs(n);
  for (size_t j = 0; j < n; ++j) {
    const std::string job = "job " + std::to_string(j) + ": ";
    if (layouts[j] == nullptr) bad_shape(job + "layouts", "a BlockLayout");
    const auto hbb = static_cast<int64_t>(caches[j].shape(2));
    if (hbb != layouts[j]->head_block_bytes)
      bad_shape(job + "cache", "[NB, H, " + std::to_string(layouts[j]->head_block_bytes) +
                                   "] bytes");
    const auto nh = static_cast<int64_t>(caches[j].shape(1));
    if (heads[j] < 0 || heads[j] >= nh)
      throw std::out_of_range(job + "head " + std::to_string(heads[j]) + " outside 0.." +
                              std::to_string(nh - 1));
    const auto num_dst = static_cast<int64_t>(dst[j].shape(0));
    if (static_cast<int64_t>(offsets[j].shape(0)) != num_dst + 1)
      bad_shape(job + "offsets", "one entry more than dst");
    if (pairs[j].shape(1) != 2 ||
        static_cast<int64_t>(pairs[j].shape(0)) != offsets[j].data()[num_dst])
      bad_shape(job + "pairs", "shape [offsets[-1], 2]");
    jobs[j] = {caches[j].data() + heads[j] * hbb, static_cast<int64_t>(caches[j].shape(0)),
               nh * hbb, layouts[j], dst[j].data(), num_dst, offsets[j].data(), pairs[j].data()};
  }
  nb::gil_scoped_release unlocked;
  kvcrush::compact_many(jobs.data(), static_cast<int64_t>(n), lossless_single_source,
                        self.scratch);
}

/// A copy of ``v`` as a new numpy array (the workspace keeps its buffers for the next event).
Out<int64_t> copy_out(const std::vector<int64_t>& v) {
  auto out = new_array<int64_t, 1>({v.size()});
  std::copy(v.begin(), v.end(), out.data());
  return out;
}

nb::tuple plan_compaction(kvcrush::CompactionPlan& ws, In<int64_t, 1> blocks,
                          In<int64_t, 1> block_offsets, In<int64_t, 1> lens, In<int64_t, 1> rows,
                          In<int64_t, 1> row_offsets, std::optional<In<int64_t, 1>> positions,
                          int64_t num_heads, int64_t block_size, bool fill_holes) {
  const size_t tables = lens.shape(0);
  if (block_offsets.shape(0) != tables + 1) bad_shape("block_offsets", "len(lens) + 1 entries");
  if (row_offsets.shape(0) != tables + 1) bad_shape("row_offsets", "len(lens) + 1 entries");
  if (block_offsets.data()[tables] != static_cast<int64_t>(blocks.shape(0)))
    bad_shape("block_offsets", "offsets ending at len(blocks)");
  if (row_offsets.data()[tables] != static_cast<int64_t>(rows.shape(0)))
    bad_shape("row_offsets", "offsets ending at len(rows)");
  int64_t cached = 0;
  for (size_t r = 0; r < tables; ++r) cached += lens.data()[r];
  if (positions && static_cast<int64_t>(positions->shape(0)) != cached)
    bad_shape("positions", "None or sum(lens) entries");
  const kvcrush::TableRows t{blocks.data(), block_offsets.data(), lens.data(), rows.data(),
                             row_offsets.data(), positions ? positions->data() : nullptr,
                             static_cast<int64_t>(tables), num_heads, block_size};
  {
    nb::gil_scoped_release unlocked;
    kvcrush::plan_compaction(t, fill_holes, ws);
  }
  auto pairs = new_array<int64_t, 2>({ws.pairs.size() / 2, 2});
  std::copy(ws.pairs.begin(), ws.pairs.end(), pairs.data());
  return nb::make_tuple(copy_out(ws.order), copy_out(ws.positions), copy_out(ws.move_table),
                        copy_out(ws.move_slot), copy_out(ws.move_offsets), pairs);
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

Out<float> grouped_max_scores(In<float, 4> logits, In<int32_t, 1> first, int64_t group,
                              int64_t lead) {
  const size_t h = logits.shape(0), w = logits.shape(1), g = logits.shape(2),
               k = logits.shape(3);
  if (first.shape(0) != h) bad_shape("first", "[H], one entry per head of logits [H, W, G, K]");
  if (g == 0) bad_shape("logits", "[H, W, G >= 1, K]");
  auto out = new_array<float, 2>({h, k});
  {
    nb::gil_scoped_release release;
    kvcrush::grouped_max_scores(logits.data(), static_cast<int64_t>(h),
                                static_cast<int64_t>(w), static_cast<int64_t>(g),
                                static_cast<int64_t>(k), first.data(), group, lead, out.data());
  }
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

// ---- GenAI's eviction (kvcrush/upstream.hpp); wrapped by kvcrush_ov/eviction/upstream.py

template <class T>
Out<T> vector_array(const std::vector<T>& v) {
  auto out = new_array<T, 1>({v.size()});
  std::copy(v.begin(), v.end(), out.data());
  return out;
}

std::vector<Out<int64_t>> block_lists(const std::vector<std::vector<int64_t>>& blocks) {
  std::vector<Out<int64_t>> out;
  out.reserve(blocks.size());
  for (const auto& b : blocks) out.push_back(vector_array(b));
  return out;
}

/// scores.L of one forward: one f32 [T_l] array per layer, as pointers and lengths
struct LayerScores {
  std::vector<const float*> data;
  std::vector<int64_t> lengths;
  explicit LayerScores(const std::vector<In<float, 1>>& scores) {
    for (const auto& s : scores) {
      data.push_back(s.data());
      lengths.push_back(static_cast<int64_t>(s.shape(0)));
    }
  }
};

kvcrush::UpstreamConfig upstream_config(int64_t start_size, int64_t recent_size,
                                        int64_t max_cache_size, const std::string& aggregation,
                                        int64_t snapkv_window_size, int64_t block_size,
                                        int64_t kvcrush_budget, const std::string& anchor,
                                        uint32_t kvcrush_seed, int64_t max_pool_window_size) {
  kvcrush::UpstreamConfig c;
  c.start_size = start_size;
  c.recent_size = recent_size;
  c.max_cache_size = max_cache_size;
  c.aggregation = kvcrush::parse_aggregation(aggregation);
  c.snapkv_window_size = snapkv_window_size;
  c.block_size = block_size;
  c.kvcrush_budget = kvcrush_budget;
  c.kvcrush_anchor = kvcrush::parse_anchor(anchor);
  c.kvcrush_seed = kvcrush_seed;
  c.max_pool_window_size = max_pool_window_size;
  return c;
}

template <class T>
Out<T> upstream_max_pool(In<T, 1> x, int64_t window) {
  auto out = new_array<T, 1>({x.shape(0)});
  kvcrush::upstream_max_pool(x.data(), static_cast<int64_t>(x.shape(0)), window, out.data());
  return out;
}

Out<bool> upstream_select(const std::string& aggregation, int64_t pool_window,
                          int64_t kvcrush_budget, const std::string& anchor,
                          In<float, 3> scores, In<float, 3> counts, In<int64_t, 3> positions,
                          In<int64_t, 2> lengths, int64_t block_size, int64_t num_keep,
                          In<uint32_t, 1> seeds) {
  const auto c = candidates(scores, counts, positions, lengths, block_size);
  kvcrush::UpstreamPolicy p{kvcrush::parse_aggregation(aggregation), pool_window,
                            kvcrush_budget, kvcrush::parse_anchor(anchor)};
  const std::vector<uint8_t> shared = kvcrush::upstream_shared_layers(c);
  size_t groups = 0;
  for (uint8_t one : shared) groups += one ? 1 : static_cast<size_t>(c.num_heads);
  if (seeds.shape(0) != groups)
    bad_shape("seeds", "one per selection group (" + std::to_string(groups) + ")");
  auto out = new_array<bool, 3>({scores.shape(0), scores.shape(1), scores.shape(2)});
  {
    nb::gil_scoped_release unlocked;
    kvcrush::upstream_select(p, c, num_keep, seeds.data(), bytes(out.data()));
  }
  return out;
}

void bind_upstream(nb::module_& m) {
  using kvcrush::UpstreamCacheEviction;
  using kvcrush::UpstreamKVCrush;
  using kvcrush::UpstreamScoreState;
  nb::exception<kvcrush::UpstreamError>(m, "UpstreamError", PyExc_RuntimeError);
  m.def("upstream_window", &kvcrush::score_aggregation_window, nb::arg("prompt_len"),
        nb::arg("num_processed_tokens"), nb::arg("num_scheduled_tokens"),
        nb::arg("snapkv_window_size"), "GenAI's score_aggregation_window of one forward.");
  m.def("upstream_max_pool", &upstream_max_pool<float>, nb::arg("x").noconvert(),
        nb::arg("window"));
  m.def("upstream_max_pool", &upstream_max_pool<double>, nb::arg("x"), nb::arg("window"),
        "[T]: out[i] = max(x[i : i + window]) (forward-looking, truncated at the end).");
  m.def("lowest_blocks", [](In<double, 1> s, int64_t k) {
          return vector_array(
              kvcrush::lowest_blocks(s.data(), static_cast<int64_t>(s.shape(0)), k));
        }, nb::arg("block_scores"), nb::arg("num_blocks"),
        "int64 [k] ascending: the k smallest (score, index) pairs.");
  m.def("libstdcxx_sort_order", [](int64_t n, const std::function<bool(int64_t, int64_t)>& less) {
          return kvcrush::libstdcxx_sort(n, less);
        }, nb::arg("n"), nb::arg("less"),
        "list[int]: libstdc++'s std::sort of range(n) under less(i, j).");
  m.def("libstdcxx_partial_sort_top", [](In<double, 1> v, int64_t k) {
          auto out = new_array<bool, 1>({v.shape(0)});
          kvcrush::libstdcxx_partial_sort_top(v.data(), static_cast<int64_t>(v.shape(0)), k,
                                              bytes(out.data()));
          return out;
        }, nb::arg("values"), nb::arg("k"),
        "bool [n]: the top k of libstdc++'s partial_sort (its tie choice).");
  nb::class_<std::mt19937>(m, "MT19937", "std::mt19937.")
      .def(nb::init<uint32_t>(), nb::arg("seed") = 5489u)
      .def("next_u32", [](std::mt19937& g) { return static_cast<uint32_t>(g()); })
      .def("bit", [](std::mt19937& g) { return static_cast<int>(g() >> 31); },
           "libstdc++ (>= 11) uniform_int_distribution<int>(0, 1): the top bit of one draw.");
  nb::class_<UpstreamScoreState>(m, "UpstreamScoreState", "kvcrush::UpstreamScoreState.")
      .def("__init__",
           [](UpstreamScoreState* self, int64_t num_layers, int64_t block_size,
              const std::string& aggregation, int64_t ignore_first_n_blocks,
              int64_t snapkv_window_size, int64_t max_pool_window_size) {
             new (self) UpstreamScoreState(num_layers, block_size,
                                           kvcrush::parse_aggregation(aggregation),
                                           ignore_first_n_blocks, snapkv_window_size,
                                           max_pool_window_size);
           },
           nb::arg("num_layers"), nb::arg("block_size"), nb::arg("aggregation_mode"),
           nb::arg("ignore_first_n_blocks"), nb::arg("snapkv_window_size"),
           nb::arg("max_pool_window_size"))
      .def("update", [](UpstreamScoreState& s, const std::vector<In<float, 1>>& scores,
                        int64_t num_snapkv_scores) {
             const LayerScores ls(scores);
             nb::gil_scoped_release unlocked;
             s.update(ls.data, ls.lengths, num_snapkv_scores);
           }, nb::arg("layer_scores"), nb::arg("num_snapkv_scores"))
      .def("scores", [](const UpstreamScoreState& s, int64_t l) {
             return vector_array(s.scores(l));
           }, nb::arg("layer"))
      .def("counters", [](const UpstreamScoreState& s, int64_t l) {
             return vector_array(s.counters(l));
           }, nb::arg("layer"))
      .def("normalised", [](const UpstreamScoreState& s, int64_t l) {
             auto out = new_array<double, 1>({static_cast<size_t>(s.tracked_tokens(l))});
             s.normalised(l, out.data());
             return out;
           }, nb::arg("layer"))
      .def("tracked_tokens", &UpstreamScoreState::tracked_tokens, nb::arg("layer"))
      .def("remove_blocks", &UpstreamScoreState::remove_blocks, nb::arg("layer"),
           nb::arg("tracked_blocks"))
      .def("set_layer", [](UpstreamScoreState& s, int64_t l, In<double, 1> scores,
                           In<int64_t, 1> counters) {
             s.set_layer(l, std::vector<double>(scores.data(), scores.data() + scores.shape(0)),
                         std::vector<int64_t>(counters.data(),
                                              counters.data() + counters.shape(0)));
           }, nb::arg("layer"), nb::arg("scores"), nb::arg("counters"))
      .def_rw("num_registered_snapkv_scores", &UpstreamScoreState::num_registered_snapkv_scores)
      .def_prop_ro("num_layers", &UpstreamScoreState::num_layers);
  nb::class_<UpstreamKVCrush>(m, "UpstreamKVCrush", "kvcrush::UpstreamKVCrush.")
      .def("__init__",
           [](UpstreamKVCrush* self, int64_t budget, const std::string& anchor,
              int64_t block_size, uint32_t seed) {
             new (self) UpstreamKVCrush(budget, kvcrush::parse_anchor(anchor), block_size, seed);
           },
           nb::arg("budget"), nb::arg("anchor_mode"), nb::arg("block_size"), nb::arg("seed"))
      .def("applies", &UpstreamKVCrush::applies, nb::arg("num_evicted_blocks"))
      .def_static("indicators", [](In<double, 1> raw, int64_t num_tokens) {
             if (num_tokens < 0 || num_tokens > static_cast<int64_t>(raw.shape(0)))
               bad_shape("num_tokens", "0 .. len(raw_scores)");
             return vector_array(UpstreamKVCrush::indicators(raw.data(), num_tokens));
           }, nb::arg("raw_scores"), nb::arg("num_tokens"))
      .def("anchor", [](UpstreamKVCrush& k, In<uint8_t, 1> ind) {
             return vector_array(
                 k.anchor(std::vector<uint8_t>(ind.data(), ind.data() + ind.shape(0))));
           }, nb::arg("indicators"))
      .def("hamming", [](const UpstreamKVCrush& k, In<uint8_t, 1> ind, In<uint8_t, 1> a) {
             return vector_array(
                 k.hamming(std::vector<uint8_t>(ind.data(), ind.data() + ind.shape(0)),
                           std::vector<uint8_t>(a.data(), a.data() + a.shape(0))));
           }, nb::arg("indicators"), nb::arg("anchor"))
      .def("representatives", &UpstreamKVCrush::representatives, nb::arg("distances"),
           nb::arg("eligible"))
      .def("retain", [](UpstreamKVCrush& k, int64_t num_tokens,
                        const std::vector<int64_t>& evicted, In<double, 1> raw) {
             if (num_tokens < 0 || num_tokens > static_cast<int64_t>(raw.shape(0)))
               bad_shape("num_tokens", "0 .. len(raw_scores)");
             return k.retain(num_tokens, evicted, raw.data());
           }, nb::arg("num_tokens"), nb::arg("evicted"), nb::arg("raw_scores"))
      .def_prop_ro("rng", [](UpstreamKVCrush& k) -> std::mt19937& { return k.rng(); },
                   nb::rv_policy::reference_internal);
  nb::class_<UpstreamCacheEviction>(m, "UpstreamCacheEviction",
                                    "kvcrush::UpstreamCacheEviction: one sequence.")
      .def("__init__",
           [](UpstreamCacheEviction* self, int64_t start_size, int64_t recent_size,
              int64_t max_cache_size, const std::string& aggregation,
              int64_t snapkv_window_size, int64_t block_size, int64_t kvcrush_budget,
              const std::string& anchor, uint32_t kvcrush_seed, int64_t max_pool_window_size,
              int64_t num_layers) {
             new (self) UpstreamCacheEviction(
                 upstream_config(start_size, recent_size, max_cache_size, aggregation,
                                 snapkv_window_size, block_size, kvcrush_budget, anchor,
                                 kvcrush_seed, max_pool_window_size),
                 num_layers);
           },
           nb::kw_only(), nb::arg("start_size"), nb::arg("recent_size"),
           nb::arg("max_cache_size"), nb::arg("aggregation_mode"),
           nb::arg("snapkv_window_size"), nb::arg("block_size"), nb::arg("kvcrush_budget"),
           nb::arg("kvcrush_anchor"), nb::arg("kvcrush_seed"), nb::arg("max_pool_window_size"),
           nb::arg("num_layers"))
      .def("window", &UpstreamCacheEviction::window, nb::arg("prompt_len"),
           nb::arg("num_processed_tokens"), nb::arg("num_scheduled_tokens"))
      .def("update", [](UpstreamCacheEviction& a, const std::vector<In<float, 1>>& scores,
                        int64_t num_snapkv_scores) {
             const LayerScores ls(scores);
             nb::gil_scoped_release unlocked;
             a.update(ls.data, ls.lengths, num_snapkv_scores);
           }, nb::arg("layer_scores"), nb::arg("num_snapkv_scores"))
      .def("evictable_block_range", &UpstreamCacheEviction::evictable_block_range,
           nb::arg("layer"))
      .def("num_blocks_to_evict", &UpstreamCacheEviction::num_blocks_to_evict, nb::arg("layer"))
      .def("block_scores", [](const UpstreamCacheEviction& a, int64_t l) {
             return vector_array(a.block_scores(l));
           }, nb::arg("layer"))
      .def("evict", [](UpstreamCacheEviction& a) {
             std::vector<std::vector<int64_t>> blocks;
             {
               nb::gil_scoped_release unlocked;
               blocks = a.evict();
             }
             return block_lists(blocks);
           })
      .def("step", [](UpstreamCacheEviction& a, const std::vector<In<float, 1>>& scores,
                      int64_t prompt_len, int64_t num_processed_tokens,
                      int64_t num_scheduled_tokens) {
             const LayerScores ls(scores);
             std::vector<std::vector<int64_t>> blocks;
             {
               nb::gil_scoped_release unlocked;
               blocks = a.step(ls.data, ls.lengths, prompt_len, num_processed_tokens,
                               num_scheduled_tokens);
             }
             return block_lists(blocks);
           }, nb::arg("layer_scores"), nb::kw_only(), nb::arg("prompt_len"),
           nb::arg("num_processed_tokens"), nb::arg("num_scheduled_tokens"))
      .def_prop_ro("state", [](UpstreamCacheEviction& a) -> UpstreamScoreState& {
             return a.state();
           }, nb::rv_policy::reference_internal)
      .def_prop_ro("kvcrush", [](UpstreamCacheEviction& a) -> UpstreamKVCrush& {
             return a.kvcrush();
           }, nb::rv_policy::reference_internal)
      .def_rw("num_evicted_tokens", &UpstreamCacheEviction::num_evicted_tokens)
      .def_prop_ro("num_layers", &UpstreamCacheEviction::num_layers);
  m.def("upstream_select", &upstream_select, nb::arg("aggregation_mode"),
        nb::arg("pool_window"), nb::arg("kvcrush_budget"), nb::arg("kvcrush_anchor"),
        nb::arg("scores"), nb::arg("counts"), nb::arg("positions"), nb::arg("lengths"),
        nb::arg("block_size"), nb::arg("num_keep"), nb::arg("seeds"),
        "bool [L, H, N]: UpstreamEviction's keep mask (kvcrush::upstream_select).");
  m.def("upstream_shared_layers", [](In<int64_t, 3> positions, In<int64_t, 2> lengths) {
          if (lengths.shape(0) != positions.shape(0) || lengths.shape(1) != positions.shape(1))
            bad_shape("lengths", "shape [L, H] with positions [L, H, N]");
          const kvcrush::Candidates c{nullptr, nullptr, positions.data(), lengths.data(),
                                      static_cast<int64_t>(positions.shape(0)),
                                      static_cast<int64_t>(positions.shape(1)),
                                      static_cast<int64_t>(positions.shape(2)), 1};
          return vector_array(kvcrush::upstream_shared_layers(c));
        }, nb::arg("positions"), nb::arg("lengths"),
        "u8 [L]: 1 where every head of the layer holds head 0's candidates.");
}

std::string openvino_build() { return ov::get_openvino_version().buildNumber; }

std::string openvino_compiled_version() {
  return std::to_string(OPENVINO_VERSION_MAJOR) + "." + std::to_string(OPENVINO_VERSION_MINOR) +
         "." + std::to_string(OPENVINO_VERSION_PATCH);
}

/// parallel_for over [0, n) on its pool (tests/test_parallel.py): (sum of the indices, threads
/// that ran items); fail_at >= 0 throws std::runtime_error("item <fail_at>") there; nested runs
/// an inner loop of ``n`` items inside every item (sum then n * n(n-1)/2); meet: item 0 waits
/// (up to 10 s) until a second thread has run an item, so that a loop given two threads is
/// seen using them however late a worker wakes.
std::pair<int64_t, int64_t> parallel_check(int64_t n, int64_t work_per_item, int64_t fail_at,
                                           bool nested, bool meet) {
  std::atomic<int64_t> sum{0};
  std::mutex m;
  std::vector<std::thread::id> seen;
  auto threads_seen = [&] {
    std::lock_guard<std::mutex> lock(m);
    return seen.size();
  };
  kvcrush::parallel_for(n, work_per_item, [&](int64_t i) {
    {
      std::lock_guard<std::mutex> lock(m);
      if (std::find(seen.begin(), seen.end(), std::this_thread::get_id()) == seen.end())
        seen.push_back(std::this_thread::get_id());
    }
    if (i == fail_at) throw std::runtime_error("item " + std::to_string(i));
    if (nested)
      kvcrush::parallel_for(n, work_per_item, [&](int64_t j) { sum += j; });
    else
      sum += i;
    if (meet && i == 0) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (threads_seen() < 2 && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  });
  return {sum.load(), static_cast<int64_t>(threads_seen())};
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "kvcrush C++ kernels (eviction selection); see kvcrush_ov.eviction for the API";
  m.def("available_cores", &kvcrush::available_cores,
        "Cores the kernels may use (the process's CPU affinity).");
  m.def("parallel_check", &parallel_check, nb::arg("n"), nb::arg("work_per_item"),
        nb::arg("fail_at") = -1, nb::arg("nested") = false, nb::arg("meet") = false,
        "(sum of the indices, threads used) of one parallel loop (tests only).");
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
  nb::class_<CacheCompactor>(m, "CacheCompactor",
                             "compact_blocks over many caches in one parallel pass "
                             "(kvcrush::compact_many), its buffer kept between calls.")
      .def(nb::init<>())
      .def("compact", &compact_caches, nb::arg("caches"), nb::arg("heads"), nb::arg("layouts"),
           nb::arg("dst"), nb::arg("offsets"), nb::arg("pairs"),
           nb::arg("lossless_single_source"),
           "Rewrites the destination head-blocks of every cache u8 [NB, H, HB] in place.");
  nb::class_<kvcrush::CompactionPlan>(m, "CompactionWorkspace",
                                      "Buffers plan_compaction reuses from one event to the "
                                      "next (kvcrush::CompactionPlan).")
      .def(nb::init<>())
      .def("plan", &plan_compaction, nb::arg("blocks"), nb::arg("block_offsets"),
           nb::arg("lens"), nb::arg("rows"), nb::arg("row_offsets"),
           nb::arg("positions").none(), nb::arg("num_heads"), nb::arg("block_size"),
           nb::arg("fill_holes"),
           "(order [K], positions [K], move_table [M], move_slot [M], move_offsets [M + 1], "
           "pairs [P, 2]): one sequence's compaction (kvcrush::plan_compaction).");
  m.def("gather_rows", [](const std::vector<In<float, 1>>& tables, In<int64_t, 1> order,
                          In<int64_t, 1> offsets) {
    const auto r = static_cast<int64_t>(tables.size());
    if (static_cast<int64_t>(offsets.shape(0)) != r + 1)
      bad_shape("offsets", "len(tables) + 1 entries");
    const int64_t* off = offsets.data();
    if (off[0] != 0 || off[r] != static_cast<int64_t>(order.shape(0)))
      bad_shape("offsets", "0 .. len(order)");
    for (int64_t i = 0; i < r; ++i)
      if (off[i + 1] < off[i]) bad_shape("offsets", "non-decreasing");
    std::vector<const float*> src(static_cast<size_t>(r));
    std::vector<int64_t> have(static_cast<size_t>(r));
    for (int64_t i = 0; i < r; ++i) {
      src[static_cast<size_t>(i)] = tables[static_cast<size_t>(i)].data();
      have[static_cast<size_t>(i)] =
          static_cast<int64_t>(tables[static_cast<size_t>(i)].shape(0));
    }
    auto out = new_array<float, 1>({order.shape(0)});
    {
      nb::gil_scoped_release unlocked;
      kvcrush::gather_rows(src.data(), have.data(), order.data(), off, r, out.data());
    }
    return out;
  }, nb::arg("tables"), nb::arg("order"), nb::arg("offsets"),
        "f32 [K]: new row i of table r is tables[r][order[offsets[r] + i]], or 0 past its end "
        "(kvcrush::gather_rows).");
  m.def("fill_holes", [](In<int64_t, 1> keep) {
    const auto k = static_cast<int64_t>(keep.shape(0));
    for (int64_t i = 1; i < k; ++i)
      if (keep.data()[i] <= keep.data()[i - 1])
        bad_shape("keep", "sorted unique row indices");
    auto out = new_array<int64_t, 1>({keep.shape(0)});
    kvcrush::fill_holes(keep.data(), k, out.data());
    return out;
  }, nb::arg("keep"), "int64 [k]: the new row order after keeping sorted rows ``keep``.");
  m.def("encode_by_channel", &encode_by_channel, nb::arg("x"), nb::arg("counts"),
        nb::arg("layout"), "u8 [N, HB]: f32 rows [N, bs, D] as by-channel key head-blocks.");
  m.def("decode_by_channel", &decode_by_channel, nb::arg("blocks"), nb::arg("which"),
        nb::arg("rows"), nb::arg("layout"), "f32 [M, D]: rows of by-channel key head-blocks.");
  m.def("grouped_max_scores", &grouped_max_scores, nb::arg("logits"), nb::arg("first"),
        nb::arg("group"), nb::arg("lead"),
        "f32 [H, K]: each row's largest softmax sum over an aligned group of queries "
        "(kvcrush/replay_scores.hpp).");
  nb::class_<kvcrush::PolicyConfig>(m, "PolicyConfig",
                                    "An eviction policy (policy.hpp, kvcrush::PolicyConfig), "
                                    "validated at construction.")
      .def("__init__", &init_policy, nb::kw_only(), nb::arg("importance"),
           nb::arg("aggregation_mode") = "norm_sum", nb::arg("pooling") = "avg",
           nb::arg("kernel_size") = 31, nb::arg("offset") = 0, nb::arg("beta") = 20.0,
           nb::arg("alpha") = 0.2, nb::arg("scope") = "layer", nb::arg("kvcrush") = false,
           nb::arg("share") = 0.25,
           nb::arg("anchors") = std::vector<std::string>{"alternating"},
           nb::arg("granularity") = "token", nb::arg("dynamic_split") = false,
           nb::arg("taper").none() = nb::none(), nb::arg("bit_aggregation").none() = nb::none())
      .def_static("default", [] { return kvcrush::PolicyConfig{}; },
                  "kvcrush::PolicyConfig{}: the C++ defaults (CacheEvictionConfig()'s eviction).")
      .def("for_budget", &kvcrush::for_budget, nb::arg("total"), nb::arg("num_keep"),
           nb::arg("num_written"), "kvcrush::for_budget: the share of num_keep, taper off.")
      .def_prop_ro("share", [](const kvcrush::PolicyConfig& c) {
             return c.kvcrush ? std::optional<double>(c.kvcrush->share) : std::nullopt;
           }, "KVCrush's share (None without KVCrush).")
      .def("share_for", [](const kvcrush::PolicyConfig& c, int64_t total, int64_t num_written) {
             if (!c.kvcrush) bad_shape("cfg", "a policy with KVCrush");
             return kvcrush::tapered_share(*c.kvcrush, total, num_written);
           }, nb::arg("total"), nb::arg("num_written"), "KVCrush's tapered share of the total.")
      .def("share_for_budget",
           [](const kvcrush::PolicyConfig& c, int64_t total, int64_t num_keep,
              int64_t num_written) {
             if (!c.kvcrush) bad_shape("cfg", "a policy with KVCrush");
             return kvcrush::share_for_budget(*c.kvcrush, total, num_keep, num_written);
           }, nb::arg("total"), nb::arg("num_keep"), nb::arg("num_written"),
           "KVCrush's share of num_keep (KVCrush.for_budget).")
      .def("anchor_bits", [](const kvcrush::PolicyConfig& c, int64_t heads, int64_t block_size) {
             return kvcrush::anchor_bits(c, heads, block_size);
           }, nb::arg("num_heads"), nb::arg("block_size"), "D: bits of one random anchor.");
  m.def("select_keep", &select_keep, nb::arg("cfg"), nb::arg("scores"), nb::arg("counts"),
        nb::arg("positions"), nb::arg("lengths"), nb::arg("block_size"), nb::arg("num_keep"),
        nb::arg("random_bits").none() = nb::none(),
        "bool [L, H, N]: the keep mask of one eviction event (kvcrush::select_keep).");
  m.def("kvcrush_plan", &kvcrush_plan, nb::arg("cfg"), nb::arg("scores"), nb::arg("counts"),
        nb::arg("positions"), nb::arg("lengths"), nb::arg("block_size"), nb::arg("num_keep"),
        nb::arg("random_bits").none() = nb::none(),
        "(keep, importance, crush, crush_budget [L], bits): select_keep with its details.");
  m.def("policy_scores", &policy_scores, nb::arg("cfg"), nb::arg("scores"), nb::arg("counts"),
        nb::arg("positions"), nb::arg("lengths"), nb::arg("block_size"),
        nb::arg("aggregation").none() = nb::none(),
        "f32 [L, H, N]: what the importance policy ranks by (-inf in padding).");
  m.def("pool_scores", &pool_scores, nb::arg("values"), nb::arg("lengths"), nb::arg("pooling"),
        nb::arg("kernel_size"), nb::arg("offset"), "f32 [R, N]: rows pooled (-inf padding).");
  m.def("plan_event", &plan_event, nb::arg("cfg"), nb::arg("positions"),
        nb::arg("scores").none(), nb::arg("offsets"), nb::arg("query_positions"),
        nb::arg("num_layers"), nb::arg("num_heads"), nb::arg("budget"), nb::arg("start_size"),
        nb::arg("recent_size"), nb::arg("num_written"), nb::arg("block_size"),
        nb::arg("random_bits").none() = nb::none(),
        "(keep_rows, keep_offsets, num_sinks, num_recent, num_keep): one eviction event "
        "from the cached rows (kvcrush::plan_event).");
  nb::class_<EventPlanner>(m, "EventPlanner",
                          "plan_event with buffers kept from one event to the next "
                          "(kvcrush::PlanWorkspace, and the arrays a Python policy received).")
      .def(nb::init<>())
      .def("plan", &plan_in, nb::arg("cfg"), nb::arg("positions"),
           nb::arg("scores").none(), nb::arg("offsets"), nb::arg("query_positions"),
           nb::arg("num_layers"), nb::arg("num_heads"), nb::arg("budget"),
           nb::arg("start_size"), nb::arg("recent_size"), nb::arg("num_written"),
           nb::arg("block_size"), nb::arg("random_bits").none() = nb::none(),
           "plan_event's result, computed in this planner's buffers.")
      .def("plan_with", &plan_with, nb::arg("select"), nb::arg("who"), nb::arg("positions"),
           nb::arg("scores").none(), nb::arg("offsets"), nb::arg("query_positions"),
           nb::arg("num_layers"), nb::arg("num_heads"), nb::arg("budget"),
           nb::arg("start_size"), nb::arg("recent_size"), nb::arg("num_written"),
           nb::arg("block_size"),
           "plan's result with the selection of a Python callable select(scores, counts, "
           "positions, lengths, block_size, num_keep) -> bool [L, H, N] (the candidates as "
           "new arrays, EvictionInputs' fields), called once with the GIL; its answer is "
           "checked as check_keep does (PlanError naming who).");
  m.def("check_keep", &check_keep, nb::arg("keep"), nb::arg("lengths"), nb::arg("n"),
        nb::arg("num_keep"), nb::arg("who"),
        "PlanError unless keep is a valid keep mask: bool [L, H, n], nothing kept in padding "
        "(entries >= lengths [L, H]), exactly num_keep * L * H kept (kvcrush::check_keep).");
  m.def("water_fill", &water_fill, nb::arg("total"), nb::arg("capacity"));
  m.def("fit_budget", &fit_budget, nb::arg("target"), nb::arg("capacity"));
  m.def("pyramid_budgets", &pyramid_budgets, nb::arg("num_layers"), nb::arg("num_keep"),
        nb::arg("beta"));
  m.def("pyramid_layer_budgets", &pyramid_layer_budgets, nb::arg("lengths"),
        nb::arg("num_keep"), nb::arg("beta"));
  m.def("apportion", &apportion<float>, nb::arg("total"), nb::arg("weights").noconvert(),
        nb::arg("cap"));
  m.def("apportion", &apportion<double>, nb::arg("total"), nb::arg("weights"), nb::arg("cap"));
  m.def("match_heads", &match_heads, nb::arg("positions"), nb::arg("lengths"),
        "None when every head holds head 0's positions, else (idx, found) [L, H, N].");
  m.def("pick_representatives", &pick_representatives, nb::arg("vectors"), nb::arg("valid"),
        nb::arg("anchors"), nb::arg("k"), "bool [L, M]: KVCrush's representatives per layer.");
  bind_upstream(m);

  // ---- graph passes: ``model`` is an openvino.Model's _get_raw_address() (see model_at)
  {
    // kvcrush::PlanError: an AssertionError (as check_keep raised it in Python) and a
    // RuntimeError (as std::logic_error reached Python before)
    const nb::object bases = nb::make_tuple(nb::handle(PyExc_AssertionError),
                                            nb::handle(PyExc_RuntimeError));
    const nb::object plan_error = nb::steal(PyErr_NewExceptionWithDoc(
        "kvcrush_ov._core.PlanError",
        "An eviction event broke the contract (kvcrush::PlanError): an invalid keep mask, or "
        "heads that disagree on the sinks / recent window.", bases.ptr(), nullptr));
    if (!plan_error.is_valid()) throw nb::python_error();
    m.attr("PlanError") = plan_error;
    nb::register_exception_translator(
        [](const std::exception_ptr& p, void* type) {
          try {
            std::rethrow_exception(p);
          } catch (const kvcrush::PlanError& e) {
            PyErr_SetString(static_cast<PyObject*>(type), e.what());
          }
        },
        plan_error.ptr());
  }
  nb::exception<kvcrush::PerHeadPatternError>(m, "PerHeadPatternError", PyExc_RuntimeError);
  nb::exception<kvcrush::LogitsPatternError>(m, "LogitsPatternError", PyExc_RuntimeError);
  nb::exception<kvcrush::FastKVPatternError>(m, "FastKVPatternError", PyExc_ValueError);
  nb::exception<kvcrush::LESSPatternError>(m, "LESSPatternError", PyExc_RuntimeError);
  m.def("kv_cache_properties", [](const std::string& device, const std::string& precision) {
    ov::Core core;
    std::map<std::string, std::string> out;
    for (const auto& [key, value] : kvcrush::kv_cache_properties(core, device, precision))
      out[key] = value.as<std::string>();
    return out;
  }, nb::arg("device"), nb::arg("precision"),
        "{name: value}: OpenVINO compile properties of a KV-cache precision on device, with "
        "f32 inference where one_core_bf16 (kvcrush::kv_cache_properties).");
  m.def("one_core_bf16", [](const std::string& device) {
    ov::Core core;
    return kvcrush::one_core_bf16(core, device);
  }, nb::arg("device"),
        "Whether OpenVINO 2026.4 would die compiling for bf16 inference on device here: a CPU "
        "with BF16 in a process limited to one core (kvcrush::one_core_bf16).");
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
