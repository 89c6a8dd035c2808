// kvcrush::Pipeline: a single-request loop of kvcrush_ov's native engine (engine/engine.py with
// one sequence): the prompt runs in chunks of scheduler.max_num_batched_tokens (the Python
// scheduler's split, which the logits depend on bit for bit), then one token per step; greedy
// argmax (numpy's: the first of equal maxima); EOS ends the request unless ignore_eos.

#include "kvcrush/pipeline.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <regex>
#include <sstream>
#include <stdexcept>

#include <openvino/runtime/core.hpp>

#include "evictor.hpp"
#include "head_runner.hpp"
#include "paged_runner.hpp"
#include "tokenizer.hpp"

namespace kvcrush {

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

/// config.json's max_position_embeddings (2048 when absent, as model_info.py reads it).
int64_t context_length(const std::filesystem::path& model_dir) {
  std::ifstream f(model_dir / "config.json");
  if (!f) throw std::runtime_error("model=" + model_dir.string() + " has no config.json");
  std::stringstream text;
  text << f.rdbuf();
  const std::string s = text.str();
  std::smatch m;
  if (std::regex_search(s, m, std::regex("\"max_position_embeddings\"\\s*:\\s*(\\d+)")))
    return std::stoll(m[1].str());
  return 2048;
}

/// Python's f"{n:,}".
std::string grouped(int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return (n < 0 ? "-" : "") + out;
}

/// cache_plan.requested_blocks + check_cache_plan (without the available-memory check): the
/// KV blocks the cache may hold.
int64_t cache_blocks(const KVCacheConfig& kv, const SchedulerConfig& scheduler,
                     int64_t block_bytes, int64_t block_size) {
  constexpr double kGiB = 1 << 30;
  constexpr int64_t kDefaultBytes = 1 << 30;  // cache_plan.DEFAULT_CACHE_BYTES (native)
  const int64_t blocks =
      kv.num_kv_blocks ? kv.num_kv_blocks
      : kv.cache_size > 0
          ? static_cast<int64_t>(std::floor(kv.cache_size * kGiB / static_cast<double>(block_bytes)))
          : kDefaultBytes / block_bytes;
  const int64_t need = (scheduler.max_num_batched_tokens + block_size - 1) / block_size + 1;
  if (blocks >= need) return blocks;
  const std::string room =
      "room for at least " + std::to_string(need) + " KV blocks (" +
      grouped(need * block_bytes) + " bytes; one block holds " +
      std::to_string(block_size) + " tokens in " + grouped(block_bytes) +
      " bytes), enough for one step of scheduler.max_num_batched_tokens=" +
      std::to_string(scheduler.max_num_batched_tokens);
  if (kv.num_kv_blocks) throw ConfigError("kv_cache.num_kv_blocks", repr(kv.num_kv_blocks), room);
  if (kv.cache_size > 0) throw ConfigError("kv_cache.cache_size", repr(kv.cache_size), room);
  throw ConfigError("scheduler.max_num_batched_tokens", repr(scheduler.max_num_batched_tokens),
                    "at most " + std::to_string(std::max<int64_t>(1, (blocks - 1) * block_size)) +
                        " with the default cache of " + std::to_string(blocks) +
                        " blocks (or set kv_cache.cache_size for " + room + ")");
}

/// cache_plan.check_request_size: a request that can never run is refused, naming its field.
void check_request_size(int64_t prompt_tokens, int64_t max_new_tokens, int64_t context,
                        int64_t cache_tokens, const SchedulerConfig& scheduler) {
  const int64_t total = std::min(context, cache_tokens);
  const std::string where = "the model's context is " + std::to_string(context) +
                            " tokens and the KV cache holds " + std::to_string(cache_tokens);
  if (max_new_tokens >= total)
    throw ConfigError("max_new_tokens", repr(max_new_tokens),
                      "at most " + std::to_string(total - 1) + ": " + where +
                          ", prompt included");
  if (prompt_tokens < 1) throw ConfigError("prompt", repr("<0 tokens>"), "at least one token");
  const std::string size = repr("<" + std::to_string(prompt_tokens) + " tokens>");
  if (prompt_tokens > total - max_new_tokens)
    throw ConfigError("prompt", size,
                      "at most " + std::to_string(total - max_new_tokens) + " tokens: " +
                          where + ", and max_new_tokens=" + std::to_string(max_new_tokens));
  if (!scheduler.dynamic_split_fuse && prompt_tokens > scheduler.max_num_batched_tokens)
    throw ConfigError("prompt", size,
                      "at most scheduler.max_num_batched_tokens = " +
                          std::to_string(scheduler.max_num_batched_tokens) +
                          " tokens with scheduler.dynamic_split_fuse=False (a prompt runs in "
                          "one step): raise max_num_batched_tokens or set "
                          "dynamic_split_fuse=True");
}

}  // namespace

