// The coordinator's /healthz and /metrics rendering (coordinator_metrics.h) from hand-made
// snapshots, and its lake gauges against a naive recount.
#include "tokenlake/service/coordinator_metrics.h"

#include <cmath>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/random.h"
#include "tokenlake/base/random_testing.h"

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
  s.members = {Member("a", true), Member("b", true), MemberView{}};
  s.members[0].in_flight = 3;
  s.members[0].used_slots = 2;
  s.members[0].slot_bytes = 100;
  s.segments_on = {5, 0, 0};
  s.tokens_on = {80, 0, 0};
  s.requests.latency = Histogram({0.5, 1}).Read();
  s.requests.requests_by_code = {{200, 7}, {400, 2}};
  s.requests.prompt_tokens = 10;
  s.requests.cached_tokens = 4;
  s.lake_calls[LakeService::kPlanBatch] = 11;
  s.refused_live_name = 1;
  s.reconcile.drops = 6;
  s.routes[Router::kByScheduler] = 12;
  s.routes[Router::kByPlanFallback] = 1;
  s.members[0].load_requests = 4;
  s.members[0].load_context_tokens = 900;
  s.members[0].unreported_routed = 2;
  // Two GPU instances' peer messages: summed over the members.
  s.members[0].traffic.set_locate_messages(3);
  s.members[1].traffic.set_locate_messages(4);
  s.members[0].traffic.set_locate_micros(1500);
  s.members[1].traffic.set_locate_micros(500);
  s.members[0].traffic.set_in_place_read_bytes(1000);
  s.members[1].traffic.set_in_place_read_bytes(24);
  s.members[1].traffic.set_store_messages(2);
  s.members[1].traffic.set_store_micros(250000);
  s.members[0].traffic.set_tail_messages(9);
  s.members[0].traffic.set_fetch_messages(5);
  s.members[1].traffic.set_fetch_messages(1);
  s.members[0].traffic.set_fetched_bytes(4096);
  s.members[1].traffic.set_fetch_micros(3000000);
  const std::string text = CoordinatorMetricsText(s);
  EXPECT_THAT(text,
              HasSubstr("tokenlake_data_plane_bytes_total{kind=\"kv_read_in_place\"} 1024\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_data_plane_peer_messages_total{kind=\"locate\"} 7\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_data_plane_peer_messages_total{kind=\"store\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_data_plane_peer_messages_total{kind=\"tail\"} 9\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_data_plane_peer_seconds_total{kind=\"locate\"} 0.002\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_data_plane_peer_seconds_total{kind=\"store\"} 0.25\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_data_plane_peer_seconds_total{kind=\"tail\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_data_plane_peer_messages_total{kind=\"fetch\"} 6\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_data_plane_peer_seconds_total{kind=\"fetch\"} 3\n"));
  EXPECT_THAT(
      text, HasSubstr("tokenlake_data_plane_bytes_total{kind=\"kv_fetched_host_staging\"} 4096\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_routes_total{rule=\"scheduler\"} 12\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_routes_total{rule=\"plan\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_routes_total{rule=\"plan_fallback\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_routes_total{rule=\"rotate\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_instance_load_requests{instance=\"0\"} 4\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_instance_load_context_tokens{instance=\"0\"} 900\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_instance_load_unreported{instance=\"0\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_requests_total{code=\"200\"} 7\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_requests_total{code=\"400\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_hit_rate 0.4\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_instance_alive{instance=\"0\",name=\"a\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_instance_in_flight{instance=\"0\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_instance_used_bytes{instance=\"0\"} 200\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_instance_segments{instance=\"0\"} 5\n"));
  // An unregistered id has no per-instance samples.
  EXPECT_THAT(text, ::testing::Not(HasSubstr("instance=\"2\"")));
  EXPECT_THAT(text, HasSubstr("tokenlake_lake_rpcs_total{call=\"plan_batch\"} 11\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_refused_total{kind=\"live_name\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("tokenlake_reconcile_total{kind=\"dropped_from_lake\"} 6\n"));
}

// The value of sample `series` (name with its labels) in a metrics text; NaN when absent.
double Sample(const std::string& text, const std::string& series) {
  const size_t pos = text.find("\n" + series + " ");
  if (pos == std::string::npos) return std::nan("");
  return std::stod(text.substr(pos + series.size() + 2));
}

