// SharedDevicePool against a naive model (a host map of each instance's segments to their
// bytes, and its tail slots), under random stores, frees, tail blocks written, committed in
// place and given back: after every step each stored segment's slot holds exactly its bytes
// (read back from the device through SlotData), the slot counts agree, and the errors are the
// model's. Bad options and out-of-range instances name what is wrong. Skips without a GPU.
#include "tokenlake/engine/cuda/device_pool.h"

#include <cuda_runtime_api.h>

#include <cstring>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/engine/cuda/device_buffer.h"
#include "tokenlake/engine/cuda/gpu_test_util.h"

namespace tokenlake::engine::cuda {
namespace {

using testing_util::HaveGpu;

attention::KvSlotLayout SmallLayout() {
  return {.num_layers = 2,
          .segment_tokens = 4,
          .num_kv_heads = 2,
          .head_dim = 8,
          .dtype = attention::KvDtype::kBFloat16};
}

std::vector<std::byte> ReadBack(const std::byte* device, size_t bytes) {
  std::vector<std::byte> host(bytes);
  EXPECT_EQ(cudaMemcpy(host.data(), device, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  return host;
}

TEST(SharedDevicePoolTest, MatchesANaiveModelUnderRandomOperations) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  for (uint64_t seed : {11u, 12u, 13u}) {
    SCOPED_TRACE(testing::Message() << "seed=" << seed);
    std::cout << "seed=" << seed << "\n";
    std::mt19937_64 rng(seed);
    constexpr int32_t kInstances = 3;
    constexpr int32_t kSlots = 6;
    const attention::KvSlotLayout layout = SmallLayout();
    const size_t slot_bytes = static_cast<size_t>(layout.SlotBytes());
    auto pool = SharedDevicePool::Create(
        {.num_instances = kInstances, .slots_per_instance = kSlots, .layout = layout});
    ASSERT_TRUE(pool.ok()) << pool.status();
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
    DeviceBuffer source;
    ASSERT_TRUE(source.Reserve(slot_bytes).ok());

    // The model: per instance, segment -> bytes, and the tail slots with what was written.
    struct Tail {
      InstanceId instance;
      DeviceSlot slot;
      std::vector<std::byte> bytes;
    };
    std::vector<std::map<uint64_t, std::vector<std::byte>>> held(kInstances);
    std::vector<Tail> tails;
    auto used = [&](int32_t i) {
      int32_t n = static_cast<int32_t>(held[i].size());
      for (const Tail& t : tails) n += t.instance == InstanceId(i) ? 1 : 0;
      return n;
    };
    auto random_bytes = [&] {
      std::vector<std::byte> b(slot_bytes);
      for (std::byte& x : b) x = static_cast<std::byte>(rng() & 0xff);
      return b;
    };
    auto held_id = [&](int32_t i) {
      auto it = held[i].begin();
      std::advance(it, static_cast<std::ptrdiff_t>(rng() % held[i].size()));
      return it->first;
    };

    for (int step = 0; step < 400; ++step) {
      const int32_t i = static_cast<int32_t>(rng() % kInstances);
      const InstanceId inst(i);
      const uint64_t id = 1 + rng() % 24;
      switch (rng() % 6) {
        case 0:
        case 1: {  // store a segment copied from a device source
          std::vector<std::byte> bytes = random_bytes();
          ASSERT_EQ(cudaMemcpy(source.get(), bytes.data(), slot_bytes, cudaMemcpyHostToDevice),
                    cudaSuccess);
          absl::Status s = (*pool)->Store(inst, SegmentId(id), source.as<std::byte>(), {}, stream);
          ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
          if (held[i].contains(id)) {
            EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
          } else if (used(i) == kSlots) {
            EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
          } else {
            ASSERT_TRUE(s.ok()) << s;
            held[i][id] = std::move(bytes);
          }
          break;
        }
        case 2: {  // free a held segment (or one that is not held)
          const uint64_t victim = !held[i].empty() && rng() % 4 != 0 ? held_id(i) : id;
          absl::Status s = (*pool)->Free(inst, SegmentId(victim), 0, stream);
          if (held[i].erase(victim) == 1) {
            EXPECT_TRUE(s.ok()) << s;
          } else {
            EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
          }
          break;
        }
        case 3: {  // a tail block: allocated and written
          absl::StatusOr<DeviceSlot> t = (*pool)->AllocateTail(inst);
          if (used(i) == kSlots) {
            EXPECT_EQ(t.status().code(), absl::StatusCode::kInternal) << t.status();
            break;
          }
          ASSERT_TRUE(t.ok()) << t.status();
          std::vector<std::byte> bytes = random_bytes();
          ASSERT_EQ(cudaMemcpy(t->data, bytes.data(), slot_bytes, cudaMemcpyHostToDevice),
                    cudaSuccess);
          tails.push_back({inst, *t, std::move(bytes)});
          break;
        }
        case 4:
        case 5: {  // a tail block committed in place or given back
          if (tails.empty()) break;
          const size_t k = rng() % tails.size();
          Tail t = tails[k];
          tails.erase(tails.begin() + static_cast<std::ptrdiff_t>(k));
          const int32_t ti = t.instance.value();
          if (rng() % 2 == 0 && !held[ti].contains(id)) {
            ASSERT_TRUE((*pool)->CommitTail(t.instance, t.slot.slot, SegmentId(id), {}).ok());
            held[ti][id] = std::move(t.bytes);
          } else {
            ASSERT_TRUE((*pool)->FreeTail(t.instance, t.slot.slot).ok());
          }
          break;
        }
      }
      // Every segment's slot holds its bytes; the counts agree.
      for (int32_t k = 0; k < kInstances; ++k) {
        const store::SegmentStore& st = (*pool)->store(InstanceId(k));
        ASSERT_EQ(st.used(), used(k)) << "instance " << k << " at step " << step;
        ASSERT_TRUE(st.CheckIntegrity().ok());
        for (const auto& [segment, bytes] : held[k]) {
          const SlotRef ref{InstanceId(k), SegmentId(segment)};
          const std::byte* at = nullptr;
          ASSERT_TRUE((*pool)->Resolve({&ref, 1}, {&at, 1}).ok());
          ASSERT_TRUE(ReadBack(at, slot_bytes) == bytes)
              << "segment " << segment << " on instance " << k << " at step " << step;
        }
      }
      const SlotRef absent{inst, SegmentId(1000 + step)};
      const std::byte* at = nullptr;
      EXPECT_EQ((*pool)->Resolve({&absent, 1}, {&at, 1}).code(), absl::StatusCode::kInternal);
    }
    for (const Tail& t : tails) ASSERT_TRUE((*pool)->FreeTail(t.instance, t.slot.slot).ok());
    cudaStreamDestroy(stream);
  }
}

TEST(SharedDevicePoolTest, BadOptionsAndInstancesAreNamed) {
  struct Bad {
    SharedDevicePool::Options options;
    std::string needle;
  };
  attention::KvSlotLayout bad_layout = SmallLayout();
  bad_layout.head_dim = 0;
  for (const Bad& b :
       {Bad{{.num_instances = 0, .slots_per_instance = 1, .layout = SmallLayout()},
            "num_instances"},
        Bad{{.num_instances = 1, .slots_per_instance = 0, .layout = SmallLayout()},
            "slots_per_instance"},
        Bad{{.num_instances = 1, .slots_per_instance = 1, .layout = bad_layout}, "head_dim"}}) {
    auto pool = SharedDevicePool::Create(b.options);
    EXPECT_EQ(pool.status().code(), absl::StatusCode::kInvalidArgument) << b.needle;
    EXPECT_NE(pool.status().message().find(b.needle), std::string::npos) << pool.status();
  }
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  auto pool = SharedDevicePool::Create(
      {.num_instances = 2, .slots_per_instance = 2, .layout = SmallLayout()});
  ASSERT_TRUE(pool.ok()) << pool.status();
  for (InstanceId bad : {InstanceId(), InstanceId(2)}) {
    absl::StatusOr<DeviceSlot> tail = (*pool)->AllocateTail(bad);
    EXPECT_EQ(tail.status().code(), absl::StatusCode::kInternal);
    EXPECT_NE(tail.status().message().find("of 2"), std::string::npos) << tail.status();
    EXPECT_EQ((*pool)->Free(bad, SegmentId(1), 0, nullptr).code(), absl::StatusCode::kInternal);
  }
  // More than the device holds: the arena's error names the bytes.
  auto huge = SharedDevicePool::Create(
      {.num_instances = 1, .slots_per_instance = 1 << 30, .layout = SmallLayout()});
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted) << huge.status();
}

}  // namespace
}  // namespace tokenlake::engine::cuda
