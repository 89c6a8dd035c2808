#include "kvcrush/replay_scores.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvcrush/fast_exp.hpp"
#include "kvcrush/parallel.hpp"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && defined(__linux__)
#define KVCRUSH_HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KVCRUSH_HOT
#endif

namespace kvcrush {

namespace {

/// acc[0 .. n) += softmax(row[0 .. n)) * 1 (the row's probabilities); ``e`` scratch [n].
KVCRUSH_HOT void add_softmax(const float* row, int64_t n, float* e, float* acc) {
  float top = row[0];
  for (int64_t j = 1; j < n; ++j) top = std::max(top, row[j]);
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    e[j] = exp_nonpositive(row[j] - top);
    sum += e[j];
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < n; ++j) acc[j] += e[j] * inv;
}

KVCRUSH_HOT void max_into(const float* x, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = std::max(out[j], x[j]);
}

}  // namespace

void grouped_max_scores(const float* logits, int64_t heads, int64_t queries, int64_t qheads,
                        int64_t keys, const int32_t* first, int64_t group, int64_t lead,
                        float* out) {
  if (group < 1) throw std::invalid_argument("group: allowed an integer >= 1");
  if (lead < 0 || lead >= group)
    throw std::invalid_argument("lead: allowed 0.." + std::to_string(group - 1));
  if (heads < 0 || queries < 0 || qheads < 1 || keys < 0)
    throw std::invalid_argument("logits: allowed a non-empty [H, W, G, K] array");
  std::fill(out, out + heads * keys, 0.0f);
  if (queries == 0 || keys == 0 || heads == 0) return;
  const int64_t groups = (lead + queries + group - 1) / group;
  std::vector<float> sums(static_cast<size_t>(heads * groups * keys), 0.0f);
  parallel_for(heads * groups, group * qheads * keys, [&](int64_t task) {
    const int64_t h = task / groups, gi = task % groups;
    float* acc = sums.data() + task * keys;
    thread_local std::vector<float> scratch;
    if (static_cast<int64_t>(scratch.size()) < keys) scratch.resize(static_cast<size_t>(keys));
    const int64_t t0 = std::max<int64_t>(0, gi * group - lead);
    const int64_t t1 = std::min<int64_t>(queries, (gi + 1) * group - lead);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t seen = std::clamp<int64_t>(int64_t{first[h]} + t, 0, keys - 1) + 1;
      for (int64_t g = 0; g < qheads; ++g)
        add_softmax(logits + ((h * queries + t) * qheads + g) * keys, seen, scratch.data(),
                    acc);
    }
  });
  constexpr int64_t kCols = 1024;
  const int64_t col_blocks = (keys + kCols - 1) / kCols;
  parallel_for(heads * col_blocks, groups * kCols, [&](int64_t task) {
    const int64_t h = task / col_blocks, c0 = (task % col_blocks) * kCols;
    const int64_t n = std::min(kCols, keys - c0);
    for (int64_t gi = 0; gi < groups; ++gi)
      max_into(sums.data() + (h * groups + gi) * keys + c0, n, out + h * keys + c0);
  });
}

}  // namespace kvcrush