struct Pipeline::Impl {
  KVCacheConfig kv_cache;
  SchedulerConfig scheduler;
  ov::Core core;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<PagedRunner> runner;  // eviction off: the plain paged graph
  std::unique_ptr<HeadRunner> heads;    // eviction on: the per-head graphs ...
  std::unique_ptr<Evictor> evictor;     // ... and what evicts
  int64_t context = 0;
  int64_t cache_blocks = 0;  // the most KV blocks the cache may hold (kv_cache's size)

  int64_t block_size() const { return heads ? heads->block_size() : runner->block_size(); }
  int64_t block_bytes() const { return heads ? heads->block_bytes() : runner->block_bytes(); }
  int64_t vocab_size() const { return heads ? heads->vocab_size() : runner->vocab_size(); }

  GenerationResult generate(const std::vector<int64_t>& prompt, const GenerationConfig& g);
};

Pipeline::Pipeline(const std::filesystem::path& model_dir, const std::string& device,
                   KVCacheConfig kv_cache, std::optional<CacheEvictionConfig> eviction,
                   SchedulerConfig scheduler)
    : impl_(std::make_unique<Impl>()) {
  kv_cache.validate();
  scheduler.validate();
  std::optional<EvictionPlan> plan;
  if (eviction) {
    eviction->validate();
    plan.emplace(*eviction);  // what the C++ pipeline cannot run fails here, before loading
  }
  if (!std::filesystem::is_directory(model_dir) ||
      !std::filesystem::exists(model_dir / "openvino_model.xml"))
    throw std::runtime_error("model=" + model_dir.string() +
                             " is not an exported model folder (no openvino_model.xml)");
  Impl& m = *impl_;
  m.kv_cache = std::move(kv_cache);
  m.scheduler = scheduler;
  m.context = context_length(model_dir);
  m.tokenizer = std::make_unique<Tokenizer>(m.core, model_dir);
  if (plan) {
    m.heads = std::make_unique<HeadRunner>(m.core, model_dir, device, m.kv_cache.precision,
                                           eviction->plain_prefill);
    m.evictor = std::make_unique<Evictor>(std::move(*plan), *m.heads);
  } else {
    m.runner = std::make_unique<PagedRunner>(m.core, model_dir, device, m.kv_cache.precision);
  }
  m.cache_blocks = cache_blocks(m.kv_cache, m.scheduler, m.block_bytes(), m.block_size());
}

Pipeline::~Pipeline() = default;
Pipeline::Pipeline(Pipeline&&) noexcept = default;
Pipeline& Pipeline::operator=(Pipeline&&) noexcept = default;

std::vector<int64_t> Pipeline::encode(const std::string& text) {
  return impl_->tokenizer->encode(text);
}

std::string Pipeline::decode(const std::vector<int64_t>& ids) {
  return impl_->tokenizer->decode(ids);
}

int64_t Pipeline::block_bytes() const { return impl_->block_bytes(); }
int64_t Pipeline::block_size() const { return impl_->block_size(); }

GenerationResult Pipeline::generate(const std::string& prompt, GenerationConfig config) {
  config.validate();  // Python's order: the config, then the prompt
  if (prompt.find_first_not_of(" \t\n\r\f\v") == std::string::npos)
    throw ConfigError("prompt", repr(prompt), "a non-empty string");
  return impl_->generate(impl_->tokenizer->encode(prompt), config);
}

