// The model's OpenVINO tokenizer and detokenizer (openvino_tokenizer.xml /
// openvino_detokenizer.xml), run through the openvino_tokenizers extension library.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <openvino/runtime/compiled_model.hpp>
#include <openvino/runtime/core.hpp>
#include <openvino/runtime/infer_request.hpp>

namespace kvcrush {

/// The extension library to load: $KVCRUSH_TOKENIZERS_LIB, else the path CMake found at
/// configure time (KVCRUSH_TOKENIZERS_LIB_DEFAULT), else the bare library name.
std::string tokenizers_library();

class Tokenizer {
 public:
  /// Loads the extension into ``core`` and compiles both models on the CPU.
  Tokenizer(ov::Core& core, const std::filesystem::path& model_dir);
  /// Token ids of ``text``, special tokens added as the tokenizer model adds them.
  std::vector<int64_t> encode(const std::string& text);
  std::string decode(const std::vector<int64_t>& ids);
  int64_t eos_token_id() const { return eos_; }

 private:
  ov::InferRequest tokenizer_, detokenizer_;
  int64_t eos_ = -1;
};

}  // namespace kvcrush
