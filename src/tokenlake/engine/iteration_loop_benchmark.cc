// The iteration loop's own cost per decode step (the control-plane call for the whole batch,
// the keys, the bookkeeping), with an executor that computes nothing: what a GPU step pays on
// the host besides its forward. The lake is the real one (one instance, 256-token segments,
// the Llama-3-8B shape for the planner's byte costs); every request has a 2,048-token prompt of
// its own and decodes for the whole run.
//   BM_LoopDecodeStep/<batch>: one Step with <batch> requests decoding.
#include <cstdint>
#include <memory>
#include <vector>

#include "benchmark/benchmark.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/engine/iteration_loop.h"
#include "tokenlake/lake/control_plane.h"
#include "tokenlake/lake/lake.h"

namespace tokenlake::engine {
namespace {

constexpr int32_t kSegmentTokens = 256;
constexpr int32_t kPromptTokens = 2048;
constexpr int32_t kVocab = 1000;

// Every item's next token is 1; full logits where they are asked for.
class NullExecutor final : public IterationExecutor {
 public:
  absl::Status BeginSequence(RequestId, int64_t) override { return absl::OkStatus(); }
  DataPlaneCounters EndSequence(RequestId) override { return {}; }
  absl::Status DropTailRows(RequestId, int64_t) override { return absl::OkStatus(); }
  absl::StatusOr<std::vector<WorkOutput>> Run(absl::Span<const IterationWork> batch) override {
    std::vector<WorkOutput> out(batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
      out[i].next_token = 1;
      if (batch[i].want_full_logits) out[i].logits.assign(kVocab, 0.f);
    }
    return out;
  }
  absl::StatusOr<int64_t> StoreSegment(RequestId, InstanceId, int64_t, InstanceId, SegmentId,
                                       const StoredMeta&) override {
    return int64_t{0};
  }
  absl::Status FreeSegment(InstanceId, InstanceId, SegmentId, uint64_t) override {
    return absl::OkStatus();
  }
};

void BM_LoopDecodeStep(benchmark::State& state) {
  const auto batch = static_cast<int32_t>(state.range(0));
  ManualClock clock(1);
  lake::LakeOptions lo;
  lo.num_instances = 1;
  lo.segment_tokens = kSegmentTokens;
  lo.slots_per_instance = 64 * 1024;
  lo.heavy_hitter.num_instances = 1;
  lo.model = plan::ModelShape{
      .num_layers = 32, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128, .dtype_bytes = 2};
  auto lk = lake::Lake::Create(lo, &clock);
  if (!lk.ok()) {
    state.SkipWithError(lk.status().ToString().c_str());
    return;
  }
  lake::LocalControlPlane control(lk->get(), &clock);
  NullExecutor exec;
  auto loop = IterationLoop::Create(&control, &exec,
                                    {.segment_tokens = kSegmentTokens,
                                     .max_batch_tokens = 8192,
                                     .max_batch_requests = 256,
                                     .vocab_size = kVocab});
  if (!loop.ok()) {
    state.SkipWithError(loop.status().ToString().c_str());
    return;
  }
  for (int32_t r = 0; r < batch; ++r) {
    LoopRequest req{.id = RequestId(static_cast<uint64_t>(r) + 1), .max_new_tokens = 1 << 20};
    req.prompt.resize(kPromptTokens);
    for (int32_t t = 0; t < kPromptTokens; ++t) req.prompt[t] = (r * 7919 + t * 31) % kVocab;
    if (absl::Status s = (*loop)->Submit(req); !s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      return;
    }
  }
  // Prefill every prompt; from then on every step is the whole batch decoding.
  for (int i = 0; i < 1000 && (*loop)->Load().prefill_requests > 0; ++i) (*loop)->Step();
  for (auto _ : state) {
    auto done = (*loop)->Step();
    benchmark::DoNotOptimize(done);
  }
  state.counters["requests"] = batch;
}
BENCHMARK(BM_LoopDecodeStep)->Arg(32)->Arg(128)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace tokenlake::engine
