// Routing decisions (router.h): the plan's instance unless it is not a candidate or too busy,
// else the least busy candidate; and Router over a real lake and membership.
#include "tokenlake/service/router.h"

#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tokenlake/index/segment_id.h"

namespace tokenlake::service {
namespace {

using Load = Membership::Load;

TEST(ChooseComputeInstanceTest, FollowsThePlanWhileItsInstanceIsNotTooBusy) {
  const std::vector<Load> c = {{.id = 0, .in_flight = 1}, {.id = 2, .in_flight = 3}};
  absl::StatusOr<RouteChoice> r = ChooseComputeInstance(c, 2, /*balance_abs_threshold=*/2, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->instance, 2);
  EXPECT_FALSE(r->overridden);
  // 4 in flight against a minimum of 1: more than 2 above it.
  const std::vector<Load> busier = {{.id = 0, .in_flight = 1}, {.id = 2, .in_flight = 4}};
  r = ChooseComputeInstance(busier, 2, 2, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->instance, 0);
  EXPECT_TRUE(r->overridden);
}

TEST(ChooseComputeInstanceTest, APlanOutsideTheCandidatesGoesToTheLeastBusy) {
  // Fewest in flight first, then fewest routed, then the lowest id.
  const std::vector<Load> c = {{.id = 0, .in_flight = 2, .routed = 1},
                               {.id = 1, .in_flight = 1, .routed = 9},
                               {.id = 3, .in_flight = 1, .routed = 4},
                               {.id = 4, .in_flight = 1, .routed = 4}};
  for (int32_t planned : {-1, 2, 7}) {
    absl::StatusOr<RouteChoice> r = ChooseComputeInstance(c, planned, 2, 1);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->instance, 3) << "planned " << planned;
    EXPECT_TRUE(r->overridden);
  }
}

TEST(ChooseComputeInstanceTest, NoCandidateIsUnavailableNamingTheExcluded) {
  absl::StatusOr<RouteChoice> r = ChooseComputeInstance({}, 0, 2, 3);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(r.status().message().find("3 excluded"), std::string::npos) << r.status();
}

class RouterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    lake::LakeOptions o;
    o.num_instances = 2;
    o.segment_tokens = 4;
    o.slots_per_instance = 64;
    o.model = {.num_layers = 1, .num_heads = 1, .num_kv_heads = 1, .head_dim = 1, .dtype_bytes = 4};
    o.heavy_hitter.num_instances = 2;
    auto lk = lake::Lake::Create(o, &lake_.clock);
    ASSERT_TRUE(lk.ok()) << lk.status();
    absl::MutexLock lock(&lake_.mu);
    lake_.lake = std::move(*lk);
  }
  // Registers instances 0 and 1 with data ports and sends both the peers: both ready.
  void MakeReady() {
    for (int32_t i = 0; i < 2; ++i) {
      ASSERT_TRUE(membership_.Register(absl::StrCat("i", i), i, 5000 + i, absl::Now()).ok());
      v1::InstanceState s;
      s.set_data_port(6000 + i);
      membership_.Report(i, s);
    }
    google::protobuf::RepeatedPtrField<v1::Peer> peers;
    membership_.AddPeers(0, &peers);
    membership_.AddPeers(1, &peers);
    ASSERT_EQ(membership_.ReadyCount(), 2);
  }
  std::vector<index::SegmentKey> Keys(int32_t segments) {
    std::vector<int32_t> tokens;
    for (int32_t t = 0; t < segments * 4; ++t) tokens.push_back(t);
    auto keys = index::ComputeSegmentKeys(1, tokens, 4);
    EXPECT_TRUE(keys.ok());
    return *keys;
  }
  GuardedLake lake_;
  Membership membership_{2, absl::Seconds(1)};
};

TEST_F(RouterTest, NoReadyInstanceIsUnavailable) {
  Router router({.num_instances = 2}, &lake_, &membership_);
  EXPECT_EQ(router.Route(Keys(2), 9, {}, RequestId(1)).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(RouterTest, RotationVisitsEveryReadyInstanceInTurn) {
  MakeReady();
  Router router({.num_instances = 2, .rotate = true}, &lake_, &membership_);
  std::vector<int32_t> got;
  for (int i = 0; i < 4; ++i) got.push_back(*router.Route(Keys(2), 9, {}, RequestId(i + 1)));
  EXPECT_EQ(got, (std::vector<int32_t>{0, 1, 0, 1}));
  EXPECT_EQ(*router.Route(Keys(2), 9, {1}, RequestId(9)), 0);  // excluded never chosen
}

TEST_F(RouterTest, PlansOnTheLakeAndNeverPicksAnExcludedInstance) {
  MakeReady();
  Router router({.num_instances = 2}, &lake_, &membership_);
  absl::StatusOr<int32_t> a = router.Route(Keys(2), 9, {}, RequestId(1));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(*a == 0 || *a == 1);
  absl::StatusOr<int32_t> b = router.Route(Keys(2), 9, {*a}, RequestId(2));
  ASSERT_TRUE(b.ok());
  EXPECT_NE(*b, *a);
  EXPECT_EQ(router.Route(Keys(2), 9, {0, 1}, RequestId(3)).status().code(),
            absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace tokenlake::service
