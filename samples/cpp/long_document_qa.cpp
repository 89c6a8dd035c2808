// One long document, one question: full KV cache vs KVCrush at 25% of the prompt (the demo of
// `kvcrush-ov demo`, from C++). Prints each run's answer, KV cache held, TTFT and decode speed.
//
//   long_document_qa <MODEL_DIR> <DOCUMENT.txt> "<QUESTION>" [MAX_NEW_TOKENS]

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>

#include "kvcrush/pipeline.hpp"

int main(int argc, char* argv[]) try {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " <MODEL_DIR> <DOCUMENT.txt> \"<QUESTION>\" [MAX_NEW_TOKENS]\n";
    return EXIT_FAILURE;
  }
  std::ifstream file(argv[2]);
  if (!file) throw std::runtime_error(std::string("cannot read ") + argv[2]);
  std::stringstream document;
  document << file.rdbuf();
  const std::string prompt = document.str() + "\n\nQuestion: " + argv[3] + " Answer briefly.";
  kvcrush::GenerationConfig config;
  config.max_new_tokens = argc > 4 ? std::stoll(argv[4]) : 32;

  kvcrush::CacheEvictionConfig kvcrush_25;
  kvcrush_25.max_cache_size = 0.25;
  for (const auto& [label, eviction] :
       {std::pair{"full cache", std::optional<kvcrush::CacheEvictionConfig>{}},
        std::pair{"KVCrush 25%", std::optional{kvcrush_25}}}) {
    kvcrush::Pipeline pipe(argv[1], "CPU", {}, eviction);
    const kvcrush::GenerationResult r = pipe.generate(prompt, config);
    const size_t begin = r.text.find_first_not_of(" \n");  // the answer without leading blanks
    std::printf("%-12s %5lld prompt tokens  KV held %6.2f MiB  TTFT %5.2f s  %5.1f tokens/s\n  %s\n",
                label, static_cast<long long>(r.num_input_tokens), r.kv_bytes / 1048576.0,
                r.ttft_s, r.decode_tokens_per_s(),
                begin == std::string::npos ? "" : r.text.c_str() + begin);
  }
} catch (const std::exception& e) {
  std::cerr << e.what() << '\n';
  return EXIT_FAILURE;
}
