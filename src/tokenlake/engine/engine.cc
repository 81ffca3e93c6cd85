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
#include "tokenlake/engine/local_backend.h"
#include "tokenlake/engine/ops.h"
#include "tokenlake/engine/pool_backend.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/plan/plan_types.h"

namespace tokenlake::engine {

class Engine::PoolState {
 public:
  // In-process (Create): the owned pool, lake and its control plane.
  std::unique_ptr<InstancePool> own_pool;
  std::unique_ptr<lake::Lake> lake;
  std::unique_ptr<LocalControlPlane> local_control_plane;
  // What the iterations run over (the owned ones or CreateOverPool's).
  InstancePool* pool = nullptr;
  ControlPlane* control_plane = nullptr;
  // Valid over an external pool: the instance that computes every request.
  InstanceId fixed_compute;
  ManualClock clock{1};
  uint64_t salt = 0;
  uint64_t next_request = 1;
  int64_t rebalance_actions = 0;
};

namespace {

// The keys of the full segments of tokens[0, end).
absl::StatusOr<std::vector<index::SegmentKey>> FullKeys(uint64_t salt,
                                                        absl::Span<const int32_t> tokens,
                                                        int64_t end, int32_t segment_tokens) {
  const int64_t full = end / segment_tokens * segment_tokens;
  return index::ComputeSegmentKeys(salt, tokens.subspan(0, static_cast<size_t>(full)),
                                   segment_tokens);
}

// Drops the first `rows` token rows of every layer of the tail.
void DropTailRows(SequenceTail& tail, int64_t rows, int64_t row_elems) {
  for (size_t l = 0; l < tail.k.size(); ++l) {
    tail.k[l].erase(tail.k[l].begin(), tail.k[l].begin() + rows * row_elems);
    tail.v[l].erase(tail.v[l].begin(), tail.v[l].begin() + rows * row_elems);
  }
}

// One segment's slot image from tail rows [first_row, first_row + S).
std::vector<std::byte> BuildSlot(const SequenceTail& tail, int64_t first_row,
                                 const attention::KvSlotLayout& layout) {
  std::vector<std::byte> slot(static_cast<size_t>(layout.SlotBytes()));
  const int64_t row_elems = int64_t{layout.num_kv_heads} * layout.head_dim;
  const int64_t elems = row_elems * layout.segment_tokens;
  for (int32_t l = 0; l < layout.num_layers; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      const float* src =
          (kv == 0 ? tail.k : tail.v)[static_cast<size_t>(l)].data() + first_row * row_elems;
      std::byte* dst = slot.data() + layout.BlockOffsetBytes(l, kv);
      if (layout.dtype == attention::KvDtype::kFloat32) {
        std::memcpy(dst, src, static_cast<size_t>(elems) * sizeof(float));
      } else {
        for (int64_t i = 0; i < elems; ++i) {
          const uint16_t bits = attention::FloatToBf16(src[i]);
          std::memcpy(dst + 2 * i, &bits, 2);
        }
      }
    }
  }
  return slot;
}

}  // namespace

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
    const attention::KvSlotLayout layout{.num_layers = c.num_layers,
                                         .segment_tokens = options.segment_tokens,
                                         .num_kv_heads = c.num_kv_heads,
                                         .head_dim = c.head_dim,
                                         .dtype = options.kv_dtype};
    TOKENLAKE_ASSIGN_OR_RETURN(
        state->own_pool, InstancePool::Create({.num_instances = options.num_instances,
                                               .layout = layout,
                                               .num_heads = c.num_heads,
                                               .slots_per_instance = options.slots_per_instance,
                                               .reply_timeout = options.reply_timeout,
                                               .wrap_transport = options.wrap_transport}));
    lake::LakeOptions lo;
    lo.num_instances = options.num_instances;
    lo.segment_tokens = options.segment_tokens;
    lo.slots_per_instance = options.slots_per_instance;
    lo.heavy_hitter = options.heavy_hitter;
    lo.heavy_hitter.num_instances = options.num_instances;
    lo.balancer = options.balancer;
    lo.model = plan::ModelShape{
        .num_layers = c.num_layers,
        .num_heads = c.num_heads,
        .num_kv_heads = c.num_kv_heads,
        .head_dim = c.head_dim,
        .dtype_bytes = static_cast<int32_t>(attention::KvDtypeBytes(options.kv_dtype))};
    TOKENLAKE_ASSIGN_OR_RETURN(state->lake, lake::Lake::Create(lo, &state->clock));
    state->local_control_plane =
        std::make_unique<LocalControlPlane>(state->lake.get(), &state->clock);
    state->pool = state->own_pool.get();
    state->control_plane = state->local_control_plane.get();
    state->salt = index::NamespaceSalt(options.namespace_name);
    engine->pool_ = std::move(state);
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
  return engine;
}

