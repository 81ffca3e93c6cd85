// tokenlake._tokenlake: the lake's control plane for Python (pybind11), on plain Python types
// (ints, lists, dicts) and numpy arrays of token ids. python/tokenlake/__init__.py documents the
// Python API; this file converts between it and lake/lake.h.
//
// Errors: an absl::Status error becomes ValueError (InvalidArgument, OutOfRange), KeyError
// (NotFound), or RuntimeError (anything else), with the status message. Every call holds the
// GIL (the lake is fast and has its own lock).
#include <fcntl.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/lake/lake.h"

namespace tokenlake::cli {
int RunCli(int argc, const char* const* argv);  // apps/tokenlake/command.h
}  // namespace tokenlake::cli

namespace py = pybind11;

namespace tokenlake::python {
namespace {

[[noreturn]] void Raise(const absl::Status& s) {
  const std::string msg(s.message());
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      throw py::value_error(msg);
    case absl::StatusCode::kNotFound:
      throw py::key_error(msg);
    default:
      throw std::runtime_error(std::string(absl::StatusCodeToString(s.code())) + ": " + msg);
  }
}

template <typename T>
T Unwrap(absl::StatusOr<T> v) {
  if (!v.ok()) Raise(v.status());
  return *std::move(v);
}

void Check(const absl::Status& s) {
  if (!s.ok()) Raise(s);
}

// Token ids from a list of ints or a 1-D integer numpy array.
std::vector<int32_t> Tokens(const py::handle& obj) {
  auto arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!arr || arr.ndim() != 1) {
    throw py::type_error("tokens must be a 1-D sequence of integers");
  }
  std::vector<int32_t> out(static_cast<size_t>(arr.size()));
  const int64_t* data = arr.data();
  for (size_t i = 0; i < out.size(); ++i) {
    if (data[i] < 0 || data[i] > INT32_MAX) {
      throw py::value_error(absl::StrFormat("token %d at index %d is not a token id", data[i], i));
    }
    out[i] = static_cast<int32_t>(data[i]);
  }
  return out;
}

py::list KeysToPython(const std::vector<index::SegmentKey>& keys) {
  py::list out;
  for (const index::SegmentKey& k : keys) out.append(py::make_tuple(k.id.value(), k.num_tokens));
  return out;
}

std::vector<index::SegmentKey> KeysFromPython(const py::handle& obj) {
  std::vector<index::SegmentKey> keys;
  for (const py::handle item : obj) {
    auto t = item.cast<std::pair<uint64_t, int32_t>>();
    keys.push_back({SegmentId(t.first), t.second});
  }
  return keys;
}

const char* ActionName(plan::HolderAction a) {
  switch (a) {
    case plan::HolderAction::kLocal:
      return "local";
    case plan::HolderAction::kMoveQueries:
      return "move_queries";
    case plan::HolderAction::kPullKv:
      return "pull_kv";
  }
  return "unknown";
}

const char* TransferName(plan::TransferKind k) {
  switch (k) {
    case plan::TransferKind::kQueries:
      return "queries";
    case plan::TransferKind::kPartialResults:
      return "partial_results";
    case plan::TransferKind::kSegmentKv:
      return "segment_kv";
    case plan::TransferKind::kNewSegmentKv:
      return "new_segment_kv";
  }
  return "unknown";
}

int32_t Instance(InstanceId i) { return i.valid() ? i.value() : -1; }

py::dict PlacementToPython(const plan::NewSegmentPlacement& p) {
  py::dict d;
  d["request"] = p.request.value();
  d["segment"] = p.segment.value();
  d["parent"] = p.parent.valid() ? py::object(py::int_(p.parent.value())) : py::object(py::none());
  d["num_tokens"] = p.num_tokens;
  d["source"] = Instance(p.source);
  d["target"] = Instance(p.target);
  return d;
}

plan::NewSegmentPlacement PlacementFromPython(const py::handle& obj) {
  const py::dict d = obj.cast<py::dict>();
  plan::NewSegmentPlacement p;
  p.request = RequestId(d["request"].cast<uint64_t>());
  p.segment = SegmentId(d["segment"].cast<uint64_t>());
  if (d.contains("parent") && !d["parent"].is_none()) {
    p.parent = SegmentId(d["parent"].cast<uint64_t>());
  }
  p.num_tokens = d["num_tokens"].cast<int32_t>();
  p.source = InstanceId(d["source"].cast<int32_t>());
  p.target = InstanceId(d["target"].cast<int32_t>());
  return p;
}

