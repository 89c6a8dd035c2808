// kvcrush_ov._core: the C++ kernels of kvcrush (cpp/include/kvcrush) for Python, on numpy
// arrays. The Python wrappers with shapes and docstrings are in kvcrush_ov/eviction/.
// Every kernel runs without the GIL. Invalid arguments raise ValueError naming the field.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "kvcrush/parallel.hpp"
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
  m.def("pick_representatives", &pick_representatives, nb::arg("vectors"), nb::arg("valid"),
        nb::arg("anchors"), nb::arg("k"), "bool [L, M]: KVCrush's representatives per layer.");
}
