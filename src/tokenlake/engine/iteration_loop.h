// IterationLoop: the one scheduler / iteration loop that serves requests over the TokenLake pool
// with continuous batching (TOKENLAKE.md sections 3, 4.4, 4.5). The CPU engine (engine.cc) and
// the cluster's instance processes (through the CPU engine over a remote control plane) run it;
// the model runner and the data plane sit behind IterationExecutor, the lake behind
// lake::ControlPlane.
//
// Requests join (Submit) and leave (finished) at every iteration. One Step is one iteration:
//   1. the batch: running requests whose next token is their last one to compute (decodes)
//      first, then prefill work (running prompts' next chunks, then new requests in arrival
//      order), under a per-iteration token budget (a prompt is cut into chunks) and a cap on
//      the requests per iteration; the control plane applies the budget to the new requests
//      after their cached prefixes, which only it knows (so more of them are offered than
//      the budget could compute uncached); a running request left out keeps its pins (its
//      pooled segments stay in the pool) and runs in a later iteration;
//   2. ONE control-plane call for the whole batch (lake::ControlPlane::PlanBatch): it confirms the
//      copies the previous iterations stored (they become visible to plans), releases the
//      pins of the requests' previous iterations and of the requests that finished, then plans
//      and admits each request of the batch: cached prefix, computing instance, per cached
//      segment the serving replica and action (move queries / pull KV), where the segments this
//      iteration completes go. With memory admission (TryAdmit) a request whose new segments do
//      not fit waits (nothing of it pinned) and asks again next iteration; when nothing of the
//      batch could be admitted the oldest waiting request is admitted anyway (its segments that
//      find no slot stay in its tail), so the loop never waits on itself;
//   3. the executor runs the batch: per request its new tokens and its KV context (the plan's
//      cached segments, its tail), one forward over all of them;
//   4. per request with new segments: Commit (the copies are placed pending), free the evicted
//      replicas, write the completed segments where the commit says; the pooled prefix grows
//      and the tail shrinks. The copies written are confirmed by the next call (step 2, or the
//      confirm-and-release call of a loop that runs dry, a failure or a Cancel): no plan of
//      any engine reads a copy before its data is there (lake/control_plane.h). A segment
//      another request placed and has not confirmed (pending_elsewhere) stays in the tail.
// A request whose pooled prefix was lost (evicted while it held no pins, or an instance lost)
// is restarted from what the pool still holds: it is prefilled again over its whole sequence
// (its generated tokens kept).
//
// Each request's tokens and logits equal its single-request run (the forward is row-independent
// and the attention per request; float rounding of the partial merges aside).
//
// Thread-safety: not thread-safe (one thread drives Submit and Step).
#ifndef TOKENLAKE_ENGINE_ITERATION_LOOP_H_
#define TOKENLAKE_ENGINE_ITERATION_LOOP_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/engine/instance_pool.h"
#include "tokenlake/engine/sampler.h"
#include "tokenlake/lake/control_plane.h"