py::dict PlanToPython(const plan::BatchPlan& b) {
  py::dict d;
  d["batch_index"] = b.batch_index;
  d["dop"] = b.dop;
  py::list group;
  for (InstanceId i : b.instance_group) group.append(Instance(i));
  d["instance_group"] = group;
  py::list requests;
  for (const plan::RequestPlan& r : b.requests) {
    py::dict rd;
    rd["request"] = r.request.value();
    rd["compute_instance"] = Instance(r.compute_instance);
    rd["new_tokens"] = r.new_tokens;
    rd["cached_tokens"] = r.cached_tokens;
    rd["attention_flops"] = r.attention_flops;
    py::list segs;
    for (const plan::SegmentAssignment& s : r.segments) {
      py::dict sd;
      sd["segment"] = s.segment.value();
      sd["num_tokens"] = s.num_tokens;
      sd["holder"] = Instance(s.holder);
      sd["action"] = ActionName(s.action);
      segs.append(sd);
    }
    rd["segments"] = segs;
    py::list holders;
    for (const plan::HolderPlan& h : r.holders) {
      py::dict hd;
      hd["holder"] = Instance(h.holder);
      hd["action"] = ActionName(h.action);
      hd["num_segments"] = h.num_segments;
      hd["cached_tokens"] = h.cached_tokens;
      hd["bytes"] = h.bytes;
      hd["attention_flops"] = h.attention_flops;
      holders.append(hd);
    }
    rd["holders"] = holders;
    requests.append(rd);
  }
  d["requests"] = requests;
  py::list news;
  for (const plan::NewSegmentPlacement& p : b.transfer.new_segments) {
    news.append(PlacementToPython(p));
  }
  d["new_segments"] = news;
  py::list transfers;
  for (const plan::Transfer& t : b.transfer.transfers) {
    py::dict td;
    td["kind"] = TransferName(t.kind);
    td["request"] = t.request.value();
    td["segment"] =
        t.segment.valid() ? py::object(py::int_(t.segment.value())) : py::object(py::none());
    td["src"] = Instance(t.src);
    td["dst"] = Instance(t.dst);
    td["bytes"] = t.bytes;
    transfers.append(td);
  }
  d["transfers"] = transfers;
  d["query_bytes"] = b.transfer.query_bytes;
  d["kv_pull_bytes"] = b.transfer.kv_pull_bytes;
  d["new_segment_bytes"] = b.transfer.new_segment_bytes;
  d["total_bytes"] = b.transfer.total_bytes;
  return d;
}

py::dict ReplicasToPython(const std::vector<lake::StoredReplica>& v, const char* key, py::dict d) {
  py::list l;
  for (const lake::StoredReplica& r : v)
    l.append(py::make_tuple(r.segment.value(), Instance(r.instance)));
  d[key] = l;
  return d;
}

// The Python Lake: a lake::Lake with its clock and its namespace.
class PyLake {
 public:
  PyLake(int32_t instances, int32_t segment_tokens, int32_t slots_per_instance,
         const std::optional<std::vector<int32_t>>& instance_slots, const py::dict& model,
         const std::string& ns, const std::string& clock) {
    if (clock == "manual") {
      manual_ = std::make_unique<ManualClock>(1);
    } else if (clock != "system") {
      throw py::value_error("clock must be 'system' or 'manual', got '" + clock + "'");
    }
    lake::LakeOptions o;
    o.num_instances = instances;
    o.segment_tokens = segment_tokens;
    o.slots_per_instance = slots_per_instance;
    if (instance_slots.has_value()) o.instance_slots = *instance_slots;
    o.heavy_hitter.num_instances = instances;
    for (const auto& [k, v] : model) {
      const std::string key = k.cast<std::string>();
      const int32_t value = v.cast<int32_t>();
      if (key == "layers") {
        o.model.num_layers = value;
      } else if (key == "heads") {
        o.model.num_heads = value;
      } else if (key == "kv_heads") {
        o.model.num_kv_heads = value;
      } else if (key == "head_dim") {
        o.model.head_dim = value;
      } else if (key == "dtype_bytes") {
        o.model.dtype_bytes = value;
      } else {
        throw py::value_error("model: unknown field '" + key +
                              "' (valid: layers, heads, kv_heads, head_dim, dtype_bytes)");
      }
    }
    salt_ = index::NamespaceSalt(ns);
    lake_ = Unwrap(lake::Lake::Create(o, manual_ ? static_cast<Clock*>(manual_.get()) : &system_));
  }

