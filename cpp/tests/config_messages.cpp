// Prints the ConfigError message of each invalid configuration below, one per line, in order;
// with a model folder argument (and the pipeline built) also those of invalid pipeline
// configurations and requests. tests/test_cpp_samples.py builds the same configurations in
// Python (kvcrush_ov.config, kvcrush_ov.Pipeline) and checks that every message is the same.

#include <functional>
#include <iostream>
#include <vector>

#include "kvcrush/config.hpp"
#ifdef KVCRUSH_WITH_PIPELINE
#include "kvcrush/pipeline.hpp"
#endif

using namespace kvcrush;

int main(int argc, char* argv[]) {
  auto eviction = [](std::function<void(CacheEvictionConfig&)> set) {
    return [set] {
      CacheEvictionConfig c;
      set(c);
      c.validate();
    };
  };
  auto crush = [](std::function<void(KVCrushConfig&)> set) {
    return [set] {
      KVCrushConfig c;
      set(c);
      c.validate();
    };
  };
  std::vector<std::function<void()>> cases = {
      eviction([](auto& c) { c.max_cache_size = int64_t{0}; }),
      eviction([](auto& c) { c.max_cache_size = 1.5; }),
      eviction([](auto& c) { c.max_cache_size = int64_t{100}; }),
      eviction([](auto& c) { c.start_size = -1; }),
      eviction([](auto& c) { c.importance = "magic"; }),
      eviction([](auto& c) { c.aggregation_mode = "mean"; }),
      eviction([](auto& c) { c.mode = "sometimes"; }),
      eviction([](auto& c) { c.evict_interval = 0; }),
      eviction([](auto& c) { c.kernel_size = 4; }),
      eviction([](auto& c) { c.pooling_offset = 16; }),
      eviction([](auto& c) { c.decode_window_size = 33; }),
      eviction([](auto& c) { c.pooling = std::string("median"); }),
      eviction([](auto& c) { c.recent_size = -1; }),
      eviction([](auto& c) {
        c.importance = "upstream";
        c.plain_prefill = true;
      }),
      eviction([](auto& c) {  // kvzip's own recent window (32) in the minimum
        c.importance = "kvzip";
        c.max_cache_size = int64_t{40};
      }),
      crush([](auto& c) { c.budget = 1.25; }),
      crush([](auto& c) { c.budget = 1e-7 - 1; }),
      crush([](auto& c) { c.anchor_point_mode = "it's"; }),
      crush([](auto& c) { c.granularity = "page"; }),
      [] { KVCacheConfig c; c.precision = "u9"; c.validate(); },
      [] { KVCacheConfig c; c.cache_size = -0.5; c.validate(); },
      [] { SchedulerConfig c; c.max_num_batched_tokens = 0; c.validate(); },
      [] { GenerationConfig c; c.max_new_tokens = 0; c.validate(); },
  };
#ifdef KVCRUSH_WITH_PIPELINE
  if (argc > 1) {
    const std::string model = argv[1];
    auto cache = [model](KVCacheConfig kv) {
      return [model, kv] { Pipeline(model, "CPU", kv, std::nullopt); };
    };
    KVCacheConfig blocks, bytes;
    blocks.num_kv_blocks = 3;
    bytes.cache_size = 0.0001;
    cases.push_back(cache(blocks));
    cases.push_back(cache(bytes));
    cases.push_back([model] {
      Pipeline pipe(model, "CPU", {}, std::nullopt);
      GenerationConfig g;
      g.max_new_tokens = 8192;
      pipe.generate("hi", g);
    });
  }
#else
  (void)argc;
  (void)argv;
#endif
  for (const auto& run : cases) {
    try {
      run();
      std::cout << "(valid)\n";
    } catch (const ConfigError& e) {
      std::cout << e.what() << '\n';
    }
  }
}
