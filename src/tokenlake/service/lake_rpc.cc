#include "tokenlake/service/lake_rpc.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/service/call_auth.h"
#include "tokenlake/service/grpc_credentials.h"

namespace tokenlake::service {

// The enums' numbers are the wire format: the protocol's and ours must agree.
static_assert(v1::HOLDER_ACTION_LOCAL == static_cast<int>(plan::HolderAction::kLocal));
static_assert(v1::HOLDER_ACTION_MOVE_QUERIES == static_cast<int>(plan::HolderAction::kMoveQueries));
static_assert(v1::HOLDER_ACTION_PULL_KV == static_cast<int>(plan::HolderAction::kPullKv));
static_assert(v1::STATUS_CODE_OK == static_cast<int>(absl::StatusCode::kOk));
static_assert(v1::STATUS_CODE_INVALID_ARGUMENT ==
              static_cast<int>(absl::StatusCode::kInvalidArgument));
static_assert(v1::STATUS_CODE_UNAUTHENTICATED ==
              static_cast<int>(absl::StatusCode::kUnauthenticated));
static_assert(v1::StatusCode_MAX == static_cast<int>(absl::StatusCode::kUnauthenticated));

v1::HolderAction ToProto(plan::HolderAction action) {
  return static_cast<v1::HolderAction>(action);
}

plan::HolderAction FromProto(v1::HolderAction action) {
  switch (action) {
    case v1::HOLDER_ACTION_LOCAL:
      return plan::HolderAction::kLocal;
    case v1::HOLDER_ACTION_PULL_KV:
      return plan::HolderAction::kPullKv;
    default:
      return plan::HolderAction::kMoveQueries;
  }
}

v1::StatusCode ToProto(absl::StatusCode code) { return static_cast<v1::StatusCode>(code); }

absl::StatusCode FromProto(v1::StatusCode code) {
  return v1::StatusCode_IsValid(code) ? static_cast<absl::StatusCode>(code)
                                      : absl::StatusCode::kUnknown;
}

void ToProto(const lake::IterationRequest& in, v1::PlanIterationRequest* out) {
  out->set_request_id(in.request.value());
  for (const index::SegmentKey& k : in.keys) {
    v1::SegmentKey* key = out->add_keys();
    key->set_id(k.id.value());
    key->set_num_tokens(k.num_tokens);
  }
  out->set_max_cached_segments(in.max_cached_segments);
  out->set_end_tokens(in.end_tokens);
  out->set_prefill(in.prefill);
  out->set_computed_tokens(in.computed_tokens);
  out->set_preferred_instance(InstanceToWire(in.preferred_instance));
  out->set_count_hits(in.count_hits);
  out->set_max_new_tokens(in.max_new_tokens);
  out->set_try_admit(in.try_admit);
  out->set_tail_in_pool(in.tail_in_pool);
}

lake::IterationRequest FromProto(const v1::PlanIterationRequest& in) {
  lake::IterationRequest out;
  out.request = RequestId(in.request_id());
  out.keys.reserve(static_cast<size_t>(in.keys_size()));
  for (const v1::SegmentKey& k : in.keys()) {
    out.keys.push_back({SegmentId(k.id()), k.num_tokens()});
  }
  out.max_cached_segments = in.max_cached_segments();
  out.end_tokens = in.end_tokens();
  out.prefill = in.prefill();
  out.computed_tokens = in.computed_tokens();
  out.preferred_instance = InstanceFromWire(in.preferred_instance());
  out.count_hits = in.count_hits();
  out.max_new_tokens = in.max_new_tokens();
  out.try_admit = in.try_admit();
  out.tail_in_pool = in.tail_in_pool();
  return out;
}

void ToProto(const plan::NewSegmentPlacement& in, v1::Placement* out) {
  out->set_segment(in.segment.value());
  out->set_parent(in.parent.value());
  out->set_num_tokens(in.num_tokens);
  out->set_source(InstanceToWire(in.source));
  out->set_target(InstanceToWire(in.target));
}

plan::NewSegmentPlacement FromProto(const v1::Placement& in, RequestId request) {
  return plan::NewSegmentPlacement{.request = request,
                                   .segment = SegmentId(in.segment()),
                                   .parent = SegmentId(in.parent()),
                                   .num_tokens = in.num_tokens(),
                                   .source = InstanceFromWire(in.source()),
                                   .target = InstanceFromWire(in.target())};
}

void ToProto(const lake::IterationPlan& in, v1::PlanIterationReply* out) {
  out->set_num_keys(in.num_keys);
  out->set_cached_tokens(in.cached_tokens);
  out->set_new_tokens(in.new_tokens);
  out->set_compute_instance(InstanceToWire(in.compute_instance));
  for (const plan::SegmentAssignment& a : in.segments) {
    v1::SegmentAssignment* s = out->add_segments();
    s->set_segment(a.segment.value());
    s->set_num_tokens(a.num_tokens);
    s->set_holder(InstanceToWire(a.holder));
    s->set_action(ToProto(a.action));
  }
  for (const plan::NewSegmentPlacement& p : in.new_segments) ToProto(p, out->add_new_segments());
  out->set_end_tokens(in.end_tokens);
  out->set_deferred(!in.admitted);
  for (InstanceId i : in.tail_slots) out->add_tail_slots(InstanceToWire(i));
  for (const lake::StoredReplica& r : in.evicted) {
    v1::Replica* x = out->add_evicted();
    x->set_segment(r.segment.value());
    x->set_instance(InstanceToWire(r.instance));
  }
  out->set_evicted_at(in.evicted_at);
}

lake::IterationPlan FromProto(const v1::PlanIterationReply& in, RequestId request) {
  lake::IterationPlan out;
  out.num_keys = in.num_keys();
  out.cached_tokens = in.cached_tokens();
  out.new_tokens = in.new_tokens();
  out.compute_instance = InstanceFromWire(in.compute_instance());
  out.end_tokens = in.end_tokens();
  out.admitted = !in.deferred();
  for (const v1::SegmentAssignment& s : in.segments()) {
    out.segments.push_back({.segment = SegmentId(s.segment()),
                            .num_tokens = s.num_tokens(),
                            .holder = InstanceFromWire(s.holder()),
                            .action = FromProto(s.action())});
  }
  for (const v1::Placement& p : in.new_segments()) {
    out.new_segments.push_back(FromProto(p, request));
  }
  for (int32_t i : in.tail_slots()) out.tail_slots.push_back(InstanceFromWire(i));
  for (const v1::Replica& r : in.evicted()) {
    out.evicted.push_back({SegmentId(r.segment()), InstanceFromWire(r.instance())});
  }
  out.evicted_at = in.evicted_at();
  return out;
}

void ToProto(const lake::CommitResult& in, v1::CommitReply* out) {
  for (const lake::StoredReplica& r : in.stored) {
    v1::Replica* x = out->add_stored();
    x->set_segment(r.segment.value());
    x->set_instance(InstanceToWire(r.instance));
  }
  for (SegmentId s : in.deduplicated) out->add_deduplicated(s.value());
  for (SegmentId s : in.not_stored) out->add_not_stored(s.value());
  for (SegmentId s : in.pending_elsewhere) out->add_pending_elsewhere(s.value());
  for (SegmentId s : in.in_place) out->add_in_place(s.value());
  for (const lake::StoredReplica& r : in.evicted) {
    v1::Replica* x = out->add_evicted();
    x->set_segment(r.segment.value());
    x->set_instance(InstanceToWire(r.instance));
  }
  out->set_moved_bytes(in.moved_bytes);
  out->set_sequence(in.sequence);
}

lake::CommitResult FromProto(const v1::CommitReply& in) {
  lake::CommitResult out;
  for (const v1::Replica& r : in.stored()) {
    out.stored.push_back({SegmentId(r.segment()), InstanceFromWire(r.instance())});
  }
  for (uint64_t s : in.deduplicated()) out.deduplicated.push_back(SegmentId(s));
  for (uint64_t s : in.not_stored()) out.not_stored.push_back(SegmentId(s));
  for (uint64_t s : in.pending_elsewhere()) out.pending_elsewhere.emplace_back(s);
  for (uint64_t s : in.in_place()) out.in_place.emplace_back(s);
  for (const v1::Replica& r : in.evicted()) {
    out.evicted.push_back({SegmentId(r.segment()), InstanceFromWire(r.instance())});
  }
  out.moved_bytes = in.moved_bytes();
  out.sequence = in.sequence();
  return out;
}

void ToProto(const lake::StoreConfirmation& in, v1::StoreConfirmation* out) {
  out->set_request_id(in.request.value());
  out->set_segment(in.segment.value());
  out->set_instance(InstanceToWire(in.instance));
}

lake::StoreConfirmation FromProto(const v1::StoreConfirmation& in) {
  return lake::StoreConfirmation{.request = RequestId(in.request_id()),
                                 .segment = SegmentId(in.segment()),
                                 .instance = InstanceFromWire(in.instance())};
}

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::Status FromGrpc(const grpc::Status& s, const char* call) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat("lake ", call, " on the coordinator: ", s.error_message()));
}

