// Runs one greedy request (ignore_eos) with the default CacheEvictionConfig but the given sink
// and recent window sizes, importance and mode (log on) and prints what tests/test_cpp_samples.py compares with the
// Python Pipeline's: the generated ids on one line, then per eviction "num_written budget" and
// one line of kept positions per (layer, head).
//
//   kvcrush_eviction_log <MODEL_DIR> <PROMPT_FILE> <MAX_NEW_TOKENS> <START_SIZE> <RECENT_SIZE>
//                        [IMPORTANCE] [MODE]

#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "kvcrush/pipeline.hpp"

int main(int argc, char* argv[]) {
  if (argc < 6) {
    std::cerr << "usage: " << argv[0]
              << " <MODEL_DIR> <PROMPT_FILE> <MAX_NEW_TOKENS> <START_SIZE> <RECENT_SIZE>\n";
    return 1;
  }
  std::ifstream file(argv[2]);
  std::stringstream prompt;
  prompt << file.rdbuf();
  kvcrush::CacheEvictionConfig eviction;
  eviction.start_size = std::stoll(argv[4]);
  eviction.recent_size = std::stoll(argv[5]);
  if (argc > 6) eviction.importance = argv[6];
  if (argc > 7) eviction.mode = argv[7];
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
