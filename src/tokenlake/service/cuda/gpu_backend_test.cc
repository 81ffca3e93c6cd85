#include "tokenlake/service/cuda/gpu_backend.h"

#include <cstdint>
#include <limits>

#include "gtest/gtest.h"

namespace tokenlake::service {
namespace {

constexpr int64_t kGiB = int64_t{1} << 30;
constexpr int64_t kMiB = int64_t{1} << 20;

TEST(GpuInstanceSlotsTest, ThePoolGetsWhatTheShareLeavesAfterWeightsAndReserve) {
  // Half of 80 GiB is 40; less 16 GiB of weights and a 4 GiB reserve leaves 20 GiB: 10,240
  // slots of 2 MiB.
  EXPECT_EQ(*GpuInstanceSlots(80 * kGiB, 0.5, 16 * kGiB, 4 * kGiB, 2 * kMiB), 10240);
  // A partial slot is not a slot.
  EXPECT_EQ(*GpuInstanceSlots(80 * kGiB, 0.5, 16 * kGiB, 4 * kGiB, 2 * kMiB + 1), 10239);
  // The whole device, nothing reserved.
  EXPECT_EQ(*GpuInstanceSlots(10 * kMiB, 1.0, 0, 0, kMiB), 10);
  // Exactly one slot fits.
  EXPECT_EQ(*GpuInstanceSlots(10 * kMiB, 1.0, 4 * kMiB, 5 * kMiB, kMiB), 1);
  // Tiny slots on a large device: capped at what the lake can count.
  EXPECT_EQ(*GpuInstanceSlots(int64_t{1} << 50, 1.0, 0, 0, 1), std::numeric_limits<int32_t>::max());
}

TEST(GpuInstanceSlotsTest, NothingLeftNamesTheBytes) {
  const absl::StatusOr<int32_t> r =
      GpuInstanceSlots(80 * kGiB, 0.25, 16 * kGiB, 4 * kGiB, 4 * kGiB);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  // 20 GiB given, 16 + 4 taken: nothing left for a 4 GiB slot.
  EXPECT_NE(r.status().message().find("20.00 GiB"), std::string::npos) << r.status();
  EXPECT_NE(r.status().message().find("weights take 16.00 GiB"), std::string::npos) << r.status();
  EXPECT_NE(r.status().message().find("reserve 4.00 GiB"), std::string::npos) << r.status();
  EXPECT_EQ(GpuInstanceSlots(10 * kMiB, 1.0, 4 * kMiB, 5 * kMiB, kMiB + 1).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(GpuInstanceSlots(10 * kMiB, 1.0, 11 * kMiB, 0, kMiB).status().code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(GpuInstanceSlotsTest, BadArgumentsAreRefused) {
  for (double f : {0.0, -0.5, 1.01, std::numeric_limits<double>::quiet_NaN()}) {
    const absl::StatusOr<int32_t> r = GpuInstanceSlots(80 * kGiB, f, 0, 0, kMiB);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << f;
    EXPECT_NE(r.status().message().find("fraction"), std::string::npos) << r.status();
  }
  EXPECT_EQ(GpuInstanceSlots(-1, 0.5, 0, 0, kMiB).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GpuInstanceSlots(kGiB, 0.5, -1, 0, kMiB).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GpuInstanceSlots(kGiB, 0.5, 0, -1, kMiB).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GpuInstanceSlots(kGiB, 0.5, 0, 0, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GpuTotalMemoryTest, ADeviceThatDoesNotExistIsNamed) {
  const absl::StatusOr<int64_t> r = GpuTotalMemory(4096);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_NE(r.status().message().find("4096"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace tokenlake::service
