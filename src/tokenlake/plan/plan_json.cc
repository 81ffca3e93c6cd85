#include "tokenlake/plan/plan_json.h"

#include <cstdint>
#include <exception>
#include <limits>
#include <string>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::plan {

std::string_view HolderActionName(HolderAction action) {
  switch (action) {
    case HolderAction::kLocal:
      return "local";
    case HolderAction::kMoveQueries:
      return "move_queries";
    case HolderAction::kPullKv:
      return "pull_kv";
  }
  return "unknown";
}

std::string_view TransferKindName(TransferKind kind) {
  switch (kind) {
    case TransferKind::kQueries:
      return "queries";
    case TransferKind::kPartialResults:
      return "partial_results";
    case TransferKind::kSegmentKv:
      return "segment_kv";
    case TransferKind::kNewSegmentKv:
      return "new_segment_kv";
  }
  return "unknown";
}

namespace {

using nlohmann::json;

template <typename Id>
json IdJson(Id id) {
  if (!id.valid()) return json(nullptr);
  return json(id.value());
}

absl::Status Bad(const std::string& where, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("plan JSON: ", where, ": ", what));
}

// Converts an integer JSON value to Int; false when it does not fit.
template <typename Int>
bool ToInt(const json& f, Int* out) {
  if (f.is_number_unsigned()) {
    const uint64_t u = f.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<Int>::max())) return false;
    *out = static_cast<Int>(u);
    return true;
  }
  if (!f.is_number_integer()) return false;
  const int64_t i = f.get<int64_t>();
  if constexpr (std::is_unsigned_v<Int>) {
    if (i < 0) return false;
  } else {
    if (i < std::numeric_limits<Int>::min() || i > std::numeric_limits<Int>::max()) return false;
  }
  *out = static_cast<Int>(i);
  return true;
}

const json* Field(const json& j, const char* name) {
  if (!j.is_object()) return nullptr;
  auto it = j.find(name);
  return it == j.end() ? nullptr : &*it;
}

template <typename Int>
absl::Status GetInt(const json& j, const char* name, const std::string& where, Int* out) {
  const json* f = Field(j, name);
  if (f == nullptr || !ToInt(*f, out)) {
    return Bad(where, absl::StrCat("field '", name, "' missing, not an integer or out of range"));
  }
  return absl::OkStatus();
}

absl::Status GetDouble(const json& j, const char* name, const std::string& where, double* out) {
  const json* f = Field(j, name);
  if (f == nullptr || !f->is_number()) {
    return Bad(where, absl::StrCat("field '", name, "' missing or not a number"));
  }
  *out = f->get<double>();
  return absl::OkStatus();
}

template <typename Id>
absl::Status GetId(const json& j, const char* name, const std::string& where, Id* out) {
  const json* f = Field(j, name);
  if (f == nullptr) return Bad(where, absl::StrCat("field '", name, "' missing"));
  if (f->is_null()) {
    *out = Id();
    return absl::OkStatus();
  }
  typename Id::ValueType v{};
  if (!ToInt(*f, &v)) {
    return Bad(where, absl::StrCat("field '", name, "' is not an integer id in range"));
  }
  *out = Id(v);
  return absl::OkStatus();
}

absl::Status GetArray(const json& j, const char* name, const std::string& where, const json** out) {
  const json* f = Field(j, name);
  if (f == nullptr || !f->is_array()) {
    return Bad(where, absl::StrCat("field '", name, "' missing or not an array"));
  }
  *out = f;
  return absl::OkStatus();
}

absl::Status GetAction(const json& j, const std::string& where, HolderAction* out) {
  const json* f = Field(j, "action");
  if (f != nullptr && f->is_string()) {
    const std::string s = f->get<std::string>();
    for (HolderAction a :
         {HolderAction::kLocal, HolderAction::kMoveQueries, HolderAction::kPullKv}) {
      if (s == HolderActionName(a)) {
        *out = a;
        return absl::OkStatus();
      }
    }
  }
  return Bad(where, "field 'action' missing or not one of local|move_queries|pull_kv");
}

absl::Status GetKind(const json& j, const std::string& where, TransferKind* out) {
  const json* f = Field(j, "kind");
  if (f != nullptr && f->is_string()) {
    const std::string s = f->get<std::string>();
    for (TransferKind k : {TransferKind::kQueries, TransferKind::kPartialResults,
                           TransferKind::kSegmentKv, TransferKind::kNewSegmentKv}) {
      if (s == TransferKindName(k)) {
        *out = k;
        return absl::OkStatus();
      }
    }
  }
  return Bad(where, "field 'kind' missing or not a transfer kind");
}

}  // namespace

