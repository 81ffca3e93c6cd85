// Micro-benchmarks of the prefix tree: matching a long prompt against a large tree, inserting,
// and cluster-wide LRU eviction. Run from a release build:
//   build/<dir>/bin/prefix_tree_benchmark --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true
#include <memory>
#include <vector>

#include "benchmark/benchmark.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/random.h"
#include "tokenlake/index/prefix_tree.h"
#include "tokenlake/index/segment_id.h"

namespace tokenlake::index {
namespace {

constexpr int32_t kSegmentTokens = 512;
constexpr int32_t kPromptSegments = 256;  // 128K tokens
constexpr int32_t kInstances = 8;

// A tree of `num_chains` disjoint chains of kPromptSegments full segments each (ids are random:
// the cost of Match does not depend on how they were hashed), spread over kInstances.
struct Fixture {
  std::unique_ptr<PrefixTree> tree;
  std::vector<std::vector<SegmentId>> chains;
};

Fixture BuildTree(int64_t num_segments, uint64_t seed) {
  Fixture f;
  auto tree = PrefixTree::Create({.segment_tokens = kSegmentTokens,
                                  .num_instances = kInstances,
                                  .reserve_segments = num_segments});
  TOKENLAKE_CHECK_OK(tree.status());
  f.tree = *std::move(tree);
  Rng rng(seed);
  const int64_t num_chains = num_segments / kPromptSegments;
  std::vector<SegmentKey> keys(kPromptSegments);
  int64_t now = 0;
  for (int64_t c = 0; c < num_chains; ++c) {
    std::vector<SegmentId> ids(kPromptSegments);
    for (int32_t i = 0; i < kPromptSegments; ++i) {
      ids[i] = SegmentId(rng.Next64() >> 1);
      keys[i] = SegmentKey{ids[i], kSegmentTokens};
    }
    auto r = f.tree->InsertChain(keys, InstanceId(static_cast<int32_t>(c % kInstances)), ++now);
    TOKENLAKE_CHECK_OK(r.status());
    f.chains.push_back(std::move(ids));
  }
  return f;
}

// One read-mostly 1M-segment tree shared by the Match and pin benchmarks (built once).
Fixture* SharedTree() {
  static Fixture* f = new Fixture(BuildTree(int64_t{1} << 20, 1));
  return f;
}

// Match of a fully cached 128K-token prompt (256 segments of 512) against a tree of 1M
// segments. Each iteration matches a different stored prompt, so the nodes are mostly not in
// cache: the cold-ish case.
void BM_PrefixTreeMatch_128K_1M(benchmark::State& state) {
  Fixture* f = SharedTree();
  Rng rng(7);
  int64_t matched = 0;
  for (auto _ : state) {
    const auto& chain = f->chains[rng.UniformInt(0, f->chains.size() - 1)];
    MatchResult m = f->tree->Match(chain);
    benchmark::DoNotOptimize(m);
    matched += m.matched_tokens;
  }
  TOKENLAKE_CHECK(matched == state.iterations() * kPromptSegments * kSegmentTokens);
  state.counters["segments_per_s"] = benchmark::Counter(
      static_cast<double>(state.iterations() * kPromptSegments), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_PrefixTreeMatch_128K_1M)->Unit(benchmark::kMicrosecond);

// The same prompt matched again and again (its nodes stay in cache): the warm case.
void BM_PrefixTreeMatch_128K_1M_Warm(benchmark::State& state) {
  Fixture* f = SharedTree();
  const auto& chain = f->chains[17];
  for (auto _ : state) {
    MatchResult m = f->tree->Match(chain);
    benchmark::DoNotOptimize(m);
  }
}
BENCHMARK(BM_PrefixTreeMatch_128K_1M_Warm)->Unit(benchmark::kMicrosecond);

// A miss after half the prompt (the second half diverges): the common partial-hit case.
void BM_PrefixTreeMatch_128K_1M_HalfHit(benchmark::State& state) {
  Fixture* f = SharedTree();
  Rng rng(9);
  std::vector<SegmentId> chain(kPromptSegments);
  for (auto _ : state) {
    state.PauseTiming();
    const auto& stored = f->chains[rng.UniformInt(0, f->chains.size() - 1)];
    for (int32_t i = 0; i < kPromptSegments; ++i) {
      chain[i] = i < kPromptSegments / 2 ? stored[i] : SegmentId(rng.Next64() >> 1);
    }
    state.ResumeTiming();
    MatchResult m = f->tree->Match(chain);
    benchmark::DoNotOptimize(m);
  }
}
BENCHMARK(BM_PrefixTreeMatch_128K_1M_HalfHit)->Unit(benchmark::kMicrosecond);

// Computing the 256 chained ids of a 128K-token prompt (XXH3 over 512 KB).
void BM_ComputeSegmentKeys_128K(benchmark::State& state) {
  std::vector<int32_t> tokens(kPromptSegments * kSegmentTokens);
  Rng rng(3);
  for (auto& t : tokens) t = static_cast<int32_t>(rng.UniformInt(0, 128000));
  for (auto _ : state) {
    auto keys = ComputeSegmentKeys(42, tokens, kSegmentTokens);
    benchmark::DoNotOptimize(keys);
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(tokens.size() * 4));
}
BENCHMARK(BM_ComputeSegmentKeys_128K)->Unit(benchmark::kMicrosecond);

// Inserting a new 256-segment chain (one request's prompt) into a tree of state.range(0)
// segments; the chain is evicted again outside the timed region so the size stays constant.
// Reports the time per chain; divide by 256 for the time per segment.
void BM_PrefixTreeInsert(benchmark::State& state) {
  Fixture f = BuildTree(state.range(0), 2);
  Rng rng(11);
  std::vector<SegmentKey> keys(kPromptSegments);
  int64_t now = 1 << 30;
  for (auto _ : state) {
    state.PauseTiming();
    for (auto& k : keys) k = SegmentKey{SegmentId(rng.Next64() >> 1), kSegmentTokens};
    state.ResumeTiming();
    auto r = f.tree->InsertChain(keys, InstanceId(0), ++now);
    benchmark::DoNotOptimize(r);
    state.PauseTiming();
    for (int32_t i = kPromptSegments - 1; i >= 0; --i) {
      TOKENLAKE_CHECK_OK(f.tree->Evict(keys[i].id).status());
    }
    state.ResumeTiming();
  }
  state.counters["segments_per_s"] = benchmark::Counter(
      static_cast<double>(state.iterations() * kPromptSegments), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_PrefixTreeInsert)->Arg(1 << 16)->Arg(1 << 20)->Unit(benchmark::kMicrosecond);

// The loss of one instance of kInstances in a tree of state.range(0) segments: its chains
// leave the tree (DropInstance). The coordinator does this under the lake's lock, so it is the
// longest any plan can wait when an instance dies.
void BM_PrefixTreeDropInstance(benchmark::State& state) {
  for (auto _ : state) {
    state.PauseTiming();
    Fixture f = BuildTree(state.range(0), 4);
    state.ResumeTiming();
    auto r = f.tree->DropInstance(InstanceId(0));
    TOKENLAKE_CHECK_OK(r.status());
    benchmark::DoNotOptimize(r);
    state.PauseTiming();
    f = Fixture();
    state.ResumeTiming();
  }
}
BENCHMARK(BM_PrefixTreeDropInstance)
    ->Arg(1 << 16)
    ->Arg(1 << 20)
    ->Iterations(3)
    ->Unit(benchmark::kMillisecond);

// Cluster-wide eviction: find the LRU unpinned leaf and evict it, in a tree of 1M segments.
// Every eviction exposes its parent as a new leaf, so the tree never runs dry within the
// iteration cap.
void BM_EvictLru(benchmark::State& state) {
  Fixture f = BuildTree(int64_t{1} << 20, 3);
  for (auto _ : state) {
    std::optional<SegmentId> victim = f.tree->LruEvictableLeaf();
    auto r = f.tree->Evict(*victim);
    benchmark::DoNotOptimize(r);
  }
}
BENCHMARK(BM_EvictLru)->Iterations(200000)->Unit(benchmark::kNanosecond);

// Per-instance eviction (extra replicas first, then last-copy leaves) in a tree of 1M segments.
void BM_EvictOneOnInstance(benchmark::State& state) {
  Fixture f = BuildTree(int64_t{1} << 20, 4);
  int32_t x = 0;
  for (auto _ : state) {
    auto r = f.tree->EvictOneOn(InstanceId(x));
    benchmark::DoNotOptimize(r);
    x = (x + 1) % kInstances;
  }
}
BENCHMARK(BM_EvictOneOnInstance)->Iterations(200000)->Unit(benchmark::kNanosecond);

// Pin + Touch + Unpin of a 256-segment prompt (what the lake does per request), 1M tree.
void BM_PinTouchUnpin_128K_1M(benchmark::State& state) {
  Fixture* f = SharedTree();
  Rng rng(5);
  int64_t now = 1 << 30;
  for (auto _ : state) {
    const auto& chain = f->chains[rng.UniformInt(0, f->chains.size() - 1)];
    TOKENLAKE_CHECK_OK(f->tree->Pin(chain));
    f->tree->Touch(chain, ++now);
    TOKENLAKE_CHECK_OK(f->tree->Unpin(chain));
  }
}
BENCHMARK(BM_PinTouchUnpin_128K_1M)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace tokenlake::index
