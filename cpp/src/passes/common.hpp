// Helpers shared by the pass sources (not part of the public API).
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
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

inline bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

/// The whole integer after ``prefix`` in ``name`` ("key_cache.12" -> 12); nothing when ``name``
/// does not start with ``prefix`` or the rest is not an integer ("key_cache.x", "scores.1a").
inline std::optional<int64_t> index_after(const std::string& name, const std::string& prefix) {
  if (!starts_with(name, prefix)) return std::nullopt;
  const std::string digits = name.substr(prefix.size());
  size_t used = 0;
  try {
    const int64_t index = std::stoll(digits, &used);
    if (used == digits.size()) return index;
  } catch (const std::exception&) {
  }
  return std::nullopt;
}

inline bool is_type(const ov::Node& node, const char* type) {
  return std::string(node.get_type_name()) == type;
}

}  // namespace kvcrush::detail
