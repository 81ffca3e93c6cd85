// Engine: serves greedy generation for a Llama model with its KV cache in the TokenLake pool
// (or, with use_pool = false, in a private per-request cache: the reference path).
//
// Pool path (TOKENLAKE.md sections 3, 4.4, 4.5). N instances run as threads of this process
// (InstancePool: a SegmentStore over a real host arena per instance, a loopback transport
// between them). Requests are served by the IterationLoop (iteration_loop.h) with continuous
// batching: requests join and leave at every iteration, prompts are prefilled in chunks under
// a per-iteration token budget, decodes go first, and a request waits while the pool cannot
// hold its new KV. Per iteration the loop makes ONE control-plane call for the whole batch
// (the plans: cached segments, serving replicas and actions, where new segments go), pulls the
// KV of kPullKv segments, runs the model once over the batch's tokens (LlamaModel::
// ForwardBatch; per layer each request's queries go to its kMoveQueries holders, which return
// partial attention merged by log-sum-exp with its local and pulled partials and its causal
// tail), then writes every completed segment's KV where the lake's commit says (the
// PoolExecutor of pool_backend.h). The part-segment tail stays on the computing instance
// (float32) until it completes a segment. At the end of a request its segments are released
// (unpinned). Optionally, every few requests (when no request is running) the lake rebalances
// (heavy-hitter replicas, moves) and the engine copies or frees the KV to match.
//
// Control plane and data plane (control_plane.h, instance_pool.h). Engine::Create builds both
// in-process: a lake::Lake behind a lake::LocalControlPlane and an InstancePool of N instance
// threads over a loopback. Engine::CreateOverPool runs the SAME iteration loop over an external
// lake::ControlPlane (in the cluster: the coordinator's lake over gRPC) and an external
// InstancePool that hosts only some instances (in the cluster: this process's instance, on a
// TcpTransport, the others being remote endpoints), with a fixed computing instance: an instance
// computes its own requests. When the lake's plan names another computing instance, the engine
// still computes on its own and treats every cached segment by its holder (local store, remote
// attend or pull), which gives the same answer. In that mode the caller assigns the request
// ids (unique across the cluster), frees of segments already gone are not errors (the cluster
// reconciles stores asynchronously), and rebalancing / DropInstance are the caller's business.
//
// Thread-safety: not thread-safe; one thread calls Generate / GenerateBatch / Submit / Step.
#ifndef TOKENLAKE_ENGINE_ENGINE_H_
#define TOKENLAKE_ENGINE_ENGINE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/balance/balancer.h"
#include "tokenlake/balance/heavy_hitter.h"
#include "tokenlake/engine/instance_pool.h"
#include "tokenlake/engine/iteration_loop.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/engine/sampler.h"
#include "tokenlake/lake/control_plane.h"
#include "tokenlake/lake/lake.h"