namespace tokenlake::engine {

struct IterationLoopOptions {
  // Tokens per segment (S), >= 1; must match the control plane and the data plane.
  int32_t segment_tokens = 16;
  // Namespace salt of the segment ids.
  uint64_t salt = 0;
  // Tokens computed per iteration over the whole batch (decodes and prefill chunks), >= 1.
  int64_t max_batch_tokens = 2048;
  // Requests per iteration, >= 1.
  int32_t max_batch_requests = 256;
  // Admit plans with TryAdmit (a request waits while the pool cannot hold its new segments).
  bool memory_admission = true;
  // Vocabulary size (prompt tokens are checked against it), >= 1.
  int32_t vocab_size = 1;
  // Longest sequence of one request (prompt + new tokens), 0 = no limit (the model's context).
  int64_t max_request_tokens = 0;
  // The pool's capacity in tokens (every instance's slots x segment_tokens), 0 = unknown (an
  // external pool). A request whose prompt and new tokens need more segments than the whole
  // pool holds could never have its KV pooled: Submit refuses it (ResourceExhausted).
  int64_t pool_tokens = 0;
  // Valid: every request is computed on this instance (an engine over an external pool), and a
  // free of a replica already gone is not an error (the cluster reconciles stores).
  InstanceId fixed_compute;
  // > 0: prefer computing request r on instance r mod this (spreads the computing instances).
  int32_t rotate_over_instances = 0;
  // The executor keeps each request's KV tail in slots of the pool that the control plane
  // accounts (lake::IterationRequest::tail_in_pool; docs/adr/0017): an admitted plan names the
  // tail's blocks (IterationPlan::tail_slots) and the copies evicted to make room for them,
  // which the loop frees before the batch runs; a request's tail goes back when it ends
  // (ReleaseTail, with its pins). When a forced admission finds no room for a tail, the
  // youngest other request holding a tail is preempted (its tail dropped, its KV recomputed
  // from what the pool holds when it runs again); with none to preempt the request fails
  // (ResourceExhausted).
  bool tails_in_pool = false;
};

struct LoopRequest {
  // Unique among the loop's requests and the control plane's active requests, valid.
  RequestId id;
  std::vector<int32_t> prompt;
  int32_t max_new_tokens = 1;
  // Teacher forcing (tests): step i feeds force_tokens[i] instead of its argmax; empty = none,
  // else at least max_new_tokens - 1 entries.
  std::vector<int32_t> force_tokens;
  // How the next token is chosen (engine/sampler.h; default greedy).
  SamplingParams sampling;
  // The request ends after producing one of these (e.g. the model's end-of-sequence id); the
  // stop token is its last token.
  std::vector<int32_t> stop_token_ids;
  // The salt its segment ids chain from (index::TenantSalt); 0 = the loop's namespace salt.
  uint64_t segment_salt = 0;
};

// Data-plane work of one request (the executor's counters).
struct DataPlaneCounters {
  int64_t remote_attend_calls = 0;
  int64_t local_attend_calls = 0;
  int64_t pulled_segments = 0;
  int64_t pulled_bytes = 0;
  int64_t query_bytes_out = 0;
  int64_t partial_bytes_back = 0;
};

struct LoopResult {
  RequestId id;
  // OK, or why the request failed (the rest is then partial).
  absl::Status status;
  std::vector<int32_t> tokens;
  // Why it ended: "length" (max_new_tokens produced) or "stop" (a stop token produced).
  std::string finish_reason;
  // Prompt tokens served from the pool at its first prefill.
  int64_t cached_tokens = 0;
  // Logits at the last prompt position and at the last fed position [vocab_size] (the logits
  // of its last token; empty when a stop token ended a greedy request whose executor returned
  // only the argmax at that step).
  std::vector<float> last_logits;
  std::vector<float> decode_logits;
  int64_t stored_segments = 0;
  int64_t remote_stored_segments = 0;
  int64_t remote_stored_bytes = 0;
  DataPlaneCounters data_plane;
  // Iterations the request took part in, and restarts after a lost pooled prefix.
  int64_t iterations = 0;
  int64_t restarts = 0;
  // Wall time of each iteration it took part in (the whole batch's iteration: control plane,
  // forward, stores), microseconds.
  std::vector<double> iteration_us;
};

// What one request contributes to an iteration.
struct IterationWork {
  RequestId request;
  // The tokens to compute (positions start_pos, start_pos + 1, ...).
  absl::Span<const int32_t> tokens;
  int64_t start_pos = 0;
  // The instance that computes them and the plan (cached segments by holder and action).
  InstanceId compute;
  const lake::IterationPlan* plan = nullptr;
  // The last token's next-token choice is wanted (the iteration reaches the end of the
  // sequence), and with want_full_logits also its logits (the request's first and last ones,
  // which LoopResult keeps; a device executor copies the others' argmax only).
  bool want_logits = true;
  bool want_full_logits = true;
};

// What the executor returns for one work item.
struct WorkOutput {
  // The greedy next token: the first index of the maximum of the last token's logits (as
  // engine::Argmax); -1 when the item did not want logits.
  int32_t next_token = -1;
  // The last token's logits [vocab_size] when the item wanted full logits; may be empty
  // otherwise.
  std::vector<float> logits;
};

// The model runner and the data plane of one computing process.
class IterationExecutor {
 public:
  virtual ~IterationExecutor() = default;
  // A request's KV tail (tokens after its pooled prefix) starts empty; the sequence will not
  // exceed `max_tokens` tokens (prompt + new tokens).
  virtual absl::Status BeginSequence(RequestId request, int64_t max_tokens) = 0;
  // Ends the sequence and returns its data-plane counters.
  virtual DataPlaneCounters EndSequence(RequestId request) = 0;
  // Drops the first `rows` tokens of the request's tail (the pool now serves them).
  virtual absl::Status DropTailRows(RequestId request, int64_t rows) = 0;
  // One forward over the batch: per work item, attention over its plan's cached segments
  // (local, pulled, or queries moved to their holder), its tail and, causally, its new tokens,
  // whose KV it appends to the tail. Returns per item its output (next token, logits), in
  // order. Errors fail the whole batch.
  virtual absl::StatusOr<std::vector<WorkOutput>> Run(absl::Span<const IterationWork> batch) = 0;
  // Writes tail rows [first_row, first_row + S) of `request` as `segment` on `target`; returns
  // the bytes written. With tails in the pool (IterationLoopOptions::tails_in_pool), a target
  // that is the instance of the tail block holding those rows means the block IS the
  // segment's slot now (committed in place: lake::CommitResult::in_place), nothing to copy;
  // after a copy elsewhere the block goes back to its store.
  virtual absl::StatusOr<int64_t> StoreSegment(RequestId request, InstanceId compute,
                                               int64_t first_row, InstanceId target,
                                               SegmentId segment, const StoredMeta& meta) = 0;
  // Frees `segment` on `target` (evicted by the control plane at change `evicted_at`).
  virtual absl::Status FreeSegment(InstanceId compute, InstanceId target, SegmentId segment,
                                   uint64_t evicted_at) = 0;
};

// Where one iteration's wall time went, microseconds: building the batch and the control-plane
// call (plan), the executor's Run, and the rest (commits, stores, bookkeeping).
struct IterationTiming {
  int32_t requests = 0;
  int64_t tokens = 0;
  double plan_us = 0;
  double run_us = 0;
  double finish_us = 0;
};

// The work a loop holds at one moment (what the cluster's instances report for routing).
struct LoopLoad {
  // Requests past their prefill (their next iteration is a decode step) and the sum of their
  // context: the tokens whose KV exists, which that step attends to.
  int64_t decode_requests = 0;
  int64_t decode_context_tokens = 0;
  // Requests waiting for or in their prefill (a restarted one included): how many, their
  // tokens still to compute (cache hits not known before their first plan count as to compute),
  // and the sum of their sequence lengths (their decode context once prefilled).
  int64_t prefill_requests = 0;
  int64_t prefill_tokens = 0;
  int64_t prefill_context_tokens = 0;
};

class IterationLoop {
 public:
  // Both borrowed, must outlive the loop. Errors: InvalidArgument naming a bad option.
  static absl::StatusOr<std::unique_ptr<IterationLoop>> Create(lake::ControlPlane* control,
                                                               IterationExecutor* executor,
                                                               const IterationLoopOptions& options);
  // Releases what the loop's requests still pin (best effort).
  ~IterationLoop();
  IterationLoop(const IterationLoop&) = delete;
  IterationLoop& operator=(const IterationLoop&) = delete;

