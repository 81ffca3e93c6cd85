#include "tokenlake/service/coordinator_bench.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "tokenlake/base/hash.h"
#include "tokenlake/base/random.h"
#include "tokenlake/service/call_auth.h"
#include "tokenlake/service/coordinator.h"
#include "tokenlake/service/holdings_report.h"
#include "tokenlake/service/lake_rpc.h"
#include "tokenlake/service/protocol.h"
#include "tokenlake/store/segment_change_log.h"
#include "tokenlake/transport/cluster_secret.h"
#include "tokenlake/v1/tokenlake.grpc.pb.h"

namespace tokenlake::service {
namespace {

constexpr int32_t kSegmentTokens = 16;
constexpr int32_t kDocSegments = 256;

uint64_t DocSegment(int64_t doc, int32_t k) {
  return HashCombine(HashCombine(0xc00d, static_cast<uint64_t>(doc)), static_cast<uint64_t>(k));
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

double MsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// A simulated instance: what it holds, its numbered changes (its data plane's store), and its
// side of the membership protocol.
class SimInstance final : public HoldingsSource {
 public:
  SimInstance() : log_(int64_t{1} << 22) {}

  uint64_t Snapshot(std::vector<lake::HeldSegment>* held) const override {
    absl::MutexLock lock(&mu_);
    held->reserve(held_.size());
    for (const auto& [id, h] : held_) held->push_back({id, h.parent, h.num_tokens});
    return log_.last();
  }
  std::optional<std::vector<store::SegmentChange>> ChangesSince(uint64_t from) const override {
    absl::MutexLock lock(&mu_);
    return log_.Since(from);
  }
  void Forget(uint64_t through) override {
    absl::MutexLock lock(&mu_);
    log_.Trim(through);
  }

  void Store(SegmentId id, SegmentId parent, int32_t num_tokens) {
    absl::MutexLock lock(&mu_);
    const uint64_t g =
        log_.Record({.id = id, .stored = true, .parent = parent, .num_tokens = num_tokens});
    held_[id] = Held{.parent = parent, .num_tokens = num_tokens, .generation = g};
  }
  void Free(SegmentId id) {
    absl::MutexLock lock(&mu_);
    if (held_.erase(id) > 0) log_.Record({.id = id, .stored = false});
  }
  // engine::InstancePool::FreeIfUnchangedSince.
  bool FreeIfUnchangedSince(SegmentId id, uint64_t generation) {
    absl::MutexLock lock(&mu_);
    auto it = held_.find(id);
    if (it == held_.end() || it->second.generation > generation) return false;
    held_.erase(it);
    log_.Record({.id = id, .stored = false});
    return true;
  }

  // The membership side (its heartbeat thread's, after registration).
  int32_t id = -1;
  uint64_t epoch = 0;
  std::unique_ptr<HoldingsReporter> reporter;
  std::unique_ptr<v1::Coordinator::Stub> stub;

 private:
  struct Held {
    SegmentId parent;
    int32_t num_tokens = 0;
    uint64_t generation = 0;
  };
  mutable absl::Mutex mu_;
  absl::flat_hash_map<SegmentId, Held> held_ ABSL_GUARDED_BY(mu_);
  store::SegmentChangeLog log_ ABSL_GUARDED_BY(mu_);
};

absl::Status CheckOptions(const CoordinatorBenchOptions& o) {
  auto bad = [](const std::string& m) {
    return absl::InvalidArgumentError("bench coordinator: " + m);
  };
  if (o.instances < 1 || o.instances > kMaxInstances) {
    return bad(absl::StrFormat("instances %d outside [1, %d]", o.instances, kMaxInstances));
  }
  if (o.segments < 1) return bad("segments must be >= 1");
  if (o.phase <= absl::ZeroDuration() || o.warmup < absl::ZeroDuration()) {
    return bad("the phase must be > 0 and the warm-up >= 0");
  }
  if (o.plan_clients < 1 || o.batch_requests < 1) {
    return bad("plan_clients and batch_requests must be >= 1");
  }
  if (o.heartbeat_interval <= absl::ZeroDuration()) return bad("heartbeat_interval must be > 0");
  if (o.full_report_every < 0) return bad("full_report_every must be >= 0");
  return absl::OkStatus();
}

v1::InstanceState BaseState(int32_t i, int64_t slots) {
  v1::InstanceState s;
  s.set_capacity_slots(slots);
  s.set_slot_bytes(1);
  s.set_data_port(40000 + i);  // never dialled: the benchmark sends no request to instances
  return s;
}

}  // namespace

absl::StatusOr<nlohmann::json> RunCoordinatorBench(
    const CoordinatorBenchOptions& o, const std::function<void(const std::string&)>& progress) {
  if (absl::Status s = CheckOptions(o); !s.ok()) return s;
  auto say = [&](const std::string& line) {
    if (progress) progress(line);
  };
  const int64_t docs =
      std::max<int64_t>(o.instances, (o.segments + kDocSegments - 1) / kDocSegments);
  const int64_t docs_per_instance = (docs + o.instances - 1) / o.instances;
  // Room for the pool and what the phases add (it fills up and evicts as it would in service).
  const int64_t slots = docs_per_instance * kDocSegments * 5 / 4 + 256;
  absl::StatusOr<std::string> secret = transport::GenerateClusterSecret();
  if (!secret.ok()) return secret.status();

  CoordinatorOptions co;
  co.lake_instances = o.instances;
  co.slots_per_instance = static_cast<int32_t>(slots);
  co.segment_tokens = kSegmentTokens;
  co.limits = {.vocab_size = 1024, .context_tokens = 1 << 20, .max_tokens_limit = 64};
  co.heartbeat_interval = o.heartbeat_interval;
  // Silent instances stay members through the phase without reconciliation.
  co.dead_after = absl::Hours(1);
  co.rebalance_interval = absl::ZeroDuration();
  co.restore_window = absl::ZeroDuration();
  co.cluster_secret = *secret;
  co.http_threads = 2;
  absl::StatusOr<std::unique_ptr<Coordinator>> coordinator = Coordinator::Create(co);
  if (!coordinator.ok()) return coordinator.status();
  const int grpc_port = (*coordinator)->grpc_port();
  const std::string target = absl::StrCat("127.0.0.1:", grpc_port);

  // ---- Registration: every instance with everything it holds.
  std::vector<std::unique_ptr<SimInstance>> sims;
  for (int32_t i = 0; i < o.instances; ++i) sims.push_back(std::make_unique<SimInstance>());
  for (int64_t d = 0; d < docs; ++d) {
    SimInstance& sim = *sims[static_cast<size_t>(d % o.instances)];
    SegmentId parent;
    for (int32_t k = 0; k < kDocSegments; ++k) {
      const SegmentId id(DocSegment(d, k));
      sim.Store(id, parent, kSegmentTokens);
      parent = id;
    }
  }
  say(absl::StrFormat("registering %d instances holding %d segments", o.instances,
                      docs * kDocSegments));
  const auto restore_start = std::chrono::steady_clock::now();
  for (int32_t i = 0; i < o.instances; ++i) {
    SimInstance& sim = *sims[static_cast<size_t>(i)];
    sim.stub = v1::Coordinator::NewStub(grpc::CreateCustomChannel(
        target, grpc::InsecureChannelCredentials(), GrpcChannelArguments()));
    sim.reporter = std::make_unique<HoldingsReporter>(&sim, 1000 + static_cast<uint64_t>(i));
    v1::RegisterRequest request;
    request.set_name(absl::StrCat("sim-", i));
    request.set_preferred_id(i);
    request.set_transport_port(30000 + i);
    request.set_namespace_name(co.namespace_name);
    request.set_segment_tokens(kSegmentTokens);
    *request.mutable_state() = BaseState(i, slots);
    sim.reporter->Fill(/*full=*/true, true, request.mutable_state());
    v1::RegisterReply reply;
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Minutes(5)));
    AuthorizeCall(&ctx, *secret, "Register");
    grpc::Status s = sim.stub->Register(&ctx, request, &reply);
    if (!s.ok()) return FromGrpc(s, "Register");
    sim.id = reply.instance_id();
    sim.epoch = reply.coordinator_epoch();
    sim.reporter->OnReply(reply.takes_holdings_changes(), reply.holdings_acked_seq(),
                          reply.full_holdings_wanted());
  }
  const double restore_s = MsSince(restore_start) / 1e3;
  const int64_t pool_segments = (*coordinator)->DistinctSegments();
  say(absl::StrFormat("registered in %.2f s: %d segments in the lake", restore_s, pool_segments));

