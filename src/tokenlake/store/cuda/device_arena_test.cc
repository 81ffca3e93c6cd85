#include "tokenlake/store/cuda/device_arena.h"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <iostream>
#include <random>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "gtest/gtest.h"
#include "tokenlake/store/cuda/cuda_device.h"
#include "tokenlake/store/segment_store.h"

namespace tokenlake::store {
namespace {

using internal::HaveCudaDevice;

TEST(DeviceArenaTest, RejectsZeroBytesAndNegativeDevice) {
  auto zero = DeviceArena::Create({.bytes = 0});
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(zero.status().message().find("bytes"), std::string::npos);
  auto neg = DeviceArena::Create({.bytes = 1024, .device = -1});
  EXPECT_EQ(neg.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(neg.status().message().find("device"), std::string::npos);
}

TEST(DeviceArenaTest, ReportsMissingDeviceAsFailedPrecondition) {
  if (HaveCudaDevice()) GTEST_SKIP() << "a GPU is present";
  auto arena = DeviceArena::Create({.bytes = 1024});
  EXPECT_EQ(arena.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(DeviceArenaTest, OutOfRangeDeviceIsFailedPrecondition) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  auto arena = DeviceArena::Create({.bytes = 1024, .device = 1 << 20});
  EXPECT_EQ(arena.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(DeviceArenaTest, HugeAllocationIsResourceExhausted) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  auto arena = DeviceArena::Create({.bytes = size_t{1} << 50});
  EXPECT_EQ(arena.status().code(), absl::StatusCode::kResourceExhausted);
}

// A SegmentStore over device memory: random allocate/free; every stored segment's slot holds a
// distinct pattern written through cudaMemcpy; after every step all stored slots read back
// their own pattern (slots never overlap, stay inside the arena) and used + free == capacity.
class DeviceArenaStoreTest : public ::testing::TestWithParam<std::pair<size_t, int>> {};

TEST_P(DeviceArenaStoreTest, SlotsAreDisjointDeviceRangesUnderRandomChurn) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const auto [slot_bytes, num_slots] = GetParam();
  const uint64_t seed = 0x5eed0000u + slot_bytes + num_slots;
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  auto arena = DeviceArena::Create({.bytes = slot_bytes * num_slots + 100});
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto store = SegmentStore::Create((*arena)->StoreOptions(slot_bytes, InstanceId(0)));
  ASSERT_TRUE(store.ok()) << store.status();
  SegmentStore& s = **store;
  ASSERT_EQ(s.capacity(), num_slots);

  std::mt19937_64 rng(seed);
  absl::flat_hash_map<uint64_t, uint32_t> model;  // segment id -> pattern word
  const auto base = static_cast<const std::byte*>((*arena)->data());
  std::vector<uint32_t> host(slot_bytes / 4);
  uint64_t next_id = 1;
  for (int step = 0; step < 200; ++step) {
    const bool allocate = model.empty() || (rng() % 3 != 0 && s.free() > 0);
    if (allocate) {
      const SegmentId id(next_id++);
      auto slot = s.Allocate(id);
      ASSERT_TRUE(slot.ok()) << slot.status();
      absl::Span<std::byte> data = s.SlotData(*slot);
      ASSERT_EQ(data.size(), slot_bytes);
      ASSERT_GE(data.data(), base);
      ASSERT_LE(data.data() + data.size(), base + (*arena)->size_bytes());
      const uint32_t pattern = static_cast<uint32_t>(rng());
      for (size_t i = 0; i < host.size(); ++i) host[i] = pattern ^ static_cast<uint32_t>(i);
      ASSERT_EQ(cudaMemcpy(data.data(), host.data(), slot_bytes, cudaMemcpyHostToDevice),
                cudaSuccess);
      model[id.value()] = pattern;
    } else {
      auto it = model.begin();
      std::advance(it, rng() % model.size());
      ASSERT_TRUE(s.Free(SegmentId(it->first)).ok());
      model.erase(it);
    }
    ASSERT_EQ(s.used() + s.free(), s.capacity());
    ASSERT_EQ(s.used(), static_cast<int32_t>(model.size()));
    ASSERT_TRUE(s.CheckIntegrity().ok());
    if (step % 20 == 19) {
      for (const auto& [id, pattern] : model) {
        auto slot = s.Find(SegmentId(id));
        ASSERT_TRUE(slot.has_value());
        absl::Span<std::byte> data = s.SlotData(*slot);
        ASSERT_EQ(cudaMemcpy(host.data(), data.data(), slot_bytes, cudaMemcpyDeviceToHost),
                  cudaSuccess);
        for (size_t i = 0; i < host.size(); ++i) {
          ASSERT_EQ(host[i], pattern ^ static_cast<uint32_t>(i))
              << "segment " << id << " word " << i;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, DeviceArenaStoreTest,
                         ::testing::Values(std::make_pair(size_t{4096}, 3),
                                           std::make_pair(size_t{65536}, 16),
                                           std::make_pair(size_t{1} << 20, 40)));

}  // namespace
}  // namespace tokenlake::store