// The lake's gauges on /metrics come from counters the lake keeps as it changes (no walk of the
// tree per scrape); after every one of a random run of commits, evictions, pins, restores, lost
// copies and instances, and rebalances they equal a naive recount over the tree.
TEST(CoordinatorMetricsTest, LakeGaugesEqualANaiveRecountAfterRandomOperations) {
  const uint64_t seed = TestSeed(515);
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  Rng rng(seed);
  constexpr int32_t kInstances = 4;
  ManualClock clock(1);
  lake::LakeOptions o;
  o.num_instances = kInstances;
  o.segment_tokens = 4;
  o.slots_per_instance = 24;
  o.model = {.num_layers = 1, .num_heads = 1, .num_kv_heads = 1, .head_dim = 1, .dtype_bytes = 4};
  o.heavy_hitter.num_instances = kInstances;
  o.heavy_hitter.min_heavy_load = 0;
  auto created = lake::Lake::Create(o, &clock);
  ASSERT_TRUE(created.ok());
  lake::Lake& lake = **created;
  // Document d's segment k: id d * 100 + k + 1; the last one may be a part-segment.
  auto keys = [&](int64_t d, int64_t len) {
    std::vector<index::SegmentKey> out;
    for (int64_t k = 0; k < len; ++k) {
      out.push_back({SegmentId(static_cast<uint64_t>(d * 100 + k + 1)), 4});
    }
    if (d % 3 == 0) out.back().num_tokens = 2;
    return out;
  };
  std::vector<RequestId> pinned;
  uint64_t next_request = 1;
  std::map<std::string, int> done;
  for (int step = 0; step < 1500; ++step) {
    const double dice = rng.UniformDouble();
    const int64_t d = rng.UniformInt(0, 11);
    const InstanceId on(static_cast<int32_t>(rng.UniformInt(0, kInstances - 1)));
    if (dice < 0.4) {
      lake::LakeRequest r{.id = RequestId(next_request++), .keys = keys(d, rng.UniformInt(1, 5))};
      r.new_tokens = 4;
      if (lake.Admit(r).ok()) {
        lake.CommitKeys(r.id, r.keys, on).IgnoreError();
        if (rng.Bernoulli(0.3) && pinned.size() < 6) {
          pinned.push_back(r.id);  // stays pinned a while
        } else {
          ASSERT_TRUE(lake.Release(r.id).ok());
        }
        ++done["commit"];
      }
    } else if (dice < 0.5 && !pinned.empty()) {
      ASSERT_TRUE(lake.Release(pinned.back()).ok());
      pinned.pop_back();
    } else if (dice < 0.6) {
      const std::vector<index::SegmentKey> k = keys(d, rng.UniformInt(1, 5));
      std::vector<lake::HeldSegment> held;
      for (size_t i = 0; i < k.size(); ++i) {
        held.push_back({k[i].id, i == 0 ? SegmentId() : k[i - 1].id, k[i].num_tokens});
      }
      ++done[lake.RestoreReplicas(on, held).ok() ? "restore" : "restore_failed"];
    } else if (dice < 0.7) {
      ++done[lake.DropReplica(keys(d, 5)[rng.UniformInt(0, 4)].id, on).ok() ? "drop" : "no_drop"];
    } else if (dice < 0.75) {
      ++done[lake.LoseReplica(keys(d, 5)[rng.UniformInt(0, 4)].id, on).ok() ? "lose" : "no_lose"];
    } else if (dice < 0.77) {
      ASSERT_TRUE(lake.DropInstance(on).ok());
      ++done["drop_instance"];
    } else if (dice < 0.85) {
      ASSERT_TRUE(lake.Rebalance().ok());
    } else {
      clock.AdvanceUs(rng.UniformInt(0, 20'000));
    }
    // Conservation, the admission counters included (pinned replicas after lost copies).
    ASSERT_TRUE(lake.CheckIntegrity().ok()) << "step " << step << ": " << lake.CheckIntegrity();
    CoordinatorSnapshot s;
    for (int32_t i = 0; i < kInstances; ++i) {
      s.members.push_back(Member(absl::StrCat("i", i), true));
      s.members.back().slot_bytes = 10;
    }
    SetLakeGauges(lake.Stats(), &s);
    const std::string text = CoordinatorMetricsText(s);
    // The naive recount.
    std::vector<int64_t> segments_on(kInstances, 0), tokens_on(kInstances, 0);
    int64_t segments = 0, replicas = 0, pinned_segments = 0;
    lake.prefix_tree().ForEachNode([&](const index::PrefixTree::Node& node) {
      ++segments;
      pinned_segments += node.is_pinned() ? 1 : 0;
      for (InstanceId r : node.replicas) {
        ++replicas;
        ++segments_on[r.value()];
        tokens_on[r.value()] += node.num_tokens;
      }
    });
    ASSERT_EQ(Sample(text, "tokenlake_pool_segments"), segments) << "step " << step;
    ASSERT_EQ(Sample(text, "tokenlake_pool_replicas"), replicas) << "step " << step;
    ASSERT_EQ(Sample(text, "tokenlake_pool_pinned_segments"), pinned_segments) << "step " << step;
    ASSERT_EQ(Sample(text, "tokenlake_pool_bytes"), replicas * 10) << "step " << step;
    for (int32_t i = 0; i < kInstances; ++i) {
      const std::string label = absl::StrCat("{instance=\"", i, "\"}");
      ASSERT_EQ(Sample(text, "tokenlake_instance_segments" + label), segments_on[i])
          << "step " << step << " instance " << i;
      ASSERT_EQ(Sample(text, "tokenlake_instance_tokens" + label), tokens_on[i])
          << "step " << step << " instance " << i;
    }
  }
  for (const auto& [what, n] : done) std::cout << what << "=" << n << " ";
  std::cout << "\n";
  EXPECT_GT(done["commit"], 100);
  EXPECT_GT(done["restore"], 0);
  EXPECT_GT(done["drop"] + done["lose"], 0);
}

}  // namespace
}  // namespace tokenlake::service
