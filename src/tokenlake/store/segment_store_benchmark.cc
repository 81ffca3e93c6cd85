// Micro-benchmarks of the segment store's metadata operations (the slot bytes are not touched).
//   build/<release dir>/bin/segment_store_benchmark
#include <memory>
#include <vector>

#include "benchmark/benchmark.h"
#include "tokenlake/base/check.h"
#include "tokenlake/store/segment_store.h"

namespace tokenlake::store {
namespace {

std::unique_ptr<SegmentStore> FullStore(int32_t slots) {
  auto store = SegmentStore::Create({.num_slots = slots});
  TOKENLAKE_CHECK_OK(store.status());
  for (int32_t i = 0; i < slots; ++i) {
    TOKENLAKE_CHECK_OK((*store)->Allocate(SegmentId(static_cast<uint64_t>(i))).status());
  }
  return *std::move(store);
}

// Cache churn on a full store: free the oldest segment (as the lake's eviction would), allocate
// a new one in its slot.
void BM_StoreFreeAndAllocate(benchmark::State& state) {
  const int32_t slots = static_cast<int32_t>(state.range(0));
  auto store = FullStore(slots);
  uint64_t oldest = 0;
  uint64_t next = static_cast<uint64_t>(slots);
  for (auto _ : state) {
    TOKENLAKE_CHECK_OK(store->Free(SegmentId(oldest++)));
    auto slot = store->Allocate(SegmentId(next++));
    benchmark::DoNotOptimize(slot);
  }
}
BENCHMARK(BM_StoreFreeAndAllocate)->Arg(1 << 10)->Arg(1 << 16);

// Pin and release (RAII) of one segment, the data plane's per-segment cost; with several
// threads this measures contention on the store's mutex.
void BM_StorePinUnpin(benchmark::State& state) {
  static SegmentStore* store = FullStore(1 << 16).release();
  uint64_t i = static_cast<uint64_t>(state.thread_index()) * 7919;
  for (auto _ : state) {
    auto pin = store->Pin(SegmentId(i++ & 0xffff));
    benchmark::DoNotOptimize(pin);
  }
}
BENCHMARK(BM_StorePinUnpin)->Threads(1)->Threads(2);

void BM_StoreFind(benchmark::State& state) {
  static SegmentStore* store = FullStore(1 << 16).release();
  uint64_t i = 0;
  for (auto _ : state) {
    auto slot = store->Find(SegmentId(i++ & 0xffff));
    benchmark::DoNotOptimize(slot);
  }
}
BENCHMARK(BM_StoreFind);

}  // namespace
}  // namespace tokenlake::store