absl::StatusOr<GenerateResult> Engine::Generate(absl::Span<const int32_t> prompt,
                                                int32_t max_new_tokens) {
  return Generate(RequestId(), prompt, max_new_tokens);
}

absl::StatusOr<GenerateResult> Engine::Generate(RequestId request, absl::Span<const int32_t> prompt,
                                                int32_t max_new_tokens) {
  if (prompt.empty()) return absl::InvalidArgumentError("Generate: empty prompt");
  if (max_new_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Generate: max_new_tokens must be >= 1, got %d", max_new_tokens));
  }
  const int32_t vocab = model_->config().vocab_size;
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrFormat("Generate: prompt token %d at index %d is outside the vocabulary [0, %d)",
                          prompt[i], i, vocab));
    }
  }
  if (pool_ == nullptr) return GenerateLocal(prompt, max_new_tokens);
  if (!request.valid()) request = RequestId(pool_->next_request++);
  absl::StatusOr<GenerateResult> result = GeneratePooled(request, prompt, max_new_tokens);
  if (result.ok() && options_.rebalance_every_requests > 0 && pool_->lake != nullptr &&
      (pool_->next_request - 1) % static_cast<uint64_t>(options_.rebalance_every_requests) == 0) {
    TOKENLAKE_RETURN_IF_ERROR(RebalancePool());
  }
  return result;
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
        StoredMeta meta;
        TOKENLAKE_ASSIGN_OR_RETURN(std::vector<std::byte> slot,
                                   pool.PullSegment(a.to, a.from, a.segment, &meta));
        meta.placement_sequence = r.sequence;
        TOKENLAKE_RETURN_IF_ERROR(pool.StoreSegment(a.to, a.to, a.segment, slot, meta));
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