  // ---- The engines.
  std::atomic<bool> stop_plans{false};
  std::atomic<int> phase{0};  // 0 warm-up, 1 without reconciliation, 2 with
  struct ClientResult {
    std::vector<double> ms[3];
    int64_t errors = 0;
  };
  std::vector<ClientResult> results(static_cast<size_t>(o.plan_clients));
  std::atomic<uint64_t> next_request{1};
  auto engine = [&](int32_t c) {
    ClientResult& out = results[static_cast<size_t>(c)];
    auto cp = RemoteControlPlane::Create({.coordinator_port = grpc_port,
                                          .num_instances = o.instances,
                                          .call_timeout = absl::Seconds(30),
                                          .cluster_secret = *secret});
    if (!cp.ok()) {
      ++out.errors;
      return;
    }
    Rng rng(o.seed * 7919 + static_cast<uint64_t>(c));
    std::vector<RequestId> release;
    std::vector<lake::StoreConfirmation> confirm;  // stored since the last call, as an engine's
    while (!stop_plans.load()) {
      std::vector<lake::IterationRequest> batch;
      for (int32_t r = 0; r < o.batch_requests; ++r) {
        lake::IterationRequest q;
        q.request = RequestId(next_request.fetch_add(1));
        const int64_t doc = rng.UniformInt(0, docs - 1);
        const int32_t len = static_cast<int32_t>(rng.UniformInt(1, kDocSegments - 1));
        for (int32_t k = 0; k < len; ++k) {
          q.keys.push_back({SegmentId(DocSegment(doc, k)), kSegmentTokens});
        }
        q.keys.push_back(
            {SegmentId(HashCombine(q.keys.back().id.value(), q.request.value())), kSegmentTokens});
        q.max_cached_segments = len;
        q.end_tokens = int64_t{len + 1} * kSegmentTokens;
        batch.push_back(std::move(q));
      }
      const int ph = phase.load();
      const auto t0 = std::chrono::steady_clock::now();
      absl::StatusOr<std::vector<lake::BatchPlanEntry>> plans =
          (*cp)->PlanBatch(confirm, release, batch, 0);
      const double ms = MsSince(t0);
      release.clear();
      confirm.clear();
      if (!plans.ok()) {
        ++out.errors;
        continue;
      }
      out.ms[ph].push_back(ms);
      // Each prefill completes its new segment: commit it, and let the instances the lake
      // names store it (and free what it evicted), as their data planes would.
      for (size_t r = 0; r < plans->size(); ++r) {
        const lake::BatchPlanEntry& e = (*plans)[r];
        if (!e.status.ok()) {
          ++out.errors;
          continue;
        }
        release.push_back(batch[r].request);
        absl::StatusOr<lake::CommitResult> committed =
            (*cp)->Commit(batch[r].request, e.plan.new_segments);
        if (!committed.ok()) {
          ++out.errors;
          continue;
        }
        for (const lake::StoredReplica& st : committed->evicted) {
          if (st.instance.value() >= 0 && st.instance.value() < o.instances) {
            sims[static_cast<size_t>(st.instance.value())]->Free(st.segment);
          }
        }
        for (const lake::StoredReplica& st : committed->stored) {
          if (st.instance.value() < 0 || st.instance.value() >= o.instances) continue;
          for (const plan::NewSegmentPlacement& p : e.plan.new_segments) {
            if (p.segment == st.segment) {
              sims[static_cast<size_t>(st.instance.value())]->Store(st.segment, p.parent,
                                                                    p.num_tokens);
              confirm.push_back({batch[r].request, st.segment, st.instance});
            }
          }
        }
      }
    }
    (*cp)->PlanBatch(confirm, release, {}, 0).IgnoreError();
  };