absl::StatusOr<std::unique_ptr<RemoteControlPlane>> RemoteControlPlane::Create(
    const Options& options) {
  if (options.coordinator_port < 1 || options.coordinator_port > 65535) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "RemoteControlPlane: coordinator_port %d outside [1, 65535]", options.coordinator_port));
  }
  if (options.num_instances < 1) {
    return absl::InvalidArgumentError("RemoteControlPlane: num_instances must be >= 1");
  }
  std::unique_ptr<RemoteControlPlane> cp(new RemoteControlPlane(options));
  cp->Retarget(
      transport::HostPort{.host = options.coordinator_host, .port = options.coordinator_port});
  return cp;
}

void RemoteControlPlane::Retarget(const transport::HostPort& coordinator) {
  auto channel = grpc::CreateCustomChannel(
      coordinator.ToString(), GrpcChannelCredentials(options_.tls.get()), GrpcChannelArguments());
  std::shared_ptr<v1::Lake::Stub> stub = v1::Lake::NewStub(channel);
  absl::MutexLock lock(&stub_mu_);
  stub_ = std::move(stub);
}

std::shared_ptr<v1::Lake::Stub> RemoteControlPlane::Stub() const {
  absl::MutexLock lock(&stub_mu_);
  return stub_;
}

absl::StatusOr<lake::IterationPlan> RemoteControlPlane::PlanIteration(
    const lake::IterationRequest& request) {
  v1::PlanIterationRequest in;
  ToProto(request, &in);
  v1::PlanIterationReply out;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.call_timeout));
  AuthorizeCall(&ctx, options_.cluster_secret, "PlanIteration");
  if (absl::Status s = FromGrpc(Stub()->PlanIteration(&ctx, in, &out), "PlanIteration"); !s.ok()) {
    return s;
  }
  return FromProto(out, request.request);
}