json ToJson(const BatchPlan& p) {
  json j;
  j["batch_index"] = p.batch_index;
  j["dop"] = p.dop;
  json group = json::array();
  for (InstanceId i : p.instance_group) group.push_back(IdJson(i));
  j["instance_group"] = std::move(group);
  json reqs = json::array();
  for (const RequestPlan& r : p.requests) {
    json jr;
    jr["request"] = IdJson(r.request);
    jr["compute_instance"] = IdJson(r.compute_instance);
    jr["new_tokens"] = r.new_tokens;
    jr["cached_tokens"] = r.cached_tokens;
    jr["attention_flops"] = r.attention_flops;
    json segs = json::array();
    for (const SegmentAssignment& s : r.segments) {
      segs.push_back({{"segment", IdJson(s.segment)},
                      {"num_tokens", s.num_tokens},
                      {"holder", IdJson(s.holder)},
                      {"action", HolderActionName(s.action)}});
    }
    jr["segments"] = std::move(segs);
    json holders = json::array();
    for (const HolderPlan& h : r.holders) {
      holders.push_back({{"holder", IdJson(h.holder)},
                         {"action", HolderActionName(h.action)},
                         {"num_segments", h.num_segments},
                         {"cached_tokens", h.cached_tokens},
                         {"bytes", h.bytes},
                         {"attention_flops", h.attention_flops}});
    }
    jr["holders"] = std::move(holders);
    reqs.push_back(std::move(jr));
  }
  j["requests"] = std::move(reqs);
  json t;
  json news = json::array();
  for (const NewSegmentPlacement& n : p.transfer.new_segments) {
    news.push_back({{"request", IdJson(n.request)},
                    {"segment", IdJson(n.segment)},
                    {"parent", IdJson(n.parent)},
                    {"num_tokens", n.num_tokens},
                    {"source", IdJson(n.source)},
                    {"target", IdJson(n.target)}});
  }
  t["new_segments"] = std::move(news);
  json transfers = json::array();
  for (const Transfer& x : p.transfer.transfers) {
    transfers.push_back({{"kind", TransferKindName(x.kind)},
                         {"request", IdJson(x.request)},
                         {"segment", IdJson(x.segment)},
                         {"src", IdJson(x.src)},
                         {"dst", IdJson(x.dst)},
                         {"bytes", x.bytes}});
  }
  t["transfers"] = std::move(transfers);
  t["query_bytes"] = p.transfer.query_bytes;
  t["kv_pull_bytes"] = p.transfer.kv_pull_bytes;
  t["new_segment_bytes"] = p.transfer.new_segment_bytes;
  t["total_bytes"] = p.transfer.total_bytes;
  j["transfer"] = std::move(t);
  return j;
}

