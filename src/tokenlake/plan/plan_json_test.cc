#include "tokenlake/plan/plan_json.h"

#include "gtest/gtest.h"
#include "tokenlake/plan/planner.h"

namespace tokenlake::plan {
namespace {

std::vector<BatchPlan> SamplePlans() {
  auto balancer = *balance::Balancer::Create({});
  auto planner = *Planner::Create({}, balancer.get());
  std::vector<balance::InstanceState> inst;
  for (int i = 0; i < 3; ++i) inst.push_back({InstanceId(i), 4, i == 0 ? 4 : 1, 1.0 * i});
  PlanBatch b;
  b.dop = 2;
  PlanRequest r;
  r.request = RequestId(7);
  r.new_tokens = 3;
  CachedSegment s1{SegmentId(11), 512, {InstanceId(0)}};
  CachedSegment s2{SegmentId(12), 512, {InstanceId(1), InstanceId(2)}};
  CachedSegment s3{SegmentId(13), 3, {InstanceId(2)}};
  r.cached = {s1, s2, s3};
  r.new_segments = {index::SegmentKey{SegmentId(14), 512}};
  b.requests.push_back(r);
  PlanRequest r2 = r;
  r2.request = RequestId(8);
  r2.new_tokens = 4000;
  b.requests.push_back(r2);
  return *planner->GenPlans({b, b}, inst);
}

TEST(PlanJsonTest, RoundTripsExactly) {
  const auto plans = SamplePlans();
  ASSERT_FALSE(plans[0].transfer.transfers.empty());
  const std::string text = SerializePlans(plans);
  auto parsed = ParsePlans(text);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(*parsed, plans);
  EXPECT_EQ(SerializePlans(*parsed), text);
}

TEST(PlanJsonTest, InvalidIdsAreNull) {
  auto plans = SamplePlans();
  const auto j = ToJson(plans[0]);
  bool saw_null_parent = false;
  for (const auto& t : j["transfer"]["transfers"]) {
    if (t["kind"] == "queries") {
      EXPECT_TRUE(t["segment"].is_null());
    }
  }
  for (const auto& n : j["transfer"]["new_segments"]) saw_null_parent |= !n["parent"].is_null();
  EXPECT_TRUE(saw_null_parent);
}

TEST(PlanJsonTest, MalformedInputIsAnErrorSayingWhere) {
  EXPECT_FALSE(ParsePlans("not json").ok());
  EXPECT_FALSE(ParsePlans("{}").ok());
  auto j = ToJson(SamplePlans()[0]);
  j["requests"][0]["segments"][1]["action"] = "teleport";
  auto r = ParsePlans(nlohmann::json::array({j}).dump());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("requests[0].segments[1]"), std::string::npos) << r.status();
  j = ToJson(SamplePlans()[0]);
  j["transfer"].erase("total_bytes");
  r = ParsePlans(nlohmann::json::array({j}).dump());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("total_bytes"), std::string::npos);
  j = ToJson(SamplePlans()[0]);
  j["dop"] = 1e30;  // not an integer
  EXPECT_FALSE(ParsePlans(nlohmann::json::array({j}).dump()).ok());
  j = ToJson(SamplePlans()[0]);
  j["dop"] = 1LL << 40;  // out of range for int32
  EXPECT_FALSE(ParsePlans(nlohmann::json::array({j}).dump()).ok());
}

}  // namespace
}  // namespace tokenlake::plan
