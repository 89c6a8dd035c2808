// kvcrush::Pipeline: greedy text generation on an OpenVINO model with a paged KV cache, the
// C++ counterpart of kvcrush_ov.Pipeline (backend "native"); the same model, prompt and
// configuration give the same greedy tokens.
//
//   kvcrush::Pipeline pipe(model_dir);  // default eviction: CacheEvictionConfig{}
//   kvcrush::GenerationResult r = pipe.generate("Summarise: ...", {/*max_new_tokens=*/64});
//   std::cout << r.text << r.ttft_s << r.decode_tokens_per_s() << r.kv_bytes;
//
// model_dir is an exported model folder (openvino_model.xml, openvino_tokenizer.xml,
// openvino_detokenizer.xml, config.json), e.g. one `kvcrush-ov models fetch` wrote. Prompts are
// tokenized as they are (no chat template: Python's generate(..., apply_chat_template=False)).
// Tokenization runs the openvino_tokenizers extension library: $KVCRUSH_TOKENIZERS_LIB if set,
// else the library found next to the openvino_tokenizers Python package when kvcrush was
// configured, else libopenvino_tokenizers.so on the loader's search path.
//
// Errors: ConfigError (config.hpp) for an invalid configuration or request, std::runtime_error
// for a model folder that cannot be loaded.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvcrush/config.hpp"

namespace kvcrush {

/// One eviction of a request (Python: engine.evictor.EvictionRecord): after ``num_written``
/// positions, ``kept[l][h]`` (sorted) stayed in layer l, KV head h; ``budget`` per head.
struct EvictionRecord {
  int64_t num_written = 0;
  int64_t budget = 0;
  std::vector<std::vector<std::vector<int64_t>>> kept;
};

/// One request's output and measurements (Python: DecodedResults + RequestMetrics).
struct GenerationResult {
  std::string text;                ///< the generated text, EOS excluded
  std::vector<int64_t> token_ids;  ///< the generated ids, EOS excluded
  std::string finish_reason;       ///< "stop" (EOS) or "length" (max_new_tokens)
  int64_t num_input_tokens = 0;
  int64_t num_generated_tokens = 0;  ///< EOS included: it was generated
  double ttft_s = 0.0;               ///< from the start of the request to its first token
  double tpot_s = 0.0;               ///< mean time per output token after the first
  int64_t kv_bytes = 0;              ///< KV cache bytes the request holds at the end
  int64_t full_kv_bytes = 0;         ///< what a full cache of the same tokens would hold
  int64_t peak_kv_bytes = 0;         ///< the most it held at any step
  int64_t num_evictions = 0;
  int64_t kv_budget_tokens = 0;  ///< tokens per layer and head after an eviction (0: none)
  int64_t kvcrush_tokens = 0;    ///< of them KVCrush representatives, at the last eviction
  int64_t plain_prefill_chunks = 0;  ///< prompt chunks run on the plain graph (plain_prefill)
  std::vector<EvictionRecord> eviction_log;  ///< with CacheEvictionConfig::log
  /// Decode speed: tokens per second after the first token (0 with one token).
  double decode_tokens_per_s() const { return tpot_s > 0 ? 1.0 / tpot_s : 0.0; }
};

class Pipeline {
 public:
  /// eviction: which tokens to keep; std::nullopt keeps the full cache.
  explicit Pipeline(const std::filesystem::path& model_dir, const std::string& device = "CPU",
                    KVCacheConfig kv_cache = {},
                    std::optional<CacheEvictionConfig> eviction = CacheEvictionConfig{},
                    SchedulerConfig scheduler = {});
  ~Pipeline();
  Pipeline(Pipeline&&) noexcept;
  Pipeline& operator=(Pipeline&&) noexcept;
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  /// Greedy continuation of ``prompt`` (tokenized as it is).
  GenerationResult generate(const std::string& prompt, GenerationConfig config = {});
  /// Greedy continuation of already tokenized ``prompt_ids``.
  GenerationResult generate(const std::vector<int64_t>& prompt_ids, GenerationConfig config = {});

  std::vector<int64_t> encode(const std::string& text);
  std::string decode(const std::vector<int64_t>& ids);

  /// Bytes of one KV block (block_size tokens, every layer and KV head, keys and values).
  int64_t block_bytes() const;
  int64_t block_size() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvcrush
