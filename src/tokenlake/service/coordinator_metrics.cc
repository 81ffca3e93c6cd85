#include "tokenlake/service/coordinator_metrics.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "tokenlake/service/metrics.h"

namespace tokenlake::service {

void SetLakeGauges(lake::LakeStats stats, CoordinatorSnapshot* s) {
  s->segments_on.clear();
  s->tokens_on.clear();
  for (const lake::InstanceStats& i : stats.instances) {
    s->segments_on.push_back(i.used_slots);
    s->tokens_on.push_back(i.tokens);
  }
  s->lake = std::move(stats);
}

std::string CoordinatorMetricsText(const CoordinatorSnapshot& s) {
  PrometheusWriter w;
  const RequestPath::Stats& r = s.requests;
  const int32_t n = static_cast<int32_t>(s.members.size());
  w.Family("tokenlake_requests_total", "counter", "Completion requests by HTTP status.");
  for (const auto& [code, count] : r.requests_by_code) {
    w.Sample("tokenlake_requests_total", {{"code", absl::StrCat(code)}},
             static_cast<double>(count));
  }
  w.Family("tokenlake_request_latency_seconds", "histogram",
           "Latency of completion requests routed to instances.");
  w.HistogramSamples("tokenlake_request_latency_seconds", {}, r.latency);
  w.Family("tokenlake_prompt_tokens_total", "counter", "Prompt tokens of served requests.");
  w.Sample("tokenlake_prompt_tokens_total", {}, static_cast<double>(r.prompt_tokens));
  w.Family("tokenlake_cached_tokens_total", "counter", "Prompt tokens served from the pool.");
  w.Sample("tokenlake_cached_tokens_total", {}, static_cast<double>(r.cached_tokens));
  w.Family("tokenlake_generated_tokens_total", "counter", "Tokens generated.");
  w.Sample("tokenlake_generated_tokens_total", {}, static_cast<double>(r.generated_tokens));
  w.Family("tokenlake_hit_rate", "gauge", "cached_tokens_total / prompt_tokens_total.");
  w.Sample("tokenlake_hit_rate", {},
           r.prompt_tokens > 0 ? static_cast<double>(r.cached_tokens) / r.prompt_tokens : 0.0);
  w.Family("tokenlake_lake_hit_rate", "gauge",
           "The lake's hit rate: cached / prompt tokens over admitted prefills.");
  w.Sample("tokenlake_lake_hit_rate", {}, s.lake.hit_rate);
  w.Family("tokenlake_pool_segments", "gauge", "Distinct segments in the lake's prefix tree.");
  w.Sample("tokenlake_pool_segments", {}, static_cast<double>(s.lake.segments));
  w.Family("tokenlake_pool_replicas", "gauge", "Stored segment copies in the lake.");
  w.Sample("tokenlake_pool_replicas", {}, static_cast<double>(s.lake.replicas));
  w.Family("tokenlake_pool_heavy_hitters", "gauge",
           "Segments the lake counted as heavy at its latest rebalance.");
  w.Sample("tokenlake_pool_heavy_hitters", {}, static_cast<double>(s.lake.heavy_hitters));
  w.Family("tokenlake_pool_pinned_segments", "gauge", "Segments pinned by running iterations.");
  w.Sample("tokenlake_pool_pinned_segments", {}, static_cast<double>(s.lake.pinned_segments));
  w.Family("tokenlake_pool_reserved_slots", "gauge",
           "Slots the lake reserves for admitted requests' segments not yet committed.");
  w.Sample("tokenlake_pool_reserved_slots", {}, static_cast<double>(s.lake.reserved_slots));
  w.Family("tokenlake_pool_tail_slots", "gauge",
           "Slots held by running requests' KV tails (rows not yet in pooled segments).");
  w.Sample("tokenlake_pool_tail_slots", {}, static_cast<double>(s.lake.tail_slots));
  w.Family("tokenlake_pool_pending_copies", "gauge",
           "Copies placed by commits whose store the engine has not confirmed yet (no plan reads "
           "them).");
  w.Sample("tokenlake_pool_pending_copies", {}, static_cast<double>(s.lake.pending_copies));
  w.Family("tokenlake_pool_confirmed_copies_total", "counter",
           "Pending copies the engines confirmed stored (then visible to plans).");
  w.Sample("tokenlake_pool_confirmed_copies_total", {},
           static_cast<double>(s.lake.confirmed_copies));
  w.Family("tokenlake_pool_dropped_pending_copies_total", "counter",
           "Pending copies dropped unconfirmed when their request was released.");
  w.Sample("tokenlake_pool_dropped_pending_copies_total", {},
           static_cast<double>(s.lake.dropped_pending_copies));
  w.Family("tokenlake_requests_cancelled_total", "counter",
           "Requests ended early by their client (disconnected, or a stop sequence matched).");
  w.Sample("tokenlake_requests_cancelled_total", {},
           static_cast<double>(s.requests.cancelled_requests));
  w.Family("tokenlake_lake_active_requests", "gauge",
           "Requests admitted in the lake (an iteration planned and not yet released).");
  w.Sample("tokenlake_lake_active_requests", {}, static_cast<double>(s.lake.active_requests));
  int64_t slot_bytes = 0;
  for (const MemberView& m : s.members) slot_bytes = std::max(slot_bytes, m.slot_bytes);
  w.Family("tokenlake_pool_bytes", "gauge",
           "KV bytes held in the pool (the lake's replicas x slot bytes).");
  w.Sample("tokenlake_pool_bytes", {}, static_cast<double>(s.lake.replicas * slot_bytes));
  w.Family("tokenlake_instance_alive", "gauge", "1 if the instance is alive.");
  for (int32_t i = 0; i < n; ++i) {
    const MemberView& m = s.members[static_cast<size_t>(i)];
    if (!m.registered) continue;
    w.Sample("tokenlake_instance_alive", {{"instance", absl::StrCat(i)}, {"name", m.name}},
             m.alive ? 1 : 0);
  }
  auto per_instance = [&](const char* name, const char* type, const char* help, auto value) {
    w.Family(name, type, help);
    for (int32_t i = 0; i < n; ++i) {
      if (!s.members[static_cast<size_t>(i)].registered) continue;
      w.Sample(name, {{"instance", absl::StrCat(i)}}, static_cast<double>(value(i)));
    }
  };
  auto on = [](const std::vector<int64_t>& v, int32_t i) {
    return i < static_cast<int32_t>(v.size()) ? v[static_cast<size_t>(i)] : 0;
  };
  auto member = [&](int32_t i) -> const MemberView& { return s.members[static_cast<size_t>(i)]; };
  per_instance("tokenlake_instance_segments", "gauge",
               "Segment replicas the lake lists per instance.",
               [&](int32_t i) { return on(s.segments_on, i); });
  per_instance("tokenlake_instance_tokens", "gauge", "Cached tokens the lake lists per instance.",
               [&](int32_t i) { return on(s.tokens_on, i); });
  per_instance("tokenlake_instance_rebalance_copies_total", "counter",
               "Segments the instance copied for rebalancing (this incarnation).",
               [&](int32_t i) { return member(i).traffic.rebalance_copies(); });
  per_instance("tokenlake_instance_used_bytes", "gauge", "KV bytes held per instance.",
               [&](int32_t i) { return member(i).used_slots * member(i).slot_bytes; });
  per_instance("tokenlake_instance_in_flight", "gauge", "Requests in flight per instance.",
               [&](int32_t i) { return member(i).in_flight; });
  per_instance("tokenlake_instance_cancelled_total", "counter",
               "Requests cancelled on the instance (this incarnation).",
               [&](int32_t i) { return member(i).cancelled; });
  per_instance("tokenlake_instance_running", "gauge",
               "Requests running in the instance's engine (as last reported).",
               [&](int32_t i) { return member(i).running; });
  per_instance("tokenlake_instance_routed_total", "counter", "Requests routed per instance.",
               [&](int32_t i) { return member(i).routed; });
  per_instance("tokenlake_instance_load_requests", "gauge",
               "Requests the instance runs or will run, as routing sees them (its latest load "
               "report plus the requests routed to it since).",
               [&](int32_t i) { return member(i).load_requests; });
  per_instance("tokenlake_instance_load_context_tokens", "gauge",
               "Their decode context, tokens (as routing sees it).",
               [&](int32_t i) { return member(i).load_context_tokens; });
  per_instance("tokenlake_instance_load_unreported", "gauge",
               "Requests routed to the instance that its latest load report does not list yet.",
               [&](int32_t i) { return member(i).unreported_routed; });
  w.Family("tokenlake_transport_bytes_sent_total", "counter",
           "Bytes the coordinator sent to instances over the host transport.");
  w.Sample("tokenlake_transport_bytes_sent_total", {}, static_cast<double>(r.bytes_sent));
  w.Family("tokenlake_transport_bytes_received_total", "counter",
           "Bytes the coordinator received from instances over the host transport.");
  w.Sample("tokenlake_transport_bytes_received_total", {}, static_cast<double>(r.bytes_received));
  w.Family("tokenlake_failovers_total", "counter", "Request attempts after the first.");
  w.Sample("tokenlake_failovers_total", {}, static_cast<double>(r.failovers));
  w.Family("tokenlake_instance_deaths_total", "counter", "Instances declared dead.");
  w.Sample("tokenlake_instance_deaths_total", {}, static_cast<double>(s.deaths));
  w.Family("tokenlake_instance_rejoins_total", "counter",
           "Registrations of an instance name already known (restarts).");
  w.Sample("tokenlake_instance_rejoins_total", {}, static_cast<double>(s.rejoins));
  w.Family("tokenlake_remote_attend_calls_total", "counter",
           "Attend calls a computing instance sent to another instance (queries moved).");
  w.Sample("tokenlake_remote_attend_calls_total", {}, static_cast<double>(r.remote_attend_calls));
  w.Family("tokenlake_data_plane_bytes_total", "counter",
           "Bytes moved between instances by served requests and rebalancing, by kind.");
  const std::pair<const char*, int64_t> kinds[] = {{"query_out", r.query_bytes_out},
                                                   {"partial_back", r.partial_bytes_back},
                                                   {"kv_pulled", r.pulled_bytes},
                                                   {"kv_stored_remote", r.remote_stored_bytes}};
  for (const auto& [kind, value] : kinds) {
    w.Sample("tokenlake_data_plane_bytes_total", {{"kind", kind}}, static_cast<double>(value));
  }
  int64_t rebalance_bytes = 0;
  for (const MemberView& m : s.members) rebalance_bytes += m.traffic.rebalance_copy_bytes();
  w.Sample("tokenlake_data_plane_bytes_total", {{"kind", "rebalance_copy"}},
           static_cast<double>(rebalance_bytes));
  // GPU instances' messages to their peers (each instance's totals since it registered):
  // locate rounds, after which the kernels read the peers' slots in place; stores the peer
  // copies; tail slots kept on a peer; fetches of peers reached through host staging.
  int64_t in_place = 0;
  int64_t fetched = 0;
  int64_t messages[4] = {0, 0, 0, 0};
  int64_t micros[4] = {0, 0, 0, 0};
  for (const MemberView& m : s.members) {
    const v1::InstanceTraffic& t = m.traffic;
    in_place += t.in_place_read_bytes();
    fetched += t.fetched_bytes();
    messages[0] += t.locate_messages();
    messages[1] += t.store_messages();
    messages[2] += t.tail_messages();
    messages[3] += t.fetch_messages();
    micros[0] += t.locate_micros();
    micros[1] += t.store_micros();
    micros[2] += t.tail_micros();
    micros[3] += t.fetch_micros();
  }
  w.Sample("tokenlake_data_plane_bytes_total", {{"kind", "kv_read_in_place"}},
           static_cast<double>(in_place));
  w.Sample("tokenlake_data_plane_bytes_total", {{"kind", "kv_fetched_host_staging"}},
           static_cast<double>(fetched));
  const char* const peer_kinds[4] = {"locate", "store", "tail", "fetch"};
  w.Family("tokenlake_data_plane_peer_messages_total", "counter",
           "Messages GPU instances sent to their peers, by kind.");
  for (int k = 0; k < 4; ++k) {
    w.Sample("tokenlake_data_plane_peer_messages_total", {{"kind", peer_kinds[k]}},
             static_cast<double>(messages[k]));
  }
  w.Family("tokenlake_data_plane_peer_seconds_total", "counter",
           "Wall time of those messages, request to reply, by kind.");
  for (int k = 0; k < 4; ++k) {
    w.Sample("tokenlake_data_plane_peer_seconds_total", {{"kind", peer_kinds[k]}},
             static_cast<double>(micros[k]) / 1e6);
  }
  w.Family("tokenlake_kv_pulled_segments_total", "counter", "Segments pulled by requests.");
  w.Sample("tokenlake_kv_pulled_segments_total", {}, static_cast<double>(r.pulled_segments));
  w.Family("tokenlake_kv_stored_remote_segments_total", "counter",
           "New segments stored on another instance than their computing one.");
  w.Sample("tokenlake_kv_stored_remote_segments_total", {},
           static_cast<double>(r.remote_stored_segments));
  w.Family("tokenlake_lake_plan_iterations_total", "counter",
           "Iterations planned by the lake for the instances' engines.");
  w.Sample("tokenlake_lake_plan_iterations_total", {}, static_cast<double>(s.plan_iterations));
  w.Family("tokenlake_lake_rpcs_total", "counter",
           "Lake RPCs served to the instances' engines, by call (one iteration makes one "
           "PlanIteration or ReleaseAndPlan; the last one a Release; Commit only when the "
           "iteration completed a segment).");
  const std::pair<const char*, LakeService::Call> calls[] = {
      {"plan_iteration", LakeService::kPlanIteration},
      {"release_and_plan", LakeService::kReleaseAndPlan},
      {"plan_batch", LakeService::kPlanBatch},
      {"commit", LakeService::kCommit},
      {"release", LakeService::kRelease},
      {"release_tail", LakeService::kReleaseTail}};
  for (const auto& [call, rpc] : calls) {
    w.Sample("tokenlake_lake_rpcs_total", {{"call", call}}, static_cast<double>(s.lake_calls[rpc]));
  }
  w.Family("tokenlake_refused_total", "counter",
           "Calls refused: without a valid cluster call token, and registrations under a live "
           "member's name.");
  w.Sample("tokenlake_refused_total", {{"kind", "unauthenticated"}},
           static_cast<double>(s.refused_unauthenticated));
  w.Sample("tokenlake_refused_total", {{"kind", "live_name"}},
           static_cast<double>(s.refused_live_name));
  w.Family("tokenlake_rebalance_actions_total", "counter",
           "Rebalance actions sent to instances (replicate, move, drop).");
  w.Sample("tokenlake_rebalance_actions_total", {}, static_cast<double>(s.rebalance_actions));
  w.Family("tokenlake_routing_overrides_total", "counter",
           "Requests not computed where the lake's plan said (instance not live or too busy).");
  w.Sample("tokenlake_routing_overrides_total", {}, static_cast<double>(s.routing_overrides));
  w.Family("tokenlake_routes_total", "counter",
           "Requests routed, by the way their instance was chosen: the elastic scheduler's decode "
           "placement, the lake's plan (the plan rule, or the scheduler finding no instance), "
           "rotation.");
  for (int d = 0; d < Router::kNumDecisions; ++d) {
    w.Sample("tokenlake_routes_total",
             {{"rule", Router::DecisionName(static_cast<Router::Decision>(d))}},
             static_cast<double>(s.routes[static_cast<size_t>(d)]));
  }
  w.Family("tokenlake_reconcile_total", "counter",
           "Heartbeat reconciliation: segments freed on instances (the lake did not list them), "
           "replicas dropped from the lake (the instance did not hold them), replicas restored.");
  w.Sample("tokenlake_reconcile_total", {{"kind", "freed_on_instance"}},
           static_cast<double>(s.reconcile.frees));
  w.Sample("tokenlake_reconcile_total", {{"kind", "dropped_from_lake"}},
           static_cast<double>(s.reconcile.drops));
  w.Sample("tokenlake_reconcile_total", {{"kind", "restored"}},
           static_cast<double>(s.reconcile.restored));
  w.Family("tokenlake_reconcile_reports_total", "counter",
           "Instance holdings reports taken, by kind: full lists, change sets, change sets that "
           "found a gap (a full report was asked for), late ones (ignored).");
  const std::pair<const char*, int64_t> reports[] = {{"full", s.reconcile.full_reports},
                                                     {"changes", s.reconcile.change_reports},
                                                     {"gap", s.reconcile.gaps},
                                                     {"late", s.reconcile.late_reports}};
  for (const auto& [kind, count] : reports) {
    w.Sample("tokenlake_reconcile_reports_total", {{"kind", kind}}, static_cast<double>(count));
  }
  w.Family("tokenlake_reconcile_changes_total", "counter",
           "Changes of instance holdings applied to the coordinator's view.");
  w.Sample("tokenlake_reconcile_changes_total", {},
           static_cast<double>(s.reconcile.changes_applied));
  w.Family("tokenlake_reconcile_lock_hold_seconds", "histogram",
           "Holds of the lake's lock (which plans need) by instance reports.");
  w.HistogramSamples("tokenlake_reconcile_lock_hold_seconds", {}, s.reconcile.lock_holds);
  w.Family("tokenlake_reconcile_longest_lock_hold_seconds", "gauge",
           "The longest single hold of the lake's lock by an instance report (since start).");
  w.Sample("tokenlake_reconcile_longest_lock_hold_seconds", {}, s.reconcile.longest_lock_hold_s);
  w.Family("tokenlake_rebalance_redirects_total", "counter",
           "Planned reads of a rebalance copy not yet confirmed, served by its source instead.");
  w.Sample("tokenlake_rebalance_redirects_total", {}, static_cast<double>(s.reconcile.redirects));
  w.Family("tokenlake_http_connections", "gauge", "Connections open on the HTTP front end.");
  w.Sample("tokenlake_http_connections", {}, static_cast<double>(s.http.connections));
  w.Family("tokenlake_http_rejected_total", "counter",
           "Answers the HTTP front end gave itself, by status (bad framing, size limits, "
           "timeouts, unknown endpoints, overload).");
  for (const auto& [code, count] : s.http.rejected) {
    w.Sample("tokenlake_http_rejected_total", {{"code", absl::StrCat(code)}},
             static_cast<double>(count));
  }
  w.Family("tokenlake_http_connections_refused_total", "counter",
           "Connections closed at once: past the connection limit and its overflow allowance.");
  w.Sample("tokenlake_http_connections_refused_total", {},
           static_cast<double>(s.http.connections_refused));
  w.Family("tokenlake_grpc_connections_total", "counter",
           "Connections to the gRPC port, by outcome: handed to the gRPC server after a gRPC "
           "client's first bytes (admitted) or after none came in time (silent), closed because "
           "their first bytes were not a gRPC client's, because only part came in time or too "
           "many waited (timed_out), or because new connections came faster than the server "
           "takes them.");
  const std::pair<const char*, int64_t> grpc_outcomes[] = {
      {"admitted", s.grpc_connections.admitted},
      {"not_grpc", s.grpc_connections.not_grpc},
      {"timed_out", s.grpc_connections.timed_out},
      {"silent", s.grpc_connections.silent},
      {"over_rate", s.grpc_connections.over_rate}};
  for (const auto& [outcome, count] : grpc_outcomes) {
    w.Sample("tokenlake_grpc_connections_total", {{"outcome", outcome}},
             static_cast<double>(count));
  }
  return w.text();
}

HealthReport CoordinatorHealth(const std::vector<MemberView>& members,
                               const absl::Status& own_transport) {
  nlohmann::json problems = nlohmann::json::array();
  if (!own_transport.ok())
    problems.push_back(absl::StrCat("coordinator: ", own_transport.message()));
  int32_t live = 0;
  for (size_t i = 0; i < members.size(); ++i) {
    const MemberView& m = members[i];
    live += m.ready ? 1 : 0;
    if (m.registered && m.alive && !m.transport_error.empty()) {
      problems.push_back(absl::StrFormat("instance %d ('%s'): %s", i, m.name, m.transport_error));
    }
  }
  const bool serving = live > 0 && own_transport.ok();
  HealthReport r;
  r.http_status = serving ? 200 : 503;
  nlohmann::json j = {{"status", !serving ? (live > 0 ? "unhealthy" : "no live instance")
                                          : (problems.empty() ? "ok" : "degraded")},
                      {"live_instances", live}};
  if (!problems.empty()) j["problems"] = problems;
  r.json = j.dump();
  return r;
}

}  // namespace tokenlake::service