absl::StatusOr<BatchPlan> BatchPlanFromJson(const json& j) {
  BatchPlan p;
  if (!j.is_object()) return Bad("plan", "not an object");
  TOKENLAKE_RETURN_IF_ERROR(GetInt(j, "batch_index", "plan", &p.batch_index));
  TOKENLAKE_RETURN_IF_ERROR(GetInt(j, "dop", "plan", &p.dop));
  const json* arr = nullptr;
  TOKENLAKE_RETURN_IF_ERROR(GetArray(j, "instance_group", "plan", &arr));
  for (const json& g : *arr) {
    int32_t v = 0;
    if (!ToInt(g, &v)) return Bad("plan.instance_group", "element is not an instance id");
    p.instance_group.push_back(InstanceId(v));
  }
  TOKENLAKE_RETURN_IF_ERROR(GetArray(j, "requests", "plan", &arr));
  for (size_t i = 0; i < arr->size(); ++i) {
    const json& jr = (*arr)[i];
    const std::string where = absl::StrCat("plan.requests[", i, "]");
    RequestPlan r;
    TOKENLAKE_RETURN_IF_ERROR(GetId(jr, "request", where, &r.request));
    TOKENLAKE_RETURN_IF_ERROR(GetId(jr, "compute_instance", where, &r.compute_instance));
    TOKENLAKE_RETURN_IF_ERROR(GetInt(jr, "new_tokens", where, &r.new_tokens));
    TOKENLAKE_RETURN_IF_ERROR(GetInt(jr, "cached_tokens", where, &r.cached_tokens));
    TOKENLAKE_RETURN_IF_ERROR(GetDouble(jr, "attention_flops", where, &r.attention_flops));
    const json* segs = nullptr;
    TOKENLAKE_RETURN_IF_ERROR(GetArray(jr, "segments", where, &segs));
    for (size_t k = 0; k < segs->size(); ++k) {
      const std::string w = absl::StrCat(where, ".segments[", k, "]");
      SegmentAssignment s;
      TOKENLAKE_RETURN_IF_ERROR(GetId((*segs)[k], "segment", w, &s.segment));
      TOKENLAKE_RETURN_IF_ERROR(GetInt((*segs)[k], "num_tokens", w, &s.num_tokens));
      TOKENLAKE_RETURN_IF_ERROR(GetId((*segs)[k], "holder", w, &s.holder));
      TOKENLAKE_RETURN_IF_ERROR(GetAction((*segs)[k], w, &s.action));
      r.segments.push_back(s);
    }
    const json* holders = nullptr;
    TOKENLAKE_RETURN_IF_ERROR(GetArray(jr, "holders", where, &holders));
    for (size_t k = 0; k < holders->size(); ++k) {
      const std::string w = absl::StrCat(where, ".holders[", k, "]");
      HolderPlan h;
      TOKENLAKE_RETURN_IF_ERROR(GetId((*holders)[k], "holder", w, &h.holder));
      TOKENLAKE_RETURN_IF_ERROR(GetAction((*holders)[k], w, &h.action));
      TOKENLAKE_RETURN_IF_ERROR(GetInt((*holders)[k], "num_segments", w, &h.num_segments));
      TOKENLAKE_RETURN_IF_ERROR(GetInt((*holders)[k], "cached_tokens", w, &h.cached_tokens));
      TOKENLAKE_RETURN_IF_ERROR(GetInt((*holders)[k], "bytes", w, &h.bytes));
      TOKENLAKE_RETURN_IF_ERROR(GetDouble((*holders)[k], "attention_flops", w, &h.attention_flops));
      r.holders.push_back(h);
    }
    p.requests.push_back(std::move(r));
  }
  const json* t = Field(j, "transfer");
  if (t == nullptr || !t->is_object()) return Bad("plan", "field 'transfer' missing");
  TOKENLAKE_RETURN_IF_ERROR(GetArray(*t, "new_segments", "plan.transfer", &arr));
  for (size_t k = 0; k < arr->size(); ++k) {
    const std::string w = absl::StrCat("plan.transfer.new_segments[", k, "]");
    const json& jn = (*arr)[k];
    NewSegmentPlacement n;
    TOKENLAKE_RETURN_IF_ERROR(GetId(jn, "request", w, &n.request));
    TOKENLAKE_RETURN_IF_ERROR(GetId(jn, "segment", w, &n.segment));
    TOKENLAKE_RETURN_IF_ERROR(GetId(jn, "parent", w, &n.parent));
    TOKENLAKE_RETURN_IF_ERROR(GetInt(jn, "num_tokens", w, &n.num_tokens));
    TOKENLAKE_RETURN_IF_ERROR(GetId(jn, "source", w, &n.source));
    TOKENLAKE_RETURN_IF_ERROR(GetId(jn, "target", w, &n.target));
    p.transfer.new_segments.push_back(n);
  }
  TOKENLAKE_RETURN_IF_ERROR(GetArray(*t, "transfers", "plan.transfer", &arr));
  for (size_t k = 0; k < arr->size(); ++k) {
    const std::string w = absl::StrCat("plan.transfer.transfers[", k, "]");
    const json& jx = (*arr)[k];
    Transfer x;
    TOKENLAKE_RETURN_IF_ERROR(GetKind(jx, w, &x.kind));
    TOKENLAKE_RETURN_IF_ERROR(GetId(jx, "request", w, &x.request));
    TOKENLAKE_RETURN_IF_ERROR(GetId(jx, "segment", w, &x.segment));
    TOKENLAKE_RETURN_IF_ERROR(GetId(jx, "src", w, &x.src));
    TOKENLAKE_RETURN_IF_ERROR(GetId(jx, "dst", w, &x.dst));
    TOKENLAKE_RETURN_IF_ERROR(GetInt(jx, "bytes", w, &x.bytes));
    p.transfer.transfers.push_back(x);
  }
  TOKENLAKE_RETURN_IF_ERROR(GetInt(*t, "query_bytes", "plan.transfer", &p.transfer.query_bytes));
  TOKENLAKE_RETURN_IF_ERROR(
      GetInt(*t, "kv_pull_bytes", "plan.transfer", &p.transfer.kv_pull_bytes));
  TOKENLAKE_RETURN_IF_ERROR(
      GetInt(*t, "new_segment_bytes", "plan.transfer", &p.transfer.new_segment_bytes));
  TOKENLAKE_RETURN_IF_ERROR(GetInt(*t, "total_bytes", "plan.transfer", &p.transfer.total_bytes));
  return p;
}

std::string SerializePlans(absl::Span<const BatchPlan> plans) {
  json arr = json::array();
  for (const BatchPlan& p : plans) arr.push_back(ToJson(p));
  return arr.dump();
}

absl::StatusOr<std::vector<BatchPlan>> ParsePlans(std::string_view text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad("plans", "malformed JSON");
  if (!j.is_array()) return Bad("plans", "not an array");
  std::vector<BatchPlan> out;
  try {
    for (const json& p : j) {
      TOKENLAKE_ASSIGN_OR_RETURN(BatchPlan plan, BatchPlanFromJson(p));
      out.push_back(std::move(plan));
    }
  } catch (const std::exception& e) {  // e.g. an integer out of range for its field
    return Bad("plans", e.what());
  }
  return out;
}

}  // namespace tokenlake::plan