  // ---- The heartbeats (phase 2).
  std::atomic<bool> heartbeating{false};
  std::atomic<bool> stop_heartbeats{false};
  absl::Mutex hb_mu;
  std::vector<double> heartbeat_ms;
  int64_t heartbeat_errors = 0;
  auto heartbeats = [&](int32_t i) {
    SimInstance& sim = *sims[static_cast<size_t>(i)];
    // Staggered, as independent processes would be.
    absl::SleepFor(o.heartbeat_interval * i / o.instances);
    int64_t n = 0;
    std::vector<double> mine;
    int64_t errors = 0;
    while (!stop_heartbeats.load()) {
      const absl::Time next = absl::Now() + o.heartbeat_interval;
      if (heartbeating.load()) {
        v1::HeartbeatRequest request;
        request.set_instance_id(sim.id);
        request.set_coordinator_epoch(sim.epoch);
        *request.mutable_state() = BaseState(i, slots);
        ++n;
        // Full reports staggered across the instances.
        const bool full = o.full_report_every > 0 && (n + i) % o.full_report_every == 0;
        sim.reporter->Fill(full, true, request.mutable_state());
        v1::HeartbeatReply reply;
        grpc::ClientContext ctx;
        ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
        AuthorizeCall(&ctx, *secret, "Heartbeat");
        const auto t0 = std::chrono::steady_clock::now();
        grpc::Status s = sim.stub->Heartbeat(&ctx, request, &reply);
        mine.push_back(MsSince(t0));
        if (s.ok()) {
          const uint64_t at =
              sim.reporter->OnReply(true, reply.holdings_acked_seq(), reply.full_holdings_wanted());
          for (uint64_t seg : reply.free_segments()) sim.FreeIfUnchangedSince(SegmentId(seg), at);
        } else {
          ++errors;
        }
      }
      absl::SleepFor(std::max(absl::ZeroDuration(), next - absl::Now()));
    }
    absl::MutexLock lock(&hb_mu);
    heartbeat_ms.insert(heartbeat_ms.end(), mine.begin(), mine.end());
    heartbeat_errors += errors;
  };

