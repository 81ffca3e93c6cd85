#include "tokenlake/engine/engine.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"
#include "tokenlake/attention/bf16.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/iteration_loop.h"
#include "tokenlake/engine/local_backend.h"
#include "tokenlake/engine/ops.h"
#include "tokenlake/engine/pool_backend.h"
#include "tokenlake/engine/pool_shape.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/lake/prompt.h"
#include "tokenlake/plan/plan_types.h"

namespace tokenlake::engine {

class Engine::PoolState {
 public:
  // In-process (Create): the owned pool, lake and its control plane.
  std::unique_ptr<InstancePool> own_pool;
  std::unique_ptr<lake::Lake> lake;
  std::unique_ptr<lake::LocalControlPlane> local_control_plane;
  // What the iterations run over (the owned ones or CreateOverPool's).
  InstancePool* pool = nullptr;
  lake::ControlPlane* control_plane = nullptr;
  // Valid over an external pool: the instance that computes every request.
  InstanceId fixed_compute;
  ManualClock clock{1};
  uint64_t salt = 0;
  uint64_t next_request = 1;
  int64_t rebalance_actions = 0;
  // Requests finished since the last rebalance.
  int64_t finished_since_rebalance = 0;
  // The iteration loop over the control plane and the CPU executor.
  std::unique_ptr<PoolExecutor> executor;
  std::unique_ptr<IterationLoop> loop;
  // Requests of the running GenerateBatch call (false: submitted with Submit).
  int64_t batch_pending = 0;
};

Engine::Engine(const LlamaModel* model, const EngineOptions& options)
    : model_(model), options_(options) {}

Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const LlamaModel* model,
                                                       const EngineOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("Engine: model is null");
  if (options.num_instances < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Engine: num_instances must be >= 1, got %d", options.num_instances));
  }
  if (options.segment_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Engine: segment_tokens must be >= 1, got %d", options.segment_tokens));
  }
  if (options.slots_per_instance < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "Engine: slots_per_instance must be >= 1, got %d", options.slots_per_instance));
  }
  std::unique_ptr<Engine> engine(new Engine(model, options));
  if (options.use_pool) {
    const LlamaConfig& c = model->config();
    auto state = std::make_unique<PoolState>();
    const attention::KvSlotLayout layout =
        PoolSlotLayout(c, options.segment_tokens, options.kv_dtype);
    TOKENLAKE_ASSIGN_OR_RETURN(
        state->own_pool, InstancePool::Create({.num_instances = options.num_instances,
                                               .layout = layout,
                                               .num_heads = c.num_heads,
                                               .slots_per_instance = options.slots_per_instance,
                                               .reply_timeout = options.reply_timeout,
                                               .wrap_transport = options.wrap_transport}));
    lake::LakeOptions lo = PoolLakeOptions(c,
                                           {.num_instances = options.num_instances,
                                            .segment_tokens = options.segment_tokens,
                                            .slots_per_instance = options.slots_per_instance},
                                           options.kv_dtype);
    lo.heavy_hitter = options.heavy_hitter;
    lo.heavy_hitter.num_instances = options.num_instances;
    lo.balancer = options.balancer;
    TOKENLAKE_ASSIGN_OR_RETURN(state->lake, lake::Lake::Create(lo, &state->clock));
    state->local_control_plane =
        std::make_unique<lake::LocalControlPlane>(state->lake.get(), &state->clock);
    state->pool = state->own_pool.get();
    state->control_plane = state->local_control_plane.get();
    state->salt = index::NamespaceSalt(options.namespace_name);
    engine->pool_ = std::move(state);
    TOKENLAKE_RETURN_IF_ERROR(engine->StartLoop());
  }
  return engine;
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::CreateOverPool(const LlamaModel* model,
                                                               const EngineOptions& options,
                                                               const ExternalPool& external) {
  if (model == nullptr || external.control_plane == nullptr || external.pool == nullptr) {
    return absl::InvalidArgumentError("Engine: model, control plane and pool must not be null");
  }
  if (!external.pool->hosts(external.compute_instance)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "Engine: computing instance %d is not hosted by the pool",
        external.compute_instance.valid() ? external.compute_instance.value() : -1));
  }
  if (external.control_plane->num_instances() != external.pool->num_instances()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Engine: the control plane has %d instances, the pool %d",
                        external.control_plane->num_instances(), external.pool->num_instances()));
  }
  const LlamaConfig& c = model->config();
  const attention::KvSlotLayout& l = external.pool->layout();
  if (l.num_layers != c.num_layers || l.num_kv_heads != c.num_kv_heads ||
      l.head_dim != c.head_dim || l.segment_tokens != options.segment_tokens) {
    return absl::InvalidArgumentError(
        "Engine: the pool's slot layout does not match the model and segment_tokens");
  }
  EngineOptions o = options;
  o.use_pool = true;
  o.num_instances = external.pool->num_instances();
  o.kv_dtype = l.dtype;
  o.rotate_compute_instance = false;
  o.rebalance_every_requests = 0;
  std::unique_ptr<Engine> engine(new Engine(model, o));
  auto state = std::make_unique<PoolState>();
  state->pool = external.pool;
  state->control_plane = external.control_plane;
  state->fixed_compute = external.compute_instance;
  state->salt = index::NamespaceSalt(options.namespace_name);
  engine->pool_ = std::move(state);
  TOKENLAKE_RETURN_IF_ERROR(engine->StartLoop());
  return engine;
}

