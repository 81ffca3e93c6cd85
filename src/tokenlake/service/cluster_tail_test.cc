// The KV tails in the pool (lake.h, "Tails in the pool") of the requests that an instance
// process computed, when that process is gone: nobody else would ever give them back, so the
// coordinator does (Lake::ReleaseTailsComputedOn) once another process registers in its place.
// A coordinator and two instance servers in one process, with real gRPC; the tails are planned
// through the coordinator's Lake service as a GPU instance's engine plans them.
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tokenlake/lake/control_plane.h"
#include "tokenlake/service/cluster_inprocess_fixture.h"
#include "tokenlake/service/lake_rpc.h"

namespace tokenlake::service {
namespace {

// The value of the sample `name` (with its labels, if any) in the coordinator's /metrics text.
double Sample(const std::string& text, const std::string& name) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, name) || !absl::ConsumePrefix(&line, " ")) continue;
    double v = 0;
    if (absl::SimpleAtod(line, &v)) return v;
  }
  return -1;
}

TEST_F(InProcessClusterTest, TailsOfADeadInstanceGoBackWhenAnotherProcessTakesItsPlace) {
  auto cp = RemoteControlPlane::Create({.coordinator_port = coordinator_->grpc_port(),
                                        .num_instances = 2,
                                        .cluster_secret = secret_});
  ASSERT_TRUE(cp.ok()) << cp.status();
  // Two requests of 40 rows each (3 blocks of 16) whose engines prefer different instances.
  std::vector<lake::IterationRequest> requests;
  requests.reserve(2);
  for (int32_t i = 0; i < 2; ++i) {
    requests.push_back({.request = RequestId(0x7a11'0000 + i),
                        .end_tokens = 40,
                        .preferred_instance = InstanceId(i),
                        .try_admit = true,
                        .tail_in_pool = true});
  }
  auto planned = (*cp)->PlanBatch({}, {}, requests, /*token_budget=*/0);
  ASSERT_TRUE(planned.ok()) << planned.status();
  ASSERT_EQ(planned->size(), 2u);
  std::vector<int32_t> computing;
  computing.reserve(planned->size());
  for (const lake::BatchPlanEntry& e : *planned) {
    ASSERT_TRUE(e.status.ok()) << e.status;
    ASSERT_TRUE(e.plan.admitted);
    ASSERT_EQ(e.plan.tail_slots.size(), 3u);
    computing.push_back(e.plan.compute_instance.value());
  }
  // Both attempts end (their pins go); the tails outlive Release, as a running request's do.
  for (const lake::IterationRequest& r : requests) ASSERT_TRUE((*cp)->Release(r.request).ok());
  const std::string tails = "tokenlake_pool_tail_slots";
  ASSERT_EQ(Sample(coordinator_->MetricsText(), tails), 6);

  // The process that computed the first request dies without a word. Declared dead, it keeps
  // them (a process that still ran could still write them); once another process takes its
  // place, they go.
  const int32_t dead = computing[0];
  const int survivors = computing[1] == dead ? 0 : 3;
  instances_[static_cast<size_t>(dead)]->Shutdown();
  WaitForLive(1);
  EXPECT_EQ(Sample(coordinator_->MetricsText(), tails), 6);
  ASSERT_NO_FATAL_FAILURE(StartInstance(dead));
  WaitForLive(2);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (Sample(coordinator_->MetricsText(), tails) != survivors && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(Sample(coordinator_->MetricsText(), tails), survivors);
  // The survivor's request still holds its tail and ends it itself.
  if (survivors > 0) {
    EXPECT_TRUE((*cp)->ReleaseTail(requests[1].request).ok());
  }
  EXPECT_EQ(Sample(coordinator_->MetricsText(), tails), 0);
}

}  // namespace
}  // namespace tokenlake::service
