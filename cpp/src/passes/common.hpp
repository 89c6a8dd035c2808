// Helpers shared by the pass sources (not part of the public API).
#pragma once

#include <algorithm>
#include <sstream>
#include <string>
#include <unordered_set>
#include <vector>

#include <openvino/core/node.hpp>
#include <openvino/core/partial_shape.hpp>

namespace kvcrush::detail {

/// Python's repr of a list of strings: ['a', 'b'] (the messages match the former Python code).
inline std::string py_list(std::vector<std::string> items, bool sort) {
  if (sort) std::sort(items.begin(), items.end());
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) {
    if (i) out += ", ";
    out += "'" + items[i] + "'";
  }
  return out + "]";
}

inline std::vector<std::string> names_of(const std::unordered_set<std::string>& names) {
  return {names.begin(), names.end()};
}

inline std::string to_string(const ov::PartialShape& shape) {
  std::ostringstream s;
  s << shape;
  return s.str();
}

inline bool is_type(const ov::Node& node, const char* type) {
  return std::string(node.get_type_name()) == type;
}

}  // namespace kvcrush::detail