absl::Status Engine::StartLoop() {
  const LlamaConfig& c = model_->config();
  pool_->executor = std::make_unique<PoolExecutor>(model_, pool_->pool);
  TOKENLAKE_ASSIGN_OR_RETURN(
      pool_->loop,
      IterationLoop::Create(
          pool_->control_plane, pool_->executor.get(),
          {.segment_tokens = options_.segment_tokens,
           .salt = pool_->salt,
           .max_batch_tokens = options_.max_batch_tokens,
           .max_batch_requests = options_.max_batch_requests,
           .memory_admission = options_.memory_admission,
           .vocab_size = c.vocab_size,
           .max_request_tokens = c.max_position_embeddings,
           // An external pool's capacity is the cluster's, not known here.
           .pool_tokens = pool_->fixed_compute.valid()
                              ? 0
                              : int64_t{options_.num_instances} * options_.slots_per_instance *
                                    options_.segment_tokens,
           .fixed_compute = pool_->fixed_compute,
           .rotate_over_instances =
               options_.rotate_compute_instance ? options_.num_instances : 0}));
  return absl::OkStatus();
}

absl::StatusOr<GenerateResult> Engine::Generate(absl::Span<const int32_t> prompt,
                                                int32_t max_new_tokens) {
  return Generate(RequestId(), prompt, max_new_tokens);
}

absl::Status Engine::CheckInput(absl::Span<const int32_t> prompt, int32_t max_new_tokens) const {
  const LlamaConfig& c = model_->config();
  return StatusWithPrefix(lake::ValidatePrompt(prompt, max_new_tokens, {},
                                               {.vocab_size = c.vocab_size,
                                                .context_tokens = c.max_position_embeddings}),
                          "Generate: ");
}

absl::StatusOr<GenerateResult> Engine::Generate(RequestId request, absl::Span<const int32_t> prompt,
                                                int32_t max_new_tokens) {
  const GenerateRequest one{.id = request,
                            .prompt = std::vector<int32_t>(prompt.begin(), prompt.end()),
                            .max_new_tokens = max_new_tokens};
  std::vector<absl::StatusOr<GenerateResult>> r = GenerateBatch(absl::MakeConstSpan(&one, 1));
  return std::move(r[0]);
}

LoopRequest ToLoopRequest(const GenerateRequest& request, RequestId id) {
  return LoopRequest{.id = id,
                     .prompt = request.prompt,
                     .max_new_tokens = request.max_new_tokens,
                     .force_tokens = request.force_tokens,
                     .sampling = request.sampling,
                     .stop_token_ids = request.stop_token_ids,
                     .segment_salt = request.segment_salt};
}

GenerateResult ToGenerateResult(LoopResult r) {
  GenerateResult out;
  out.tokens = std::move(r.tokens);
  out.finish_reason = std::move(r.finish_reason);
  out.cached_tokens = r.cached_tokens;
  out.last_logits = std::move(r.last_logits);
  out.decode_logits = std::move(r.decode_logits);
  out.remote_attend_calls = r.data_plane.remote_attend_calls;
  out.pulled_segments = r.data_plane.pulled_segments;
  out.stored_segments = r.stored_segments;
  out.remote_stored_segments = r.remote_stored_segments;
  out.query_bytes_out = r.data_plane.query_bytes_out;
  out.partial_bytes_back = r.data_plane.partial_bytes_back;
  out.pulled_bytes = r.data_plane.pulled_bytes;
  out.remote_stored_bytes = r.remote_stored_bytes;
  out.iterations = r.iterations;
  out.restarts = r.restarts;
  return out;
}

