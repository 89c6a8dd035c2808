// Runs one greedy request with the default CacheEvictionConfig (log on) and prints what
// tests/test_cpp_samples.py compares with the Python Pipeline's: the generated ids on one line,
// then per eviction "num_written budget" and one line of kept positions per (layer, head).
//
//   kvcrush_eviction_log <MODEL_DIR> <PROMPT_FILE> <MAX_NEW_TOKENS>

#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "kvcrush/pipeline.hpp"

int main(int argc, char* argv[]) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " <MODEL_DIR> <PROMPT_FILE> <MAX_NEW_TOKENS>\n";
    return 1;
  }
  std::ifstream file(argv[2]);
  std::stringstream prompt;
  prompt << file.rdbuf();
  kvcrush::CacheEvictionConfig eviction;
  eviction.log = true;
  kvcrush::Pipeline pipe(argv[1], "CPU", {}, eviction);
  kvcrush::GenerationConfig config;
  config.max_new_tokens = std::stoll(argv[3]);
  config.ignore_eos = true;
  const kvcrush::GenerationResult r = pipe.generate(prompt.str(), config);
  for (int64_t id : r.token_ids) std::cout << id << ' ';
  std::cout << '\n';
  for (const auto& e : r.eviction_log) {
    std::cout << e.num_written << ' ' << e.budget << '\n';
    for (const auto& layer : e.kept)
      for (const auto& kept : layer) {
        for (int64_t p : kept) std::cout << p << ' ';
        std::cout << '\n';
      }
  }
}