  std::vector<index::SegmentKey> KeysOf(const py::dict& request) const {
    if (request.contains("keys")) return KeysFromPython(request["keys"]);
    if (!request.contains("tokens")) throw py::key_error("a request needs 'tokens' or 'keys'");
    return Unwrap(index::ComputeSegmentKeys(salt_, Tokens(request["tokens"]),
                                            lake_->options().segment_tokens));
  }

  lake::LakeRequest Request(const py::handle& obj) const {
    const py::dict d = obj.cast<py::dict>();
    lake::LakeRequest r;
    if (!d.contains("id")) throw py::key_error("a request needs an 'id'");
    r.id = RequestId(d["id"].cast<uint64_t>());
    r.keys = KeysOf(d);
    r.new_tokens = d.contains("new_tokens") ? d["new_tokens"].cast<int64_t>() : 0;
    if (d.contains("preferred_instance") && !d["preferred_instance"].is_none()) {
      r.preferred_instance = InstanceId(d["preferred_instance"].cast<int32_t>());
    }
    if (d.contains("extra_slots")) r.extra_slots = d["extra_slots"].cast<int64_t>();
    return r;
  }

  py::list SegmentKeys(const py::handle& tokens) const {
    return KeysToPython(
        Unwrap(index::ComputeSegmentKeys(salt_, Tokens(tokens), lake_->options().segment_tokens)));
  }

  py::dict Match(const py::handle& tokens_or_keys) const {
    std::vector<index::SegmentKey> keys;
    if (py::isinstance<py::dict>(tokens_or_keys)) {
      keys = KeysOf(tokens_or_keys.cast<py::dict>());
    } else {
      keys = Unwrap(index::ComputeSegmentKeys(salt_, Tokens(tokens_or_keys),
                                              lake_->options().segment_tokens));
    }
    const index::MatchResult m = lake_->Match(keys);
    py::dict d;
    d["matched_segments"] = m.matched_segments;
    d["matched_tokens"] = m.matched_tokens;
    d["total_segments"] = static_cast<int64_t>(keys.size());
    return d;
  }

  py::list CacheLoad(const py::list& requests) const {
    std::vector<lake::LakeRequest> reqs;
    for (const py::handle r : requests) reqs.push_back(Request(r));
    py::list out;
    for (const plan::InstanceCacheLoad& l : Unwrap(lake_->GetCacheLoad(reqs))) {
      py::dict d;
      d["instance"] = Instance(l.instance);
      d["attention_flops"] = l.attention_flops;
      d["kv_read_bytes"] = l.kv_read_bytes;
      d["cached_tokens"] = l.cached_tokens;
      d["load_units"] = l.load_units;
      d["memory_used_bytes"] = l.memory_used_bytes;
      out.append(d);
    }
    return out;
  }

  double CacheLoadShare(const py::list& requests, double kv_bytes_per_s,
                        double attention_flops_per_s, double batch_seconds) const {
    std::vector<lake::LakeRequest> reqs;
    for (const py::handle r : requests) reqs.push_back(Request(r));
    return Unwrap(
        lake_->GetCacheLoad(reqs,
                            plan::InstanceRoofline{.kv_bytes_per_s = kv_bytes_per_s,
                                                   .attention_flops_per_s = attention_flops_per_s},
                            batch_seconds));
  }

  py::list GenPlans(const py::list& batches) {
    std::vector<lake::Batch> bs;
    for (const py::handle b : batches) {
      const py::dict d = b.cast<py::dict>();
      lake::Batch batch;
      for (const py::handle r : d["requests"]) batch.requests.push_back(Request(r));
      batch.dop = d.contains("dop") ? d["dop"].cast<int32_t>() : 1;
      if (d.contains("candidates")) {
        for (const py::handle c : d["candidates"])
          batch.candidates.push_back(InstanceId(c.cast<int32_t>()));
      }
      bs.push_back(std::move(batch));
    }
    py::list out;
    for (const plan::BatchPlan& p : Unwrap(lake_->GenPlans(bs))) out.append(PlanToPython(p));
    return out;
  }

