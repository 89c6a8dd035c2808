#include "tokenizer.hpp"

#include <cstdlib>
#include <stdexcept>

#include <openvino/runtime/tensor.hpp>

namespace kvcrush {

std::string tokenizers_library() {
  if (const char* env = std::getenv("KVCRUSH_TOKENIZERS_LIB"); env && *env) return env;
#ifdef KVCRUSH_TOKENIZERS_LIB_DEFAULT
  if (std::filesystem::exists(KVCRUSH_TOKENIZERS_LIB_DEFAULT)) return KVCRUSH_TOKENIZERS_LIB_DEFAULT;
#endif
  return "libopenvino_tokenizers.so";
}

Tokenizer::Tokenizer(ov::Core& core, const std::filesystem::path& model_dir) {
  const std::string lib = tokenizers_library();
  try {
    core.add_extension(lib);
  } catch (const std::exception& e) {
    throw std::runtime_error("the openvino_tokenizers extension " + lib +
                             " does not load (set KVCRUSH_TOKENIZERS_LIB to "
                             "libopenvino_tokenizers.so of the openvino-tokenizers wheel): " +
                             e.what());
  }
  for (const char* name : {"openvino_tokenizer.xml", "openvino_detokenizer.xml"})
    if (!std::filesystem::exists(model_dir / name))
      throw std::runtime_error("model=" + model_dir.string() + " has no " + name);
  auto tok = core.read_model((model_dir / "openvino_tokenizer.xml").string());
  auto& info = tok->get_rt_info();
  if (auto it = info.find("eos_token_id"); it != info.end())
    eos_ = std::stoll(it->second.as<std::string>());
  tokenizer_ = core.compile_model(tok, "CPU").create_infer_request();
  detokenizer_ = core.compile_model((model_dir / "openvino_detokenizer.xml").string(), "CPU")
                     .create_infer_request();
}

std::vector<int64_t> Tokenizer::encode(const std::string& text) {
  ov::Tensor in(ov::element::string, ov::Shape{1});
  in.data<std::string>()[0] = text;
  tokenizer_.set_input_tensor(in);
  tokenizer_.infer();
  const ov::Tensor ids = tokenizer_.get_tensor("input_ids");
  const auto* p = ids.data<const int64_t>();
  return std::vector<int64_t>(p, p + ids.get_size());
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) {
  if (ids.empty()) return "";
  ov::Tensor in(ov::element::i64, ov::Shape{1, ids.size()});
  std::copy(ids.begin(), ids.end(), in.data<int64_t>());
  detokenizer_.set_input_tensor(in);
  detokenizer_.infer();
  return detokenizer_.get_output_tensor().data<const std::string>()[0];
}

}  // namespace kvcrush