std::vector<absl::StatusOr<LoopResult>> ServeInArrivalOrder(
    IterationLoop& loop, absl::Span<const GenerateRequest> requests,
    const std::function<absl::Status(const GenerateRequest&)>& check,
    const std::function<RequestId()>& next_id) {
  std::vector<absl::StatusOr<LoopResult>> out(
      requests.size(), absl::StatusOr<LoopResult>(absl::UnknownError("not served")));
  std::vector<size_t> order(requests.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return requests[a].arrival_iteration < requests[b].arrival_iteration;
  });
  absl::flat_hash_map<RequestId, size_t> index;
  size_t next = 0;
  int64_t pending = 0;
  for (int64_t iteration = 0;; ++iteration) {
    for (; next < order.size() && requests[order[next]].arrival_iteration <= iteration; ++next) {
      const size_t i = order[next];
      const GenerateRequest& r = requests[i];
      const RequestId id = r.id.valid() ? r.id : next_id();
      absl::Status in = check(r);
      if (in.ok()) in = loop.Submit(ToLoopRequest(r, id));
      if (!in.ok()) {
        out[i] = in;
        continue;
      }
      index[id] = i;
      ++pending;
    }
    if (pending == 0 && next == order.size()) break;
    for (LoopResult& r : loop.Step()) {
      auto it = index.find(r.id);
      if (it == index.end()) continue;
      --pending;
      if (r.status.ok()) {
        out[it->second] = std::move(r);
      } else {
        out[it->second] = std::move(r.status);
      }
    }
  }
  return out;
}

std::vector<absl::StatusOr<GenerateResult>> Engine::GenerateBatch(
    absl::Span<const GenerateRequest> requests) {
  std::vector<absl::StatusOr<GenerateResult>> out(
      requests.size(), absl::StatusOr<GenerateResult>(absl::UnknownError("not served")));
  if (pool_ == nullptr) {
    for (size_t i = 0; i < requests.size(); ++i) {
      const GenerateRequest& r = requests[i];
      absl::Status in = CheckInput(r.prompt, r.max_new_tokens);
      if (in.ok() && (!r.sampling.greedy() || !r.stop_token_ids.empty())) {
        in = absl::InvalidArgumentError(
            "Generate: sampling and stop tokens need the pool (use_pool = true)");
      }
      out[i] =
          in.ok() ? GenerateLocal(r.prompt, r.max_new_tokens) : absl::StatusOr<GenerateResult>(in);
    }
    return out;
  }
  if (!pool_->loop->idle()) {
    for (auto& o : out) {
      o = absl::FailedPreconditionError("Generate: requests submitted with Submit are pending");
    }
    return out;
  }
  std::vector<absl::StatusOr<LoopResult>> served = ServeInArrivalOrder(
      *pool_->loop, requests,
      [this](const GenerateRequest& r) { return CheckInput(r.prompt, r.max_new_tokens); },
      [this] { return RequestId(pool_->next_request++); });
  for (size_t i = 0; i < served.size(); ++i) {
    if (!served[i].ok()) {
      out[i] = served[i].status();
      continue;
    }
    ++pool_->finished_since_rebalance;
    out[i] = ToGenerateResult(*std::move(served[i]));
  }
  if (absl::Status s = MaybeRebalance(); !s.ok()) {
    for (auto& o : out) {
      if (o.ok()) o = s;
    }
  }
  return out;
}

absl::Status Engine::Submit(RequestId request, absl::Span<const int32_t> prompt,
                            int32_t max_new_tokens) {
  if (pool_ == nullptr) return absl::FailedPreconditionError("Submit: the engine has no pool");
  TOKENLAKE_RETURN_IF_ERROR(CheckInput(prompt, max_new_tokens));
  if (!request.valid()) request = RequestId(pool_->next_request++);
  return pool_->loop->Submit({.id = request,
                              .prompt = std::vector<int32_t>(prompt.begin(), prompt.end()),
                              .max_new_tokens = max_new_tokens});
}

absl::Status Engine::Submit(const GenerateRequest& request) {
  if (pool_ == nullptr) return absl::FailedPreconditionError("Submit: the engine has no pool");
  TOKENLAKE_RETURN_IF_ERROR(CheckInput(request.prompt, request.max_new_tokens));
  const RequestId id = request.id.valid() ? request.id : RequestId(pool_->next_request++);
  return pool_->loop->Submit(ToLoopRequest(request, id));
}

absl::Status Engine::Cancel(RequestId request) {
  if (pool_ == nullptr) return absl::FailedPreconditionError("Cancel: the engine has no pool");
  return pool_->loop->Cancel(request);
}

std::optional<Engine::Progress> Engine::ProgressOf(RequestId request) const {
  if (pool_ == nullptr) return std::nullopt;
  const LoopResult* r = pool_->loop->Progress(request);
  if (r == nullptr) return std::nullopt;
  return Progress{.tokens = r->tokens, .cached_tokens = r->cached_tokens};
}

std::vector<std::pair<RequestId, absl::StatusOr<GenerateResult>>> Engine::Step() {
  std::vector<std::pair<RequestId, absl::StatusOr<GenerateResult>>> out;
  if (pool_ == nullptr) return out;
  for (LoopResult& r : pool_->loop->Step()) {
    const RequestId id = r.id;
    if (r.status.ok()) {
      ++pool_->finished_since_rebalance;
      out.emplace_back(id, ToGenerateResult(std::move(r)));
    } else {
      out.emplace_back(id, std::move(r.status));
    }
  }
  if (absl::Status s = MaybeRebalance(); !s.ok()) {
    for (auto& o : out) {
      if (o.second.ok()) o.second = s;
    }
  }
  return out;
}

