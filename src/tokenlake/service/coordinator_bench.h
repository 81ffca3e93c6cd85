// `tokenlake bench coordinator`: a real Coordinator (in this process, over its real gRPC on
// loopback, with a cluster secret) driven by simulated instances and engines, to measure how
// fast it plans while it reconciles.
//
// Setup: `instances` simulated instances register over gRPC, each with everything it holds: the
// pool of about `segments` segments is made of documents of 256 segments (16 tokens each),
// document d held whole by instance d mod instances, so the coordinator rebuilds its prefix tree
// from the reports (restore_s). Each simulated instance keeps its holdings and their numbered
// changes (store/segment_change_log.h) and reports them as a real instance does
// (holdings_report.h).
//
// Workload: `plan_clients` threads act as engines: each makes PlanBatch calls (one engine
// iteration: the previous batch's releases, then `batch_requests` prefills, each a random
// prefix of a random document plus one new segment) through RemoteControlPlane, as instances
// do, then Commits each request's new segment; the stores and evictions that the commits report
// are applied to the simulated instances that hold them (as their data planes would), so the
// instances' changes follow the lake's. Two phases of `seconds` each, after a warm-up:
//   1. without reconciliation: the instances are silent;
//   2. with reconciliation: every instance heartbeats every heartbeat_interval with its changes
//      since its acknowledged report (every full_report_every-th heartbeat a full one), frees
//      what the coordinator asks.
// Per phase: plans per second (PlanBatch calls; requests = plans x batch_requests) and the
// latency of each PlanBatch call as its caller sees it (p50, p99, max). Also: heartbeat
// latencies, the reports the coordinator took, and the time of a /metrics rendering with the
// whole pool.
//
// Thread-safety: RunCoordinatorBench is a blocking call; it starts and joins its own threads.
#ifndef TOKENLAKE_SERVICE_COORDINATOR_BENCH_H_
#define TOKENLAKE_SERVICE_COORDINATOR_BENCH_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace tokenlake::service {

struct CoordinatorBenchOptions {
  // Simulated instances, in [1, kMaxInstances].
  int32_t instances = 64;
  // About this many segments in the pool at the start (>= 256 x instances is rounded up to one
  // document per instance).
  int64_t segments = int64_t{1} << 20;
  // Length of each measured phase, and of the warm-up before them (> 0, >= 0).
  absl::Duration phase = absl::Seconds(5);
  absl::Duration warmup = absl::Seconds(1);
  // Engines planning concurrently, and requests per PlanBatch call (>= 1).
  int32_t plan_clients = 2;
  int32_t batch_requests = 4;
  // The instances' heartbeat period (the coordinator asks for it), and every how many
  // heartbeats an instance sends a full report (0: only when asked).
  absl::Duration heartbeat_interval = absl::Milliseconds(200);
  int32_t full_report_every = 50;
  // Seed of the request mix.
  uint64_t seed = 1;
};

// Runs the benchmark; `progress` (may be null) gets a line per stage. Returns the figures as JSON
// (keys: plans_per_s, plans_per_s_with_reconcile, plan_p99_ms, plan_p99_ms_with_reconcile, and
// more; the options under "options"). Errors: InvalidArgument naming a bad option; the
// coordinator's or a call's error when the setup fails.
absl::StatusOr<nlohmann::json> RunCoordinatorBench(
    const CoordinatorBenchOptions& options,
    const std::function<void(const std::string&)>& progress);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_COORDINATOR_BENCH_H_
