// KVzip's replay scores by groups of queries (kvcrush_ov/engine/query_scores.py): from a step's
// attention logits, each cached row's largest attention summed over an aligned group of queries.
#pragma once

#include <cstdint>

namespace kvcrush {

/// One layer's logits of a replay step: ``logits`` f32 [H, W, G, K] (row-major; ``H`` KV
/// heads, ``W`` scored queries in step order, ``G`` query heads per KV head, ``K`` key rows).
/// Query ``t`` of head ``h`` sees the rows ``0 .. first[h] + t`` (clipped to ``[0, K - 1]``).
/// Its softmax over those rows, summed over the ``G`` query heads, is summed over the queries
/// of its group (query ``t`` is in group ``(lead + t) / group``), and ``out`` f32 [H, K] gets
/// each row's largest group sum (0 for rows no query sees). ``group >= 1``, ``0 <= lead <
/// group``. Parallel over (head, group), then over (head, rows).
void grouped_max_scores(const float* logits, int64_t heads, int64_t queries, int64_t qheads,
                        int64_t keys, const int32_t* first, int64_t group, int64_t lead,
                        float* out);

}  // namespace kvcrush
