// The coordinator's /metrics page (Prometheus text) and /healthz answer, rendered from a
// snapshot of its parts' counters, so that the rendering is tested apart from a running
// coordinator.
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_SERVICE_COORDINATOR_METRICS_H_
#define TOKENLAKE_SERVICE_COORDINATOR_METRICS_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/service/grpc_listener.h"
#include "tokenlake/service/http_front_end.h"
#include "tokenlake/service/lake_service.h"
#include "tokenlake/service/membership.h"
#include "tokenlake/service/reconciler.h"
#include "tokenlake/service/request_path.h"
#include "tokenlake/service/router.h"

namespace tokenlake::service {

struct CoordinatorSnapshot {
  lake::LakeStats lake;
  // Per instance id (size = the lake's instances): replicas and tokens the lake lists on it.
  std::vector<int64_t> segments_on;
  std::vector<int64_t> tokens_on;
  // Per instance id (Membership::Snapshot).
  std::vector<MemberView> members;
  int64_t deaths = 0;
  int64_t rejoins = 0;
  RequestPath::Stats requests;
  std::array<int64_t, LakeService::kNumCalls> lake_calls{};
  int64_t plan_iterations = 0;
  int64_t refused_unauthenticated = 0;
  int64_t refused_live_name = 0;
  int64_t rebalance_actions = 0;
  int64_t routing_overrides = 0;
  // Routes by the way they were decided (Router::Decision).
  std::array<int64_t, Router::kNumDecisions> routes{};
  Reconciler::Stats reconcile;
  HttpFrontEnd::Stats http;
  GrpcListener::Stats grpc_connections;
};

// Fills the snapshot's lake gauges (lake, segments_on, tokens_on) from the lake's counters.
void SetLakeGauges(lake::LakeStats stats, CoordinatorSnapshot* s);

// The /metrics page (docs/results-service.md lists the families).
std::string CoordinatorMetricsText(const CoordinatorSnapshot& s);

// GET /healthz: 200 "ok" when every registered instance is live and healthy and the
// coordinator's own transport works (`own_transport` OK); 200 "degraded" (naming the problems)
// when some are not but one can serve; 503 when none can (or the coordinator cannot reach
// instances).
struct HealthReport {
  int http_status = 200;
  std::string json;
};
HealthReport CoordinatorHealth(const std::vector<MemberView>& members,
                               const absl::Status& own_transport);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_COORDINATOR_METRICS_H_