GenerationResult Pipeline::generate(const std::vector<int64_t>& prompt_ids,
                                    GenerationConfig config) {
  config.validate();
  return impl_->generate(prompt_ids, config);
}

GenerationResult Pipeline::Impl::generate(const std::vector<int64_t>& prompt,
                                          const GenerationConfig& g) {
  const auto num_prompt = static_cast<int64_t>(prompt.size());
  const int64_t bs = block_size();
  check_request_size(num_prompt, g.max_new_tokens, context, cache_blocks * bs, scheduler);
  // what this request can hold (it runs alone): no more than it needs, nor than kv_cache allows
  const int64_t max_blocks = std::min(cache_blocks, (num_prompt + g.max_new_tokens + bs - 1) / bs);
  std::vector<int32_t> blocks;  // eviction off: the block table (block i: positions i*bs..)
  HeadTable table;              // eviction on: per-layer, per-head tables
  std::vector<std::vector<float>> scores;
  const int64_t plain_before = heads ? heads->plain_steps() : 0;
  if (heads) {
    heads->allocate(max_blocks);
    evictor->begin(num_prompt);
  } else {
    runner->reserve(max_blocks);
  }
  // the request starts here: the cache (and the decode graph's warm-up run with it) is
  // allocated before, as the Python engine allocates its cache when it is built
  const auto t_start = Clock::now();
  auto held_bytes = [&] {
    return heads ? table.num_blocks() * heads->head_block_bytes()
                 : static_cast<int64_t>(blocks.size()) * runner->block_bytes();
  };

  GenerationResult r;
  r.num_input_tokens = num_prompt;
  std::vector<int64_t> ids = prompt;  // every known token: prompt, then generated
  int64_t computed = 0;               // tokens whose K/V are in the cache
  Clock::time_point first{}, last{};
  while (r.finish_reason.empty()) {
    const int64_t start = computed;
    const int64_t n = std::min(static_cast<int64_t>(ids.size()) - start,
                               scheduler.max_num_batched_tokens);
    const float* logits = nullptr;
    if (heads) {
      evictor->flush(table);  // the prompt's eviction, after the first token was handed out
      heads->append(table, n);
      r.peak_kv_bytes = std::max(r.peak_kv_bytes, held_bytes());
      const int64_t window = evictor->window(table, start, n);
      logits = heads->run(ids.data() + start, n, table, window, &scores);
      evictor->after_step(table, start, n, window, scores);
    } else {
      while (static_cast<int64_t>(blocks.size()) * bs < start + n)
        blocks.push_back(static_cast<int32_t>(blocks.size()));
      r.peak_kv_bytes = std::max(r.peak_kv_bytes, held_bytes());
      logits = runner->run(ids.data() + start, n, start, blocks);
    }
    computed += n;
    if (computed < static_cast<int64_t>(ids.size())) continue;  // a prompt chunk: no token
    const int64_t token = std::max_element(logits, logits + vocab_size()) - logits;
    last = Clock::now();
    if (r.num_generated_tokens++ == 0) first = last;
    if (token == tokenizer->eos_token_id() && !g.ignore_eos) {
      r.finish_reason = "stop";
    } else {
      ids.push_back(token);
      r.token_ids.push_back(token);
      if (r.num_generated_tokens >= g.max_new_tokens) r.finish_reason = "length";
    }
  }
  r.ttft_s = seconds(t_start, first);
  if (r.num_generated_tokens > 1)
    r.tpot_s = seconds(first, last) / static_cast<double>(r.num_generated_tokens - 1);
  r.kv_bytes = held_bytes();
  r.full_kv_bytes = (computed + bs - 1) / bs * block_bytes();
  if (evictor) {
    r.num_evictions = evictor->num_evictions();
    r.kv_budget_tokens = r.num_evictions ? evictor->budget() : 0;
    r.kvcrush_tokens = evictor->kvcrush_tokens();
    r.plain_prefill_chunks = heads->plain_steps() - plain_before;
    r.eviction_log = evictor->take_log();
  }
  r.text = tokenizer->decode(r.token_ids);
  return r;
}

}  // namespace kvcrush
