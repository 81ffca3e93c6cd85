// Lake control-plane micro-benchmarks over a large pool: 16 instances, documents of 256
// segments of 512 tokens (128K tokens) sharing an 8-segment system prompt.
//   BM_LakeMatch128K/<segments>: Match of a random document's full 128K-token chain.
//   BM_LakeGenPlans/<segments>/<requests>: GenPlans for one batch (DoP 4) of requests whose
//     prefixes are random prefixes (1..64 segments) of random documents, plus one new segment.
// The `tokenlake bench control-plane` CLI measures the same at 1M segments.
#include <memory>
#include <vector>

#include "benchmark/benchmark.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/hash.h"
#include "tokenlake/base/random.h"
#include "tokenlake/lake/lake.h"

namespace tokenlake::lake {
namespace {

constexpr int32_t kInstances = 16;
constexpr int32_t kSegmentTokens = 512;
constexpr int32_t kDocSegments = 256;  // 128K tokens
constexpr int32_t kPromptSegments = 8;

struct Pool {
  ManualClock clock{1};
  std::unique_ptr<Lake> lake;
  int32_t num_docs = 0;
  std::vector<index::SegmentKey> DocKeys(int32_t doc, int32_t len) const {
    std::vector<index::SegmentKey> keys;
    uint64_t parent = 0x5eed;
    for (int32_t k = 0; k < len; ++k) {
      const uint64_t id = HashCombine(parent, k < kPromptSegments ? 0 : doc + 1);
      keys.push_back({SegmentId(id), kSegmentTokens});
      parent = id;
    }
    return keys;
  }
};

Pool* GetPool(int64_t segments) {
  static auto* pools = new std::vector<std::pair<int64_t, std::unique_ptr<Pool>>>();
  for (auto& [n, p] : *pools) {
    if (n == segments) return p.get();
  }
  auto pool = std::make_unique<Pool>();
  pool->num_docs = static_cast<int32_t>(segments / (kDocSegments - kPromptSegments));
  LakeOptions o;
  o.num_instances = kInstances;
  o.segment_tokens = kSegmentTokens;
  o.slots_per_instance = static_cast<int32_t>(segments / kInstances * 5 / 4 + 1024);
  o.reserve_segments = segments + 1024;
  pool->lake = *Lake::Create(o, &pool->clock);
  for (int32_t d = 0; d < pool->num_docs; ++d) {
    LakeRequest r;
    r.id = RequestId(d);
    r.keys = pool->DocKeys(d, kDocSegments);
    r.new_tokens = 1;
    (void)pool->lake->Admit(r);
    (void)pool->lake->CommitKeys(r.id, r.keys, InstanceId(d % kInstances));
    (void)pool->lake->Release(r.id);
    pool->clock.AdvanceUs(1);
  }
  pools->emplace_back(segments, std::move(pool));
  return pools->back().second.get();
}

void BM_LakeMatch128K(benchmark::State& state) {
  Pool* pool = GetPool(state.range(0));
  Rng rng(7);
  std::vector<std::vector<index::SegmentKey>> prompts;
  for (int i = 0; i < 64; ++i) {
    prompts.push_back(
        pool->DocKeys(static_cast<int32_t>(rng.UniformInt(0, pool->num_docs - 1)), kDocSegments));
  }
  size_t i = 0;
  for (auto _ : state) {
    auto m = pool->lake->Match(prompts[i++ % prompts.size()]);
    benchmark::DoNotOptimize(m);
  }
  state.counters["segments"] = static_cast<double>(pool->lake->Stats().segments);
}
BENCHMARK(BM_LakeMatch128K)->Arg(1 << 16)->Arg(1 << 20)->Unit(benchmark::kMicrosecond);

void BM_LakeGenPlans(benchmark::State& state) {
  Pool* pool = GetPool(state.range(0));
  const int requests = static_cast<int>(state.range(1));
  Rng rng(11);
  std::vector<Batch> batches(8);
  uint64_t next = 1;
  for (Batch& b : batches) {
    b.dop = 4;
    for (int k = 0; k < requests; ++k) {
      LakeRequest r;
      r.id = RequestId(next++);
      const int32_t len = static_cast<int32_t>(rng.UniformInt(1, 64));
      r.keys = pool->DocKeys(static_cast<int32_t>(rng.UniformInt(0, pool->num_docs - 1)), len);
      r.keys.push_back({SegmentId(HashCombine(r.keys.back().id.value(), next)), kSegmentTokens});
      r.new_tokens = rng.Bernoulli(0.5) ? 1 : rng.UniformInt(64, 2048);
      b.requests.push_back(std::move(r));
    }
  }
  size_t i = 0;
  for (auto _ : state) {
    auto plans = pool->lake->GenPlans({batches[i++ % batches.size()]});
    benchmark::DoNotOptimize(plans);
  }
  state.SetItemsProcessed(state.iterations() * requests);
}
BENCHMARK(BM_LakeGenPlans)
    ->Args({1 << 16, 256})
    ->Args({1 << 20, 256})
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace tokenlake::lake
