// Micro-benchmarks of the engine on a random mid-size Llama (hidden 256, 4 layers, 8 heads /
// 2 KV heads, head_dim 32, vocab 1024): the prefill forward pass, serving a request whose long
// prefix is cached (pool on, 1-4 instances) versus recomputing it (pool off), and one layer's
// partial attention on a holder reached over the loopback transport versus locally.
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "tokenlake/base/check.h"
#include "tokenlake/engine/checkpoint_testing.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/instance_pool.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/engine/local_backend.h"
#include "tokenlake/engine/safetensors.h"

namespace tokenlake::engine {
namespace {

const LlamaModel& BenchModel() {
  static const LlamaModel* model = [] {
    const LlamaConfig c{.vocab_size = 1024,
                        .hidden_size = 256,
                        .intermediate_size = 512,
                        .num_layers = 4,
                        .num_heads = 8,
                        .num_kv_heads = 2,
                        .head_dim = 32,
                        .rms_norm_eps = 1e-5f,
                        .rope_theta = 10000.0,
                        .max_position_embeddings = 8192};
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> u(-0.1f, 0.1f);
    const std::string image = testing_checkpoint::LlamaCheckpointImage(
        c, [&](const std::vector<int64_t>&, bool, std::vector<float>& v) {
          for (float& x : v) x = u(rng);
        });
    auto file = SafetensorsFile::FromBytes(image, "bench");
    TOKENLAKE_CHECK(file.ok());
    auto m = LlamaModel::FromSafetensors(c, **file);
    TOKENLAKE_CHECK(m.ok());
    return m->release();
  }();
  return *model;
}

std::vector<int32_t> Tokens(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % 1024);
  return t;
}

// Prefill of range(0) tokens, no cache.
void BM_ForwardPrefill(benchmark::State& state) {
  const LlamaModel& model = BenchModel();
  const std::vector<int32_t> tokens = Tokens(static_cast<int>(state.range(0)), 2);
  for (auto _ : state) {
    LocalKvBackend backend(model.config());
    auto logits = model.Forward(tokens, 0, backend);
    benchmark::DoNotOptimize(logits);
  }
  state.SetItemsProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_ForwardPrefill)->Arg(16)->Arg(256)->Arg(1024)->Unit(benchmark::kMillisecond);

// A request = a shared 1024-token document + a fresh 16-token question, 4 new tokens.
// range(0) = instances (0 = no pool). With the pool the document is cached after the first
// request, so each timed request computes only the question and the decode steps.
void BM_GenerateSharedPrefix(benchmark::State& state) {
  const LlamaModel& model = BenchModel();
  const int instances = static_cast<int>(state.range(0));
  auto engine = Engine::Create(&model, {.use_pool = instances > 0,
                                        .num_instances = std::max(instances, 1),
                                        .segment_tokens = 64,
                                        .slots_per_instance = 4096,
                                        .rotate_compute_instance = true});
  TOKENLAKE_CHECK(engine.ok());
  const std::vector<int32_t> doc = Tokens(1024, 3);
  uint32_t seed = 10;
  auto request = [&] {
    std::vector<int32_t> prompt = doc;
    const std::vector<int32_t> q = Tokens(16, seed++);
    prompt.insert(prompt.end(), q.begin(), q.end());
    return prompt;
  };
  TOKENLAKE_CHECK((*engine)->Generate(request(), 4).ok());  // warm the pool
  int64_t cached = 0;
  for (auto _ : state) {
    auto r = (*engine)->Generate(request(), 4);
    TOKENLAKE_CHECK(r.ok());
    cached += r->cached_tokens;
  }
  state.counters["cached_tokens_per_request"] =
      static_cast<double>(cached) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_GenerateSharedPrefix)
    ->ArgName("instances")
    ->Arg(0)
    ->Arg(1)
    ->Arg(2)
    ->Arg(4)
    ->Unit(benchmark::kMillisecond);

// One layer's partial attention of range(0) queries over 16 segments of 64 tokens held by
// instance 1: remote (query movement over the loopback transport) when range(1) == 1, else on
// the holder's own store.
void BM_HolderAttend(benchmark::State& state) {
  const int32_t num_q = static_cast<int32_t>(state.range(0));
  const bool remote = state.range(1) == 1;
  auto pool = InstancePool::Create({.num_instances = 2,
                                    .layout = {.num_layers = 4,
                                               .segment_tokens = 64,
                                               .num_kv_heads = 2,
                                               .head_dim = 32,
                                               .dtype = attention::KvDtype::kFloat32},
                                    .num_heads = 8,
                                    .slots_per_instance = 32});
  TOKENLAKE_CHECK(pool.ok());
  std::vector<SegmentRef> segs;
  std::vector<std::byte> slot(static_cast<size_t>((*pool)->layout().SlotBytes()));
  for (size_t i = 0; i < slot.size() / 4; ++i) {
    const float v = static_cast<float>(i % 97) * 0.01f;
    std::memcpy(slot.data() + 4 * i, &v, 4);
  }
  for (int i = 0; i < 16; ++i) {
    segs.push_back({SegmentId(static_cast<uint64_t>(i + 1)), 64});
    TOKENLAKE_CHECK((*pool)->StoreSegment(InstanceId(1), InstanceId(1), segs.back().id, slot).ok());
  }
  std::vector<float> q(static_cast<size_t>(num_q) * 8 * 32, 0.1f), out(q.size()),
      lse(static_cast<size_t>(num_q) * 8);
  for (auto _ : state) {
    if (remote) {
      auto t = (*pool)->StartAttend(InstanceId(0), InstanceId(1), 0, segs, num_q, q);
      TOKENLAKE_CHECK(t.ok());
      TOKENLAKE_CHECK(
          (*pool)->AwaitAttend(InstanceId(0), *t, absl::MakeSpan(out), absl::MakeSpan(lse)).ok());
    } else {
      TOKENLAKE_CHECK((*pool)
                          ->LocalAttend(InstanceId(1), 0, segs, num_q, q, absl::MakeSpan(out),
                                        absl::MakeSpan(lse))
                          .ok());
    }
  }
}
BENCHMARK(BM_HolderAttend)
    ->ArgNames({"queries", "remote"})
    ->ArgsProduct({{1, 64}, {0, 1}})
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace tokenlake::engine
