// The paged-attention model and its KV cache tensors (Python: kvcrush_ov.engine.model_runner):
// one request at a time, one block table, logits only for the token that samples.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <openvino/runtime/core.hpp>
#include <openvino/runtime/infer_request.hpp>
#include <openvino/runtime/tensor.hpp>

#include "input_tensors.hpp"

namespace kvcrush {

/// Writes one sequence's step into ``req`` of a plain paged graph: ``count`` tokens ``ids`` at
/// positions ``start..`` over block table ``blocks``, the last token's logits gathered (shared by
/// PagedRunner and HeadRunner's plain prefill).
void put_paged_step(InputTensors& inputs, ov::InferRequest& req, const int64_t* ids,
                    int64_t count, int64_t start, const std::vector<int32_t>& blocks);

class PagedRunner {
 public:
  PagedRunner(ov::Core& core, const std::filesystem::path& model_dir, const std::string& device,
              const std::string& precision);

  /// Cache tensors for at least ``num_blocks`` blocks (existing contents are kept).
  void reserve(int64_t num_blocks);
  /// Runs ``ids`` at positions ``start..`` of the sequence whose block table is ``blocks``
  /// (covering start + ids.size() tokens); returns the logits of the last token [vocab].
  const float* run(const int64_t* ids, int64_t count, int64_t start,
                   const std::vector<int32_t>& blocks);

  int64_t block_size() const { return block_size_; }
  int64_t block_bytes() const { return block_bytes_; }
  int64_t vocab_size() const { return vocab_; }
  double infer_s() const { return infer_s_; }

 private:
  ov::CompiledModel compiled_;
  ov::InferRequest request_;
  int64_t num_layers_ = 0, block_size_ = 0, block_bytes_ = 0, vocab_ = 0, num_blocks_ = 0;
  ov::element::Type key_type_, value_type_;
  ov::Shape key_shape_, value_shape_;  // one block: [kv_heads, rows, cols]
  std::vector<ov::Tensor> keys_, values_;
  InputTensors inputs_;
  double infer_s_ = 0.0;
};

}  // namespace kvcrush