bool Engine::idle() const { return pool_ == nullptr || pool_->loop->idle(); }

LoopLoad Engine::Load() const { return pool_ == nullptr ? LoopLoad{} : pool_->loop->Load(); }

int32_t Engine::max_batch_requests_seen() const {
  return pool_ == nullptr ? 0 : pool_->loop->max_batch_requests_seen();
}

absl::Status Engine::MaybeRebalance() {
  if (options_.rebalance_every_requests <= 0 || pool_->lake == nullptr || !pool_->loop->idle() ||
      pool_->finished_since_rebalance < options_.rebalance_every_requests) {
    return absl::OkStatus();
  }
  pool_->finished_since_rebalance = 0;
  return RebalancePool();
}

int64_t Engine::rebalance_actions() const {
  return pool_ == nullptr ? 0 : pool_->rebalance_actions;
}

absl::Status Engine::RebalancePool() {
  if (pool_->lake == nullptr) return absl::FailedPreconditionError("RebalancePool: no own lake");
  InstancePool& pool = *pool_->pool;
  TOKENLAKE_ASSIGN_OR_RETURN(lake::RebalanceResult r, pool_->lake->Rebalance());
  // The lake applied the actions in order; replaying them in the same order on the data plane
  // always finds the source copy in place. Copies are driven by the receiving instance.
  for (const balance::BalanceAction& a : r.actions) {
    switch (a.kind) {
      case balance::ActionKind::kDrop:
        TOKENLAKE_RETURN_IF_ERROR(pool.FreeSegment(a.from, a.from, a.segment, r.sequence));
        break;
      case balance::ActionKind::kReplicate:
      case balance::ActionKind::kMove: {
        TOKENLAKE_RETURN_IF_ERROR(
            pool.CopyForRebalance(a.to, a.from, a.segment, r.sequence).status());
        if (a.kind == balance::ActionKind::kMove) {
          TOKENLAKE_RETURN_IF_ERROR(pool.FreeSegment(a.to, a.from, a.segment));
        }
        break;
      }
    }
    ++pool_->rebalance_actions;
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Engine::DropInstance(InstanceId instance) {
  if (pool_ == nullptr || pool_->lake == nullptr) {
    return absl::FailedPreconditionError("DropInstance: no pool of its own");
  }
  TOKENLAKE_RETURN_IF_ERROR(pool_->lake->DropInstance(instance));
  // Reconcile the data plane with the lake: free every slot whose replica the lake dropped.
  std::vector<absl::flat_hash_set<SegmentId>> listed(static_cast<size_t>(options_.num_instances));
  pool_->lake->prefix_tree().ForEachNode([&](const index::PrefixTree::Node& node) {
    for (InstanceId r : node.replicas) listed[static_cast<size_t>(r.value())].insert(node.id);
  });
  int64_t freed = 0;
  for (int32_t i = 0; i < options_.num_instances; ++i) {
    store::SegmentStore& st = pool_->pool->store(InstanceId(i));
    for (SegmentId id : st.Segments()) {
      if (listed[static_cast<size_t>(i)].contains(id)) continue;
      TOKENLAKE_RETURN_IF_ERROR(pool_->pool->FreeSegment(InstanceId(i), InstanceId(i), id));
      ++freed;
    }
  }
  return freed;
}

const lake::Lake* Engine::lake() const { return pool_ == nullptr ? nullptr : pool_->lake.get(); }

const InstancePool* Engine::instance_pool() const {
  return pool_ == nullptr ? nullptr : pool_->pool;
}

absl::StatusOr<GenerateResult> Engine::GenerateLocal(absl::Span<const int32_t> prompt,
                                                     int32_t max_new_tokens) {
  LocalKvBackend backend(model_->config());
  GenerateResult result;
  result.finish_reason = "length";
  TOKENLAKE_ASSIGN_OR_RETURN(std::vector<float> logits, model_->Forward(prompt, 0, backend));
  result.last_logits = logits;
  int64_t pos = static_cast<int64_t>(prompt.size());
  while (true) {
    const int32_t next = Argmax(logits);
    result.tokens.push_back(next);
    if (static_cast<int32_t>(result.tokens.size()) == max_new_tokens) break;
    const int32_t fed[1] = {next};
    TOKENLAKE_ASSIGN_OR_RETURN(logits, model_->Forward(fed, pos, backend));
    ++pos;
  }
  result.decode_logits = std::move(logits);
  return result;
}

}  // namespace tokenlake::engine
