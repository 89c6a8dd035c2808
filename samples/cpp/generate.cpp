// One prompt, greedy, with KVCrush eviction (the default CacheEvictionConfig: 25% of the
// prompt, SnapKV + KVCrush). Prints the answer, TTFT, decode speed and the KV cache held.
//
//   generate <MODEL_DIR> "<PROMPT>" [MAX_NEW_TOKENS] [full]     ("full": keep the full cache)

#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>

#include "kvcrush/pipeline.hpp"

int main(int argc, char* argv[]) try {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " <MODEL_DIR> \"<PROMPT>\" [MAX_NEW_TOKENS] [full]\n";
    return EXIT_FAILURE;
  }
  std::optional<kvcrush::CacheEvictionConfig> eviction = kvcrush::CacheEvictionConfig{};
  if (argc > 4 && std::string(argv[4]) == "full") eviction.reset();
  kvcrush::Pipeline pipe(argv[1], "CPU", {}, eviction);

  kvcrush::GenerationConfig config;
  config.max_new_tokens = argc > 3 ? std::stoll(argv[3]) : 64;
  kvcrush::GenerationResult r = pipe.generate(argv[2], config);

  std::cout << r.text << "\n--\n"
            << r.num_input_tokens << " prompt tokens, " << r.num_generated_tokens
            << " generated. TTFT " << r.ttft_s << " s, decode " << r.decode_tokens_per_s()
            << " tokens/s. KV cache held " << r.kv_bytes / 1024 << " KiB of "
            << r.full_kv_bytes / 1024 << " KiB full (" << r.num_evictions << " evictions)\n";
} catch (const std::exception& e) {
  std::cerr << e.what() << '\n';
  return EXIT_FAILURE;
}