  // Queues a request; it joins the batch at the next Step that has room.
  // Errors: InvalidArgument (invalid id, empty prompt, a token outside the vocabulary naming
  //   its index, max_new_tokens < 1, force_tokens too short or bad, sampling parameters out of
  //   range or a stop token outside the vocabulary (naming the field), prompt + max_new_tokens
  //   longer than max_request_tokens), ResourceExhausted (more segments than the whole pool
  //   holds, see pool_tokens), AlreadyExists (id in use in the loop).
  absl::Status Submit(LoopRequest request);

  // Ends request `id` at once (its client went away): it leaves the loop without a result,
  // the pins of its admitted plan are released before this returns, and the executor's
  // sequence (its KV tail) ends. Segments it already committed stay in the pool (they are
  // valid KV other requests may hit). Errors: NotFound when `id` is not in the loop (finished
  // already, or never submitted).
  absl::Status Cancel(RequestId id);

  // Request `id`'s result so far (a running request's progress: `tokens` produced and, once
  // its first prefill ran, `cached_tokens`; streaming servers send what is new after each
  // Step); nullptr when `id` is not in the loop. Valid until the next Submit, Step or Cancel.
  const LoopResult* Progress(RequestId id) const;

  // Runs one iteration and returns the requests that finished in it: done, or failed with
  // their status (a control-plane error for the request, a data-plane or executor error of the
  // batch: every request of a failed batch fails, its pins released).
  std::vector<LoopResult> Step();

