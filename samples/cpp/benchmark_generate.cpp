// Timing of one prompt in a warm process (like OpenVINO GenAI's benchmark_genai): WARMUP
// untimed runs, then ITERS timed ones, greedy, with KVCrush eviction (the default
// CacheEvictionConfig; "plain": with plain_prefill) or the full cache. Prints every timed run
// and the medians.
//
//   benchmark_generate <MODEL_DIR> "<PROMPT>" [MAX_NEW_TOKENS] [full|eviction|plain] [WARMUP] [ITERS]

#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "kvcrush/pipeline.hpp"

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2.0;
}

long long count_arg(int argc, char* argv[], int i, long long fallback, long long least,
                    const char* name) {
  if (argc <= i) return fallback;
  size_t used = 0;
  long long n = least - 1;
  try {
    n = std::stoll(argv[i], &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != std::string(argv[i]).size() || n < least)
    throw std::invalid_argument(std::string(name) + "=" + argv[i] + ": allowed an integer >= " +
                                std::to_string(least));
  return n;
}

}  // namespace

int main(int argc, char* argv[]) try {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0]
              << " <MODEL_DIR> \"<PROMPT>\" [MAX_NEW_TOKENS] [full|eviction|plain] [WARMUP]"
                 " [ITERS]\n";
    return EXIT_FAILURE;
  }
  const std::string mode = argc > 4 ? argv[4] : "eviction";
  if (mode != "full" && mode != "eviction" && mode != "plain")
    throw std::invalid_argument("mode=" + mode + ": allowed full, eviction, plain");
  std::optional<kvcrush::CacheEvictionConfig> eviction = kvcrush::CacheEvictionConfig{};
  if (mode == "full") eviction.reset();
  if (mode == "plain") eviction->plain_prefill = true;
  kvcrush::GenerationConfig config;
  config.max_new_tokens = count_arg(argc, argv, 3, 64, 1, "MAX_NEW_TOKENS");
  const long long warmup = count_arg(argc, argv, 5, 1, 0, "WARMUP");
  const long long iters = count_arg(argc, argv, 6, 3, 1, "ITERS");

  kvcrush::Pipeline pipe(argv[1], "CPU", {}, eviction);
  for (long long i = 0; i < warmup; ++i) pipe.generate(argv[2], config);
  std::vector<double> ttft, tps;
  std::string text;
  int64_t plain_chunks = 0;
  for (long long i = 0; i < iters; ++i) {
    const kvcrush::GenerationResult r = pipe.generate(argv[2], config);
    ttft.push_back(r.ttft_s);
    tps.push_back(r.decode_tokens_per_s());
    text = r.text;
    plain_chunks = r.plain_prefill_chunks;
    std::cout << "run " << i + 1 << ": TTFT " << r.ttft_s << " s, decode "
              << r.decode_tokens_per_s() << " tokens/s\n";
  }
  std::cout << text << "\n--\n"
            << "median of " << iters << " after " << warmup << " warm-up: TTFT " << median(ttft)
            << " s, decode " << median(tps) << " tokens/s; " << plain_chunks
            << " prompt chunks on the plain graph\n";
} catch (const std::exception& e) {
  std::cerr << e.what() << '\n';
  return EXIT_FAILURE;
}