absl::StatusOr<GenerateResult> Engine::GeneratePooled(RequestId request,
                                                      absl::Span<const int32_t> prompt,
                                                      int32_t max_new_tokens) {
  const LlamaConfig& c = model_->config();
  const int32_t s = options_.segment_tokens;
  const int64_t row_elems = int64_t{c.num_kv_heads} * c.head_dim;
  InstancePool& pool = *pool_->pool;
  ControlPlane& control = *pool_->control_plane;
  const bool external = pool_->fixed_compute.valid();
  const InstanceId preferred =
      external ? pool_->fixed_compute
      : options_.rotate_compute_instance
          ? InstanceId(static_cast<int32_t>(request.value() % options_.num_instances))
          : InstanceId();

  GenerateResult result;
  PoolTraffic traffic;
  std::vector<int32_t> seq(prompt.begin(), prompt.end());
  SequenceTail tail;
  tail.k.resize(static_cast<size_t>(c.num_layers));
  tail.v.resize(static_cast<size_t>(c.num_layers));
  int64_t pooled = 0;    // tokens of the sequence's prefix held by the pool (multiple of S)
  int64_t computed = 0;  // tokens whose KV exists (pool prefix + tail); tail = [pooled, computed)
  InstanceId last_compute = preferred;
  std::vector<float> logits;
  // The control-plane request of the next iteration (the sequence as it stands).
  auto make_request = [&](bool prefill) -> absl::StatusOr<IterationRequest> {
    const int64_t end = static_cast<int64_t>(seq.size());
    // Segments that may be served from the pool: only those before the first token to compute.
    const int64_t first_new = prefill ? end - 1 : computed;
    TOKENLAKE_ASSIGN_OR_RETURN(std::vector<index::SegmentKey> keys,
                               FullKeys(pool_->salt, seq, end, s));
    return IterationRequest{.request = request,
                            .keys = std::move(keys),
                            .max_cached_segments = static_cast<int32_t>(first_new / s),
                            .end_tokens = end,
                            .prefill = prefill,
                            .computed_tokens = computed,
                            .preferred_instance = prefill ? preferred : last_compute,
                            .count_hits = prefill};
  };
  // 1. Match, plan and admit in one call to the control plane: PlanIteration for the prefill,
  // then, for every later iteration, ReleaseAndPlan at the end of the one before (one round
  // trip instead of two over a remote control plane; control_plane.h).
  TOKENLAKE_ASSIGN_OR_RETURN(IterationRequest ir, make_request(true));
  TOKENLAKE_ASSIGN_OR_RETURN(IterationPlan ip, control.PlanIteration(ir));
  for (int32_t step = 0;; ++step) {
    const bool prefill = step == 0;
    const int64_t end = ir.end_tokens;
    std::vector<index::SegmentKey> keys = std::move(ir.keys);
    keys.resize(static_cast<size_t>(ip.num_keys));
    const int64_t cached = ip.cached_tokens;
    const InstanceId compute = external ? pool_->fixed_compute : ip.compute_instance;
    last_compute = compute;

    // Executes the plan; on any error the request is released before returning.
    auto run_iteration = [&]() -> absl::Status {
      if (cached < pooled) {
        return absl::InternalError(
            absl::StrFormat("Generate: request %d lost pooled segments (matched %d tokens, had %d)",
                            request.value(), cached, pooled));
      }
      if (prefill) {
        computed = cached;
        result.cached_tokens = cached;
      } else {
        // Tokens in [pooled, cached) are in the tail and (identically: same ids, same prefix)
        // in the pool, committed by another request or an earlier iteration: drop them here.
        DropTailRows(tail, cached - pooled, row_elems);
      }
      pooled = cached;
      if (end - computed != ip.new_tokens || ip.new_tokens < 1) {
        return absl::InternalError(
            absl::StrFormat("Generate: plan computes %d tokens, the request has %d", ip.new_tokens,
                            end - computed));
      }

      // 2. Segments by holder: local, pulled (KV copied here now), or queries sent per layer.
      std::vector<RemoteHolder> remote;
      std::vector<SegmentRef> local;
      std::vector<PulledSegment> pulled;
      for (const plan::SegmentAssignment& a : ip.segments) {
        const SegmentRef ref{a.segment, a.num_tokens};
        if (a.holder == compute) {
          local.push_back(ref);
        } else if (a.action == plan::HolderAction::kPullKv) {
          TOKENLAKE_ASSIGN_OR_RETURN(std::vector<std::byte> slot,
                                     pool.PullSegment(compute, a.holder, a.segment));
          result.pulled_bytes += static_cast<int64_t>(slot.size());
          pulled.push_back({ref, std::move(slot)});
          ++result.pulled_segments;
        } else {
          auto it = std::find_if(remote.begin(), remote.end(),
                                 [&](const RemoteHolder& r) { return r.holder == a.holder; });
          if (it == remote.end()) {
            remote.push_back({a.holder, {}});
            it = remote.end() - 1;
          }
          it->segments.push_back(ref);
        }
      }
      // 3. The model, attention merged over all of them.
      PoolBackend backend(&pool, c, compute, std::move(remote), std::move(local), std::move(pulled),
                          &tail, &traffic);
      TOKENLAKE_ASSIGN_OR_RETURN(
          logits, model_->Forward(absl::MakeConstSpan(seq).subspan(static_cast<size_t>(computed)),
                                  computed, backend));
      computed = end;

      // 4. Store the segments this iteration completed where the lake says, then publish them.
      TOKENLAKE_ASSIGN_OR_RETURN(lake::CommitResult commit,
                                 control.Commit(request, ip.new_segments));
      for (const lake::StoredReplica& e : commit.evicted) {
        // Only the evicted copy: the same segment placed there again since (a later change of
        // the lake) stays.
        absl::Status freed = pool.FreeSegment(compute, e.instance, e.segment, commit.sequence);
        // Over an external pool the stores are reconciled with the lake by the cluster: a copy
        // already gone (or on an instance that died) is not this request's failure.
        if (!external) TOKENLAKE_RETURN_IF_ERROR(freed);
      }
      absl::flat_hash_map<SegmentId, InstanceId> stored_on;
      for (const lake::StoredReplica& st : commit.stored) stored_on[st.segment] = st.instance;
      absl::flat_hash_set<SegmentId> dedup(commit.deduplicated.begin(), commit.deduplicated.end());
      int64_t now_pooled = pooled;
      bool contiguous = true;
      for (size_t j = static_cast<size_t>(pooled / s); j < keys.size(); ++j) {
        const SegmentId id = keys[j].id;
        auto it = stored_on.find(id);
        if (it != stored_on.end()) {
          const int64_t first_row = static_cast<int64_t>(j) * s - pooled;
          const std::vector<std::byte> slot = BuildSlot(tail, first_row, pool.layout());
          const StoredMeta meta{j > 0 ? keys[j - 1].id : SegmentId(), keys[j].num_tokens,
                                commit.sequence};
          TOKENLAKE_RETURN_IF_ERROR(pool.StoreSegment(compute, it->second, id, slot, meta));
          ++result.stored_segments;
          if (it->second != compute) {
            ++result.remote_stored_segments;
            result.remote_stored_bytes += static_cast<int64_t>(slot.size());
          }
        } else if (!dedup.contains(id)) {
          contiguous = false;
        }
        if (contiguous) now_pooled = static_cast<int64_t>(j + 1) * s;
      }
      DropTailRows(tail, now_pooled - pooled, row_elems);
      pooled = now_pooled;
      return absl::OkStatus();
    };
    if (absl::Status status = run_iteration(); !status.ok()) {
      // A failed iteration still releases what it pinned.
      control.Release(request).IgnoreError();
      return status;
    }

    if (prefill) result.last_logits = logits;
    const int32_t next = Argmax(logits);
    result.tokens.push_back(next);
    if (static_cast<int32_t>(result.tokens.size()) == max_new_tokens) {
      TOKENLAKE_RETURN_IF_ERROR(control.Release(request));
      break;
    }
    seq.push_back(next);
    absl::StatusOr<IterationRequest> next_request = make_request(false);
    if (!next_request.ok()) {
      control.Release(request).IgnoreError();
      return next_request.status();
    }
    absl::StatusOr<IterationPlan> next_plan = control.ReleaseAndPlan(request, *next_request);
    if (!next_plan.ok()) {
      // An error the control plane answered leaves nothing pinned (the Release part failed and
      // nothing changed, or it was applied and nothing was admitted): releasing again would be
      // a second Release. A call that failed on the wire may have applied nothing, the Release,
      // or both: one more Release frees whichever pin is left (NotFound, ignored, if none is).
      if (FailedOnTheWire(next_plan.status())) control.Release(request).IgnoreError();
      return next_plan.status();
    }
    ir = *std::move(next_request);
    ip = *std::move(next_plan);
  }
  result.decode_logits = std::move(logits);
  result.remote_attend_calls = traffic.remote_attend_calls;
  result.query_bytes_out = traffic.query_bytes_out;
  result.partial_bytes_back = traffic.partial_bytes_back;
  return result;
}

absl::StatusOr<GenerateResult> Engine::GenerateLocal(absl::Span<const int32_t> prompt,
                                                     int32_t max_new_tokens) {
  LocalKvBackend backend(model_->config(), nullptr);
  GenerateResult result;
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