namespace tokenlake::engine {

struct EngineOptions {
  // Serve from the TokenLake pool (true) or from a private per-request KV cache (false).
  bool use_pool = true;
  // Number of instances (threads) of the pool, >= 1.
  int32_t num_instances = 1;
  // Tokens per segment (S), >= 1.
  int32_t segment_tokens = 16;
  // Segment slots per instance, >= 1 (each slot holds one segment's KV for all layers).
  int32_t slots_per_instance = 512;
  // Element type of the KV stored in the pool.
  attention::KvDtype kv_dtype = attention::KvDtype::kFloat32;
  // Namespace of the segment ids (a different model must use a different one).
  std::string namespace_name = "tokenlake-engine";
  // Prefer computing request k on instance k mod num_instances (the lake still decides; the
  // preference only applies when it is in the group and under its cap). Spreads the computing
  // instances so that cached segments are often served by other instances (exercises query
  // movement and KV pulls). false = no preference (the lake picks where most of the prefix is).
  bool rotate_compute_instance = false;
  // Run the lake's Rebalance (replicate heavy hitters, drop cooled replicas, move warm segments)
  // after every this many requests and copy / free the KV on the data plane accordingly.
  // 0 = never.
  int32_t rebalance_every_requests = 0;
  // Heavy-hitter detection knobs handed to the lake (its num_instances is set from this
  // struct).
  balance::HeavyHitterOptions heavy_hitter;
  // Placement and rebalancing knobs handed to the lake.
  balance::BalancerOptions balancer;
  // How long the computing instance waits for a holder's reply (DeadlineExceeded after).
  absl::Duration reply_timeout = absl::Seconds(60);
  // Optional wrapper of the instances' loopback transport (e.g. a fault-injecting decorator).
  InstancePool::TransportWrapper wrap_transport;
  // Continuous batching (pool path): tokens computed per iteration over the whole batch
  // (decodes and prompt chunks), >= 1; requests per iteration, >= 1; memory admission (a
  // request waits while the pool cannot hold its new segments).
  int64_t max_batch_tokens = 2048;
  int32_t max_batch_requests = 256;
  bool memory_admission = true;
};

// One request of GenerateBatch.
struct GenerateRequest {
  // The control plane's id (required over an external pool; invalid = the engine's next own).
  RequestId id;
  std::vector<int32_t> prompt;
  int32_t max_new_tokens = 1;
  // The iteration of the GenerateBatch call at which the request arrives (0 = at once).
  int32_t arrival_iteration = 0;
  // Teacher forcing (tests; pool path): step i feeds force_tokens[i] instead of its argmax;
  // empty = none, else at least max_new_tokens - 1 tokens in the vocabulary.
  std::vector<int32_t> force_tokens;
  // How tokens are chosen (default greedy), and the ids that end the request (pool path; see
  // LoopRequest).
  SamplingParams sampling;
  std::vector<int32_t> stop_token_ids;
  // The salt of its segment ids (index::TenantSalt; pool path); 0 = the engine's namespace.
  uint64_t segment_salt = 0;
};

class IterationLoop;
struct LoopResult;

// Serves `requests` on `loop`, which must hold no request: each is checked by `check` and
// submitted at its arrival iteration (ties in request order) under its id, or `next_id()` when
// the id is invalid; the loop steps until every submitted request finished. Returns, per request
// in order, its LoopResult (status OK) or why it was not served (the check's error, Submit's,
// or the loop's status for it). The one arrival driver of the CPU and GPU engines.
std::vector<absl::StatusOr<LoopResult>> ServeInArrivalOrder(
    IterationLoop& loop, absl::Span<const GenerateRequest> requests,
    const std::function<absl::Status(const GenerateRequest&)>& check,
    const std::function<RequestId()>& next_id);

struct GenerateResult {
  // The chosen tokens (greedy unless the request samples): max_new_tokens of them, or fewer
  // when a stop token ended the request (it is the last one).
  std::vector<int32_t> tokens;
  // "length" or "stop" (see LoopResult).
  std::string finish_reason;
  // Prompt tokens served from the pool (not recomputed); 0 without the pool.
  int64_t cached_tokens = 0;
  // Logits at the last prompt position [vocab_size].
  std::vector<float> last_logits;
  // Logits at the last fed position (that produced tokens.back()) [vocab_size].
  std::vector<float> decode_logits;
  // Data-plane traffic of this request: attend calls sent to other instances, segments pulled,
  // segments stored (anywhere) and stored away from the computing instance.
  int64_t remote_attend_calls = 0;
  int64_t pulled_segments = 0;
  int64_t stored_segments = 0;
  int64_t remote_stored_segments = 0;
  // Bytes of that traffic: query tensors sent to holders, partial results back, KV pulled,
  // KV stored on other instances.
  int64_t query_bytes_out = 0;
  int64_t partial_bytes_back = 0;
  int64_t pulled_bytes = 0;
  int64_t remote_stored_bytes = 0;
  // Iterations the request ran in (pool path), and restarts after its pooled prefix was lost.
  int64_t iterations = 0;
  int64_t restarts = 0;
};

// The loop's request for `request` under id `id`, and a finished request's result: the one
// conversion of the engines (CPU and GPU) and the cluster's instance backends.
LoopRequest ToLoopRequest(const GenerateRequest& request, RequestId id);
GenerateResult ToGenerateResult(LoopResult result);

// What Engine::CreateOverPool runs over (all borrowed, must outlive the engine).
struct ExternalPool {
  // The lake's calls (e.g. service::RemoteControlPlane).
  lake::ControlPlane* control_plane = nullptr;
  // The data plane; must host compute_instance and have control_plane->num_instances()
  // instances with the model's slot layout.
  InstancePool* pool = nullptr;
  // The instance that computes every request of this engine.
  InstanceId compute_instance;
};

class Engine {
 public:
  // `model` is borrowed and must outlive the engine.
  // Errors: InvalidArgument naming a bad option; errors creating the pool.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const LlamaModel* model,
                                                        const EngineOptions& options);
  // An engine over an external control plane and data plane (see the file comment). Of
  // `options`, segment_tokens, namespace_name and kv_dtype must match the pool and the
  // control plane; use_pool, num_instances, slots_per_instance, rotate_compute_instance,
  // rebalance_every_requests, the lake knobs and wrap_transport are ignored.
  // Errors: InvalidArgument (null pointers, compute_instance not hosted, layout mismatch).
  static absl::StatusOr<std::unique_ptr<Engine>> CreateOverPool(const LlamaModel* model,
                                                                const EngineOptions& options,
                                                                const ExternalPool& external);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Greedy generation of max_new_tokens (>= 1) tokens after `prompt` (non-empty, ids in the
  // vocabulary). With the pool, the request's full segments (prompt and generated tokens whose
  // KV was computed) stay in the pool for later requests.
  // Errors: InvalidArgument (empty prompt, bad token naming its index, max_new_tokens < 1);
  //   InvalidArgument when prompt + max_new_tokens exceeds the model's context
  //   (max_position_embeddings, when the config gives one); internal data-plane errors. A
  //   request never waits forever for pool memory: when nothing else runs it is admitted and
  //   its segments that find no slot stay in its tail.
  absl::StatusOr<GenerateResult> Generate(absl::Span<const int32_t> prompt, int32_t max_new_tokens);
  // The same with the control plane's request id chosen by the caller (required over an
  // external pool, where ids must be unique across the cluster; an invalid id = the engine's
  // next own id). Errors: as Generate, plus the control plane's (AlreadyExists for an id in
  // use, Unavailable when it cannot be reached).
  absl::StatusOr<GenerateResult> Generate(RequestId request, absl::Span<const int32_t> prompt,
                                          int32_t max_new_tokens);

  // Serves every request with continuous batching (the pool path; without the pool one after
  // another on the reference path) and returns each one's result or error, in order.
  // Errors: per request as Generate; FailedPrecondition for all while requests submitted with
  // Submit are pending.
  std::vector<absl::StatusOr<GenerateResult>> GenerateBatch(
      absl::Span<const GenerateRequest> requests);

  // Incremental form (a server that takes requests while it computes; pool path only): Submit
  // queues a request (errors as Generate's input checks, FailedPrecondition without the pool),
  // Step runs one iteration and returns the requests that finished in it.
  absl::Status Submit(RequestId request, absl::Span<const int32_t> prompt, int32_t max_new_tokens);
  std::vector<std::pair<RequestId, absl::StatusOr<GenerateResult>>> Step();
  // Submit with the request's sampling parameters and stop token ids (its arrival_iteration
  // is ignored; an invalid id = the engine's next own). Errors: as Submit, plus
  // InvalidArgument for sampling parameters out of range or a stop id outside the vocabulary.
  absl::Status Submit(const GenerateRequest& request);
  // Ends a submitted request now (IterationLoop::Cancel: its pins and KV tail are released;
  // Step never returns it). Errors: NotFound when it is not pending; FailedPrecondition
  // without the pool.
  absl::Status Cancel(RequestId request);
  // A pending request's progress: the tokens produced so far and the prompt tokens served
  // from the pool (0 before its first prefill ran); nullopt when it is not pending. The span is
  // valid until the next Submit, Step or Cancel.
  struct Progress {
    absl::Span<const int32_t> tokens;
    int64_t cached_tokens = 0;
  };
  std::optional<Progress> ProgressOf(RequestId request) const;
  // No request pending (always true without the pool).
  bool idle() const;
  // The most requests that ran in one iteration so far (0 without the pool).
  int32_t max_batch_requests_seen() const;
  // The pending requests by phase (IterationLoop::Load; all zero without the pool).
  LoopLoad Load() const;

  const EngineOptions& options() const { return options_; }

  class PoolState;  // the pool path's state (instances, lake); defined in engine.cc

  // The pool's own lake (null without the pool or over an external pool). For tests and
  // statistics.
  const lake::Lake* lake() const;
  // The pool's data plane (null without the pool).
  const InstancePool* instance_pool() const;
  // Rebalance actions applied so far (pool path).
  int64_t rebalance_actions() const;

  // Simulates the loss of `instance` (its memory is gone): the lake drops its replicas (and the
  // subtrees that lose their last copy), and every instance's store frees what the lake no
  // longer lists. The instance stays in the pool, empty, and keeps serving. Later requests
  // recompute what was lost; outputs do not change. Returns the number of slots freed.
  // Errors: FailedPrecondition without the pool; InvalidArgument for an unknown instance.
  absl::StatusOr<int64_t> DropInstance(InstanceId instance);

 private:
  Engine(const LlamaModel* model, const EngineOptions& options);
  absl::StatusOr<GenerateResult> GenerateLocal(absl::Span<const int32_t> prompt,
                                               int32_t max_new_tokens);
  // Generate's input checks.
  absl::Status CheckInput(absl::Span<const int32_t> prompt, int32_t max_new_tokens) const;
  // Creates the iteration loop over the pool state's control plane and data plane.
  absl::Status StartLoop();
  // Rebalances when due and no request is running.
  absl::Status MaybeRebalance();
  // Runs lake::Rebalance and mirrors its actions on the instances' stores.
  absl::Status RebalancePool();

  const LlamaModel* model_;
  EngineOptions options_;
  std::unique_ptr<PoolState> pool_;
};

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_ENGINE_H_
