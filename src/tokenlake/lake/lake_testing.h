// Test-only: a small lake's options, chains of full segments and tail requests, shared by the
// lake's tests.
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_LAKE_LAKE_TESTING_H_
#define TOKENLAKE_LAKE_LAKE_TESTING_H_

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/plan/cost_model.h"

namespace tokenlake::lake {

// Tokens per segment in SmallOptions and Chain.
inline constexpr int32_t kTestSegmentTokens = 16;

// A lake of `instances` instances with `slots` slots each, segments of kTestSegmentTokens, a
// small model shape, and heavy-hitter detection that reacts at once (no minimum load).
inline LakeOptions SmallOptions(int32_t instances = 4, int32_t slots = 8) {
  LakeOptions o;
  o.num_instances = instances;
  o.segment_tokens = kTestSegmentTokens;
  o.slots_per_instance = slots;
  o.model = plan::ModelShape{1, 32, 8, 128, 2};
  o.heavy_hitter.half_life_us = 1'000'000;
  o.heavy_hitter.min_heavy_load = 0;
  return o;
}

// A chain of full segments with the given ids (arbitrary, unique per chain position, like real
// chained hashes).
inline std::vector<index::SegmentKey> Chain(std::initializer_list<uint64_t> ids) {
  std::vector<index::SegmentKey> keys;
  for (uint64_t id : ids) keys.push_back({SegmentId(id), kTestSegmentTokens});
  return keys;
}

// A lake of SmallOptions(instances, slots) on `clock` (a failure is a test failure).
inline std::unique_ptr<Lake> MakeLake(ManualClock* clock, int32_t instances, int32_t slots) {
  auto lake = Lake::Create(SmallOptions(instances, slots), clock);
  EXPECT_TRUE(lake.ok()) << lake.status();
  return *std::move(lake);
}

// A request whose tail covers [match, end_tokens), computed on `instance`.
inline LakeRequest TailRequest(uint64_t id, std::vector<index::SegmentKey> keys, int64_t end_tokens,
                               int32_t instance = 0) {
  return LakeRequest{.id = RequestId(id),
                     .keys = std::move(keys),
                     .new_tokens = 1,
                     .tail_end_tokens = end_tokens,
                     .tail_instance = InstanceId(instance)};
}

}  // namespace tokenlake::lake

#endif  // TOKENLAKE_LAKE_LAKE_TESTING_H_
