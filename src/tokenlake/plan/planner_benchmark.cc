// Planner micro-benchmarks: GenPlans on a batch of N requests whose cached prefixes (a shared
// system prompt plus a private document) are spread over 16 instances.
#include <vector>

#include "benchmark/benchmark.h"
#include "tokenlake/base/random.h"
#include "tokenlake/plan/planner.h"

namespace tokenlake::plan {
namespace {

void BM_GenPlans(benchmark::State& state) {
  const int num_requests = static_cast<int>(state.range(0));
  const int segments_per_request = static_cast<int>(state.range(1));
  constexpr int kInstances = 16;
  auto balancer = *balance::Balancer::Create({});
  auto planner = *Planner::Create({}, balancer.get());
  std::vector<balance::InstanceState> inst;
  for (int i = 0; i < kInstances; ++i) inst.push_back({InstanceId(i), 65536, 60000, 1.0 + i});
  Rng rng(1);
  PlanBatch batch;
  batch.dop = 4;
  uint64_t next = 1000;
  for (int r = 0; r < num_requests; ++r) {
    PlanRequest req;
    req.request = RequestId(r);
    req.new_tokens = rng.Bernoulli(0.5) ? 1 : rng.UniformInt(16, 2048);
    for (int s = 0; s < segments_per_request; ++s) {
      CachedSegment seg;
      if (s < 4) {  // the system prompt: a heavy hitter with 4 replicas
        seg.segment = SegmentId(s + 1);
        for (int k = 0; k < 4; ++k) seg.replicas.push_back(InstanceId(k * 4 + s));
      } else {
        seg.segment = SegmentId(next++);
        seg.replicas.push_back(InstanceId(rng.UniformInt(0, kInstances - 1)));
      }
      seg.num_tokens = 512;
      req.cached.push_back(seg);
    }
    req.new_segments.push_back({SegmentId(next++), 512});
    batch.requests.push_back(std::move(req));
  }
  const std::vector<PlanBatch> batches = {batch};
  for (auto _ : state) {
    auto plans = planner->GenPlans(batches, inst);
    benchmark::DoNotOptimize(plans);
  }
  state.SetItemsProcessed(state.iterations() * num_requests);
}
BENCHMARK(BM_GenPlans)
    ->Args({256, 16})
    ->Args({256, 64})
    ->Args({64, 256})
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace tokenlake::plan