  std::vector<std::thread> threads;
  for (int32_t c = 0; c < o.plan_clients; ++c) threads.emplace_back(engine, c);
  std::vector<std::thread> hb_threads;
  for (int32_t i = 0; i < o.instances; ++i) hb_threads.emplace_back(heartbeats, i);
  auto sample = [](const std::string& text, const std::string& series) -> double {
    const size_t pos = text.find("\n" + series + " ");
    return pos == std::string::npos ? 0 : std::stod(text.substr(pos + series.size() + 2));
  };
  // The coordinator's counters over phase 2's slices.
  std::vector<std::string> series = {"tokenlake_reconcile_changes_total",
                                     "tokenlake_reconcile_lock_hold_seconds_count",
                                     "tokenlake_reconcile_lock_hold_seconds_sum"};
  for (const char* kind : {"changes", "full", "gap", "late"}) {
    series.push_back(absl::StrCat("tokenlake_reconcile_reports_total{kind=\"", kind, "\"}"));
  }
  const char* const kHoldBounds[] = {"0.0001", "0.0005", "0.001", "0.002", "0.01"};
  for (const char* le : kHoldBounds) {
    series.push_back(absl::StrCat("tokenlake_reconcile_lock_hold_seconds_bucket{le=\"", le, "\"}"));
  }
  absl::flat_hash_map<std::string, double> phase2;
  say(absl::StrFormat("warm-up %s", absl::FormatDuration(o.warmup)));
  absl::SleepFor(o.warmup);
  // The two phases alternate in slices of about a second, so that a change of the machine's
  // load during the run weighs on both alike. After the instances resume reporting, their first
  // reports carry what changed while they were silent: two heartbeat periods go unmeasured.
  const int slices = std::max(1, static_cast<int>(absl::ToDoubleSeconds(o.phase) + 0.5));
  const absl::Duration slice = o.phase / slices;
  say(absl::StrFormat("%d slices of %s without, then with reconciliation", slices,
                      absl::FormatDuration(slice)));
  for (int k = 0; k < slices; ++k) {
    phase.store(1);
    absl::SleepFor(slice);
    phase.store(0);
    heartbeating.store(true);
    absl::SleepFor(o.heartbeat_interval * 2);
    const std::string before = (*coordinator)->MetricsText();
    phase.store(2);
    absl::SleepFor(slice);
    phase.store(0);
    const std::string after = (*coordinator)->MetricsText();
    heartbeating.store(false);
    for (const std::string& name : series) {
      phase2[name] += sample(after, name) - sample(before, name);
    }
  }
  stop_plans.store(true);
  for (std::thread& t : threads) t.join();
  // A few /metrics renderings with the whole pool.
  std::vector<double> scrape_ms;
  std::string metrics;
  for (int k = 0; k < 5; ++k) {
    const auto t0 = std::chrono::steady_clock::now();
    metrics = (*coordinator)->MetricsText();
    scrape_ms.push_back(MsSince(t0));
  }
  stop_heartbeats.store(true);
  for (std::thread& t : hb_threads) t.join();