  // No request queued or running.
  bool idle() const { return requests_.empty(); }
  int64_t num_requests() const { return static_cast<int64_t>(requests_.size()); }
  // The requests queued or running now, by phase (as the next Step would batch them). O(requests).
  LoopLoad Load() const;
  // The most requests that ran in one iteration so far, and the iterations run.
  int32_t max_batch_requests_seen() const { return max_batch_seen_; }
  int64_t iterations() const { return iterations_; }
  // The timings of the iterations run since the last call (cleared by it; the most recent
  // 100,000 are kept).
  std::vector<IterationTiming> TakeTimings();

 private:
  struct Active;
  // New requests are offered to the control plane while their prompts add up to at most this
  // many token budgets (Step, 1.): mostly-cached prompts (cached beyond 1 - 1/8) join at the
  // budget's full rate, and the keys one plan call carries and matches stay within 8 budgets.
  static constexpr int64_t kFreshOfferFactor = 8;
  IterationLoop(lake::ControlPlane* control, IterationExecutor* executor,
                const IterationLoopOptions& options);
  // The chained keys of `a`'s first `segments` full segments (REQUIRES: that many in a.seq),
  // hashing only those a.keys does not hold yet.
  std::vector<index::SegmentKey> KeysOf(Active& a, size_t segments) const;
  // The control-plane request for `a`'s next iteration.
  absl::StatusOr<lake::IterationRequest> MakeRequest(Active& a, int64_t chunk) const;
  // The salt of `a`'s segment ids (its own, else the namespace's).
  uint64_t SaltOf(const Active& a) const;
  static int64_t MaxTokens(const Active& a);
  // Tokens of `a`'s sequence its next iterations compute (1: a decode step, unless fresh).
  static int64_t Remaining(const Active& a);
  // Its next iteration is a decode step.
  static bool Decoding(const Active& a);
  // Drops `victim`'s tail (tails in the pool, a forced admission found no room): its sequence
  // restarts from what the pool holds.
  void Preempt(Active& victim);
  // Fails `a` with `status` and moves it to `done`.
  void Fail(Active& a, absl::Status status, std::vector<LoopResult>& done);
  // Stores and commits what one executed work item completed; advances the request.
  absl::Status Finish(Active& a, const lake::IterationPlan& plan, InstanceId compute,
                      WorkOutput& output, bool want_logits, int64_t end);
  // Confirms and releases the finished requests' pins now (when no iteration follows).
  void FlushReleases();
  // One call (PlanBatch without requests) that confirms to_confirm_ and releases `ids`;
  // errors are ignored (the ids were released, or are not active, or the call failed: the
  // coordinator releases given-up requests, and their unconfirmed copies go with them).
  void ReleaseNow(absl::Span<const RequestId> ids);

  lake::ControlPlane* control_;
  IterationExecutor* executor_;
  IterationLoopOptions options_;
  // Requests in arrival order.
  std::deque<std::unique_ptr<Active>> requests_;
  // Ids whose pins the next PlanBatch releases (finished requests).
  std::vector<RequestId> pending_release_;
  // Copies stored since the last call that carried confirmations (in store order, so a
  // chain's parents come first); sent with the next PlanBatch.
  std::vector<lake::StoreConfirmation> to_confirm_;
  int32_t max_batch_seen_ = 0;
  int64_t iterations_ = 0;
  std::vector<IterationTiming> timings_;
};

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_ITERATION_LOOP_H_