  static py::dict AdmitToPython(const lake::AdmitResult& a) {
    py::dict d;
    d["matched_segments"] = a.matched_segments;
    d["matched_tokens"] = a.matched_tokens;
    d["reserved_slots"] = a.reserved_slots;
    return d;
  }

  py::dict Admit(const py::dict& request) {
    return AdmitToPython(Unwrap(lake_->Admit(Request(request))));
  }

  py::object TryAdmit(const py::dict& request) {
    std::optional<lake::AdmitResult> a = Unwrap(lake_->TryAdmit(Request(request)));
    if (!a.has_value()) return py::none();
    return AdmitToPython(*a);
  }

  py::dict Commit(uint64_t request, const py::list& placements) {
    std::vector<plan::NewSegmentPlacement> ps;
    for (const py::handle p : placements) ps.push_back(PlacementFromPython(p));
    const lake::CommitResult c = Unwrap(lake_->Commit(RequestId(request), ps));
    py::dict d;
    ReplicasToPython(c.stored, "stored", d);
    ReplicasToPython(c.evicted, "evicted", d);
    py::list dedup, not_stored;
    for (SegmentId s : c.deduplicated) dedup.append(s.value());
    for (SegmentId s : c.not_stored) not_stored.append(s.value());
    d["deduplicated"] = dedup;
    d["not_stored"] = not_stored;
    d["moved_bytes"] = c.moved_bytes;
    d["sequence"] = c.sequence;
    return d;
  }

  void Release(uint64_t request) { Check(lake_->Release(RequestId(request))); }

  py::dict Rebalance() {
    const lake::RebalanceResult r = Unwrap(lake_->Rebalance());
    py::list actions;
    for (const balance::BalanceAction& a : r.actions) {
      py::dict ad;
      ad["kind"] = balance::ActionKindName(a.kind);
      ad["segment"] = a.segment.value();
      ad["from"] = Instance(a.from);
      ad["to"] = Instance(a.to);
      actions.append(ad);
    }
    py::dict d;
    d["actions"] = actions;
    d["bytes_moved"] = r.bytes_moved;
    d["sequence"] = r.sequence;
    return d;
  }

  py::dict Stats() const {
    const lake::LakeStats s = lake_->Stats();
    py::dict d;
    d["segments"] = s.segments;
    d["replicas"] = s.replicas;
    d["redundancy"] = s.redundancy;
    d["stored_tokens"] = s.stored_tokens;
    d["pinned_segments"] = s.pinned_segments;
    d["heavy_hitters"] = s.heavy_hitters;
    d["admitted_requests"] = s.admitted_requests;
    d["prompt_tokens"] = s.prompt_tokens;
    d["hit_tokens"] = s.hit_tokens;
    d["hit_rate"] = s.hit_rate;
    d["evicted_replicas"] = s.evicted_replicas;
    d["deduplicated_segments"] = s.deduplicated_segments;
    d["not_stored_segments"] = s.not_stored_segments;
    d["active_requests"] = s.active_requests;
    d["available_slots"] = s.available_slots;
    d["rebalance_bytes"] = s.rebalance_bytes;
    py::list instances;
    for (const lake::InstanceStats& i : s.instances) {
      py::dict id;
      id["instance"] = Instance(i.instance);
      id["capacity_slots"] = i.capacity_slots;
      id["used_slots"] = i.used_slots;
      id["free_slots"] = i.free_slots;
      id["load"] = i.load;
      instances.append(id);
    }
    d["instances"] = instances;
    return d;
  }

  void Advance(double seconds) {
    if (!manual_) throw py::value_error("advance() needs a Lake made with clock='manual'");
    if (!(seconds >= 0)) throw py::value_error("advance(): seconds must be >= 0");
    manual_->AdvanceUs(static_cast<int64_t>(seconds * 1e6));
  }