  std::vector<double> ms[3];
  int64_t plan_errors = 0;
  for (const ClientResult& r : results) {
    for (int p = 0; p < 3; ++p) ms[p].insert(ms[p].end(), r.ms[p].begin(), r.ms[p].end());
    plan_errors += r.errors;
  }
  const double phase_s = absl::ToDoubleSeconds(o.phase);
  auto reports = [&](const std::string& kind) {
    return phase2[absl::StrCat("tokenlake_reconcile_reports_total{kind=\"", kind, "\"}")];
  };
  nlohmann::json j;
  j["benchmark"] = "coordinator";
  j["plans_per_s"] = static_cast<double>(ms[1].size()) / phase_s;
  j["plans_per_s_with_reconcile"] = static_cast<double>(ms[2].size()) / phase_s;
  j["plan_p99_ms"] = Percentile(ms[1], 0.99);
  j["plan_p99_ms_with_reconcile"] = Percentile(ms[2], 0.99);
  j["plan_p50_ms"] = Percentile(ms[1], 0.5);
  j["plan_p50_ms_with_reconcile"] = Percentile(ms[2], 0.5);
  j["plan_max_ms"] = Percentile(ms[1], 1.0);
  j["plan_max_ms_with_reconcile"] = Percentile(ms[2], 1.0);
  j["requests_per_plan"] = o.batch_requests;
  j["plan_errors"] = plan_errors;
  j["pool_segments_at_start"] = pool_segments;
  j["restore_s"] = restore_s;
  j["heartbeats"] = heartbeat_ms.size();
  j["heartbeat_p50_ms"] = Percentile(heartbeat_ms, 0.5);
  j["heartbeat_p99_ms"] = Percentile(heartbeat_ms, 0.99);
  j["heartbeat_errors"] = heartbeat_errors;
  j["reports_with_reconcile"] = {{"changes", reports("changes")},
                                 {"full", reports("full")},
                                 {"gap", reports("gap")},
                                 {"late", reports("late")}};
  j["changes_applied_with_reconcile"] = phase2["tokenlake_reconcile_changes_total"];
  // What plans could wait behind: the reports' holds of the lake's lock (the longest since the
  // coordinator started, registrations included).
  const double holds = phase2["tokenlake_reconcile_lock_hold_seconds_count"];
  const double held_s = phase2["tokenlake_reconcile_lock_hold_seconds_sum"];
  j["reconcile_lock_holds_with_reconcile"] = holds;
  j["reconcile_lock_hold_mean_ms"] = holds > 0 ? held_s * 1e3 / holds : 0.0;
  j["reconcile_lock_hold_share_with_reconcile"] = held_s / phase_s;
  // Phase 2's holds by duration (histogram buckets, ms: holds at most that long).
  nlohmann::json buckets = nlohmann::json::object();
  for (const char* le : kHoldBounds) {
    buckets[absl::StrCat(std::stod(le) * 1e3)] =
        phase2[absl::StrCat("tokenlake_reconcile_lock_hold_seconds_bucket{le=\"", le, "\"}")];
  }
  j["reconcile_lock_holds_at_most_ms"] = buckets;
  j["reconcile_longest_lock_hold_ms_since_start"] =
      sample(metrics, "tokenlake_reconcile_longest_lock_hold_seconds") * 1e3;
  j["metrics_scrape_ms"] = Percentile(scrape_ms, 0.5);
  j["pool_segments_at_end"] = (*coordinator)->DistinctSegments();
  j["options"] = {{"instances", o.instances},
                  {"segments", o.segments},
                  {"seconds", phase_s},
                  {"warmup_s", absl::ToDoubleSeconds(o.warmup)},
                  {"plan_clients", o.plan_clients},
                  {"batch_requests", o.batch_requests},
                  {"heartbeat_interval_ms", absl::ToInt64Milliseconds(o.heartbeat_interval)},
                  {"full_report_every", o.full_report_every},
                  {"segment_tokens", kSegmentTokens},
                  {"document_segments", kDocSegments},
                  {"seed", o.seed}};
  (*coordinator)->Shutdown();
  return j;
}

}  // namespace tokenlake::service