absl::StatusOr<lake::CommitResult> RemoteControlPlane::Commit(
    RequestId request, absl::Span<const plan::NewSegmentPlacement> placements) {
  // Nothing to commit: no round trip (see the class comment in lake_rpc.h for why this is
  // the lake's answer too).
  if (placements.empty()) return lake::CommitResult{};
  v1::CommitRequest in;
  in.set_request_id(request.value());
  in.set_pending(true);
  for (const plan::NewSegmentPlacement& p : placements) ToProto(p, in.add_placements());
  v1::CommitReply out;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.call_timeout));
  AuthorizeCall(&ctx, options_.cluster_secret, "Commit");
  if (absl::Status s = FromGrpc(Stub()->Commit(&ctx, in, &out), "Commit"); !s.ok()) return s;
  return FromProto(out);
}

absl::Status RemoteControlPlane::ConfirmStored(absl::Span<const lake::StoreConfirmation> copies) {
  if (copies.empty()) return absl::OkStatus();
  return PlanBatch(copies, {}, {}, 0).status();
}

absl::Status RemoteControlPlane::Release(RequestId request) {
  v1::ReleaseRequest in;
  in.set_request_id(request.value());
  v1::ReleaseReply out;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.call_timeout));
  AuthorizeCall(&ctx, options_.cluster_secret, "Release");
  return FromGrpc(Stub()->Release(&ctx, in, &out), "Release");
}

absl::Status RemoteControlPlane::ReleaseTail(RequestId request) {
  v1::ReleaseRequest in;
  in.set_request_id(request.value());
  v1::ReleaseReply out;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.call_timeout));
  AuthorizeCall(&ctx, options_.cluster_secret, "ReleaseTail");
  return FromGrpc(Stub()->ReleaseTail(&ctx, in, &out), "ReleaseTail");
}

absl::StatusOr<lake::IterationPlan> RemoteControlPlane::ReleaseAndPlan(
    RequestId release, const lake::IterationRequest& next) {
  v1::ReleaseAndPlanRequest in;
  in.set_release_request_id(release.value());
  ToProto(next, in.mutable_plan());
  v1::PlanIterationReply out;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.call_timeout));
  AuthorizeCall(&ctx, options_.cluster_secret, "ReleaseAndPlan");
  if (absl::Status s = FromGrpc(Stub()->ReleaseAndPlan(&ctx, in, &out), "ReleaseAndPlan");
      !s.ok()) {
    return s;
  }
  return FromProto(out, next.request);
}

absl::StatusOr<std::vector<lake::BatchPlanEntry>> RemoteControlPlane::PlanBatch(
    absl::Span<const lake::StoreConfirmation> confirm, absl::Span<const RequestId> release,
    absl::Span<const lake::IterationRequest> requests, int64_t token_budget) {
  v1::PlanBatchRequest in;
  in.set_token_budget(token_budget);
  for (const lake::StoreConfirmation& c : confirm) ToProto(c, in.add_confirm());
  for (RequestId r : release) in.add_release_request_ids(r.value());
  for (const lake::IterationRequest& r : requests) ToProto(r, in.add_plans());
  v1::PlanBatchReply out;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.call_timeout));
  AuthorizeCall(&ctx, options_.cluster_secret, "PlanBatch");
  if (absl::Status s = FromGrpc(Stub()->PlanBatch(&ctx, in, &out), "PlanBatch"); !s.ok()) return s;
  if (out.entries_size() != static_cast<int>(requests.size())) {
    return absl::DataLossError(absl::StrFormat("PlanBatch: %d entries for %d requests",
                                               out.entries_size(), requests.size()));
  }
  std::vector<lake::BatchPlanEntry> entries(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    const v1::PlanBatchEntry& e = out.entries(static_cast<int>(i));
    if (e.status_code() != v1::STATUS_CODE_OK) {
      entries[i].status = absl::Status(FromProto(e.status_code()), e.error_message());
    } else {
      entries[i].plan = FromProto(e.plan(), requests[i].request);
    }
  }
  return entries;
}

}  // namespace tokenlake::service
