// The coordinator's /healthz and /metrics rendering (coordinator_metrics.h) from hand-made
// snapshots.
#include "tokenlake/service/coordinator_metrics.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;

MemberView Member(const std::string& name, bool ready, const std::string& error = "") {
  MemberView m;
  m.name = name;
  m.registered = m.alive = true;
  m.ready = m.routable = ready;
  m.transport_error = error;
  return m;
}

TEST(CoordinatorHealthTest, OkDegradedAndUnavailable) {
  HealthReport h = CoordinatorHealth({Member("a", true), Member("b", true)}, absl::OkStatus());
  EXPECT_EQ(h.http_status, 200);
  EXPECT_EQ(nlohmann::json::parse(h.json),
            nlohmann::json::parse(R"({"status": "ok", "live_instances": 2})"));

  h = CoordinatorHealth({Member("a", true), Member("b", false, "cannot accept: EMFILE")},
                        absl::OkStatus());
  EXPECT_EQ(h.http_status, 200);
  EXPECT_EQ(nlohmann::json::parse(h.json),
            nlohmann::json::parse(R"({"status": "degraded", "live_instances": 1,
                                      "problems": ["instance 1 ('b'): cannot accept: EMFILE"]})"));

  h = CoordinatorHealth({Member("a", false), MemberView{}}, absl::OkStatus());
  EXPECT_EQ(h.http_status, 503);
  EXPECT_EQ(nlohmann::json::parse(h.json)["status"], "no live instance");

  h = CoordinatorHealth({Member("a", true)}, absl::UnavailableError("cannot dial"));
  EXPECT_EQ(h.http_status, 503);
  EXPECT_EQ(nlohmann::json::parse(h.json),
            nlohmann::json::parse(R"({"status": "unhealthy", "live_instances": 1,
                                      "problems": ["coordinator: cannot dial"]})"));
}

TEST(CoordinatorMetricsTest, RendersCountersOfEveryPart) {
  CoordinatorSnapshot s;
  s.members = {Member("a", true), MemberView{}};
  s.members[0].in_flight = 3;
  s.members[0].used_slots = 2;
  s.members[0].slot_bytes = 100;
  s.segments_on = {5, 0};
  s.tokens_on = {80, 0};
  s.requests.latency = Histogram({0.5, 1}).Read();
  s.requests.requests_by_code = {{200, 7}, {400, 2}};
  s.requests.prompt_tokens = 10;
  s.requests.cached_tokens = 4;
  s.lake_calls[LakeService::kPlanBatch] = 11;
  s.refused_live_name = 1;
  s.reconcile.drops = 6;
  const std::string text = CoordinatorMetricsText(s);
  EXPECT_THAT(text, HasSubstr("tokenlake_requests_total{code=\"200\"} 7\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_requests_total{code=\"400\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_hit_rate 0.4\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_instance_alive{instance=\"0\",name=\"a\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_instance_in_flight{instance=\"0\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_instance_used_bytes{instance=\"0\"} 200\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_instance_segments{instance=\"0\"} 5\n"));
  // An unregistered id has no per-instance samples.
  EXPECT_THAT(text, ::testing::Not(HasSubstr("instance=\"1\"")));
  EXPECT_THAT(text, HasSubstr("tokenlake_lake_rpcs_total{call=\"plan_batch\"} 11\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_refused_total{kind=\"live_name\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_reconcile_total{kind=\"dropped_from_lake\"} 6\n"));
}

}  // namespace
}  // namespace tokenlake::service