  void CheckIntegrity() const { Check(lake_->CheckIntegrity()); }
  int32_t num_instances() const { return lake_->num_instances(); }
  int32_t segment_tokens() const { return lake_->options().segment_tokens; }

 private:
  SystemClock system_;
  std::unique_ptr<ManualClock> manual_;
  uint64_t salt_ = 0;
  std::unique_ptr<lake::Lake> lake_;
};

// Runs the CLI with `args` (args[0] the program name), its stdout and stderr written to the two
// files (the process's descriptors 1 and 2 are redirected for the call and restored), without
// the GIL. Returns the exit code.
int RunCliCaptured(const std::vector<std::string>& args, const std::string& out_path,
                   const std::string& err_path) {
  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  argv.push_back(nullptr);
  const int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  const int err = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (out < 0 || err < 0) {
    if (out >= 0) close(out);
    if (err >= 0) close(err);
    throw std::runtime_error("cannot create the CLI's output files in " + out_path);
  }
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
  const int saved_out = dup(1);
  const int saved_err = dup(2);
  dup2(out, 1);
  dup2(err, 2);
  int code = 0;
  {
    py::gil_scoped_release release;
    code = tokenlake::cli::RunCli(static_cast<int>(args.size()), argv.data());
    std::cout.flush();
    std::cerr.flush();
    std::fflush(nullptr);
  }
  dup2(saved_out, 1);
  dup2(saved_err, 2);
  close(saved_out);
  close(saved_err);
  close(out);
  close(err);
  return code;
}

}  // namespace
}  // namespace tokenlake::python

PYBIND11_MODULE(_tokenlake, m) {
  using tokenlake::python::PyLake;
  m.doc() = "TokenLake's control plane (see the tokenlake package)";
  m.def(
      "namespace_salt", [](const std::string& ns) { return tokenlake::index::NamespaceSalt(ns); },
      py::arg("name"));
  m.def(
      "segment_keys",
      [](const py::handle& tokens, int32_t segment_tokens, const std::string& ns) {
        return tokenlake::python::KeysToPython(
            tokenlake::python::Unwrap(tokenlake::index::ComputeSegmentKeys(
                tokenlake::index::NamespaceSalt(ns), tokenlake::python::Tokens(tokens),
                segment_tokens)));
      },
      py::arg("tokens"), py::arg("segment_tokens"), py::arg("namespace") = "tokenlake");
  m.def("_run_cli", &tokenlake::python::RunCliCaptured, py::arg("args"), py::arg("stdout_path"),
        py::arg("stderr_path"));
  py::class_<PyLake>(m, "Lake")
      .def(py::init<int32_t, int32_t, int32_t, const std::optional<std::vector<int32_t>>&,
                    const py::dict&, const std::string&, const std::string&>(),
           py::kw_only(), py::arg("instances") = 4, py::arg("segment_tokens") = 512,
           py::arg("slots_per_instance") = 1024, py::arg("instance_slots") = py::none(),
           py::arg("model") = py::dict(), py::arg("namespace") = "tokenlake",
           py::arg("clock") = "system")
      .def_property_readonly("num_instances", &PyLake::num_instances)
      .def_property_readonly("segment_tokens", &PyLake::segment_tokens)
      .def("segment_keys", &PyLake::SegmentKeys, py::arg("tokens"))
      .def("match", &PyLake::Match, py::arg("tokens"))
      .def("cache_load", &PyLake::CacheLoad, py::arg("requests"))
      .def("cache_load_share", &PyLake::CacheLoadShare, py::arg("requests"),
           py::arg("kv_bytes_per_s"), py::arg("attention_flops_per_s"), py::arg("batch_seconds"))
      .def("gen_plans", &PyLake::GenPlans, py::arg("batches"))
      .def("admit", &PyLake::Admit, py::arg("request"))
      .def("try_admit", &PyLake::TryAdmit, py::arg("request"))
      .def("commit", &PyLake::Commit, py::arg("request"), py::arg("placements"))
      .def("release", &PyLake::Release, py::arg("request"))
      .def("rebalance", &PyLake::Rebalance)
      .def("stats", &PyLake::Stats)
      .def("advance", &PyLake::Advance, py::arg("seconds"))
      .def("check_integrity", &PyLake::CheckIntegrity);
}
