// The elastic scheduler (paper section 6.2): every iteration it decides which requests run
// together, in which phase and on how many instances. It knows nothing about placement: the
// pool (lake::Lake) picks the concrete instances of each batch and where its cache work runs.
//
// Two decisions, each a pure function of plain data (so the simulator and a cluster's
// coordinator run the same code):
//
// 1. SchedulePrefill: the prefill batches of this iteration and their degrees of parallelism
//    (DoP) on the instances that are free for prefill now. Steps, as the paper describes them:
//    a. chunk: every queued request contributes min(remaining, chunk_tokens) tokens (up to
//       max_dop budgets for one long request); requests are taken first come, first served
//       until the free instances' token budget (free x chunk_tokens) is used (the last chunk is
//       cut to fit, on an align_tokens boundary), so no request is starved;
//    b. sort the chunks by length;
//    c. dynamic programming over the sorted chunks: f(i, k) = the least total latency of the
//       first i chunks on k instances = min over j < i, l < k of
//       f(j, l) + (i - j) x T(chunks j+1..i on k - l instances), where a batch on d instances
//       must fit their token budget (d x chunk_tokens) and, when an SLO is given, finish within
//       it (T <= slo_s); the answer is min over k <= free of f(M, k). When no partition meets
//       the SLO the SLO is dropped (throughput fallback: the same objective without it).
//    T(batch, d) = Dense(ceil(sum q / d)) + sum Attention(q_i, context_i) / d +
//    Parallel(sum q, d): sequence parallelism splits every chunk's tokens evenly over the d
//    instances (BatchCostModel says what each term costs). Cost: O(M^2 x N^2) evaluations of
//    T, each O(1) from prefix sums; M is capped by grouping adjacent sorted chunks
//    (max_dp_items).
// 2. PlaceDecode: decode batches run at DoP 1, one phase per batch. A new decode joins a
//    decode instance that still meets the decode iteration budget with it: the busiest (best
//    fit, so that decodes use as few instances as their SLO allows and the rest prefill), ties
//    to the one holding most of its context (so that it attends locally); when none fits,
//    an idle instance becomes a decode instance (again the one holding most of its context);
//    when none is idle, the decode instance with the least work takes it (over budget: the SLO
//    is infeasible, throughput fallback). Instances without decodes are free for prefill: the
//    prefill/decode split is re-decided as decodes arrive and finish, never fixed.
// 3. ScheduleMixedPrefill: a decode instance whose decode iteration leaves slack under the
//    decode iteration budget also computes prefill chunks in it (chunked prefill mixed into
//    the decode batch, as continuous-batching engines do), sized so that the mixed iteration's
//    estimate, Dense(decodes + sum q) + the decodes' attention + sum Attention(q, context),
//    stays within the budget. The queued requests that SchedulePrefill left, first come first
//    served, each take the decode instance where their chunk is largest given the chunks it
//    already took (several short prompts share one iteration, as in a colocated engine); a
//    chunk that does not finish its request ends on an align_tokens boundary, like
//    SchedulePrefill's. So an instance is never idle for prefill
//    just because it holds decodes, and decodes keep their budget.
//
// Thread-safety: the functions are pure; BatchCostModel implementations must be safe to call
// from the calling thread.
#ifndef TOKENLAKE_SCHED_ELASTIC_SCHEDULER_H_
#define TOKENLAKE_SCHED_ELASTIC_SCHEDULER_H_

#include <cstdint>
#include <limits>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/plan/cost_model.h"

namespace tokenlake::sched {

// The scheduler's view of iteration latency on one instance.
class BatchCostModel {
 public:
  virtual ~BatchCostModel() = default;
  // Token-proportional work (the dense layers) of an iteration of `tokens` (>= 1) tokens, s.
  virtual double DenseSeconds(int64_t tokens) const = 0;
  // Attention of `new_tokens` (>= 1) queries after `context_tokens` (>= 0) earlier tokens of
  // their sequence (causal among the new ones), seconds on one instance.
  virtual double AttentionSeconds(int64_t new_tokens, int64_t context_tokens) const = 0;
  // What running a batch of `tokens` tokens on `dop` (>= 2) instances adds to an iteration
  // (the sequence-parallel exchange of queries / partial results), seconds. 0 for dop 1.
  virtual double ParallelSeconds(int64_t tokens, int32_t dop) const = 0;
};

struct PrefillCandidate {
  // Prompt tokens still to compute (>= 1).
  int64_t remaining_tokens = 1;
  // Tokens of its sequence before them (cached or computed earlier), >= 0.
  int64_t context_tokens = 0;
};

struct ElasticSchedulerOptions {
  // Prefill tokens one instance computes in one iteration (the chunked-prefill budget), >= 1.
  int64_t chunk_tokens = 8192;
  // A prefill batch's iteration must finish within this many seconds (the SLO constraint of
  // the DP); infinity = no constraint. > 0.
  double prefill_slo_s = std::numeric_limits<double>::infinity();
  // Largest DoP of one prefill batch, >= 1.
  int32_t max_dop = 8;
  // Chunks beyond this are grouped (adjacent in sorted order) to bound the DP's cost, >= 1.
  int32_t max_dp_items = 64;
  // A chunk that does not finish its request ends on a multiple of this many tokens of the
  // request's remaining work (e.g. the segment size, so that every chunk but a prompt's last
  // completes whole segments); one that would be empty waits for the next iteration. >= 1.
  int64_t align_tokens = 1;
  // The pool's cache load in SchedulePrefill's T (paper section 6.1). 0 (the default): each
  // chunk's attention over its context runs on the batch's d instances, T as in the file
  // comment. N >= 1: the context lives in a pool of N instances that serve it where it is
  // stored, so that attention is not divided by d but charged as the pool's cache load L
  // (plan::CacheLoad, the roofline max(M / (M + N B T0), F / (F + N P T0)) of the batch's
  // chunks, prefix = context, input = chunk) on the rest of the iteration
  // T0 = Dense(ceil(sum q / d)) + sum Attention(q_i, 0) / d + Parallel(sum q, d):
  // T = T0 / (1 - L). Then a larger DoP shortens T0 but not the cache access, which no group
  // size changes.
  int32_t pool_instances = 0;
  // With pool_instances > 0: the model (for M and F) and one instance's B and P (> 0).
  plan::ModelShape shape;
  plan::InstanceRoofline roofline;
};

struct PrefillBatch {
  // Instances that compute it (sequence parallel), >= 1.
  int32_t dop = 1;
  // Indices into the candidates, in ascending chunk length.
  std::vector<int32_t> items;
  // Tokens each of them computes in this iteration (parallel to `items`).
  std::vector<int64_t> tokens;
  // The estimated iteration time T(batch, dop), seconds.
  double estimated_s = 0;
};

struct PrefillSchedule {
  // This iteration's prefill batches; the sum of their DoPs is at most the free instances.
  std::vector<PrefillBatch> batches;
  // The DP's objective: the sum over chunks of their batch's T.
  double total_latency_s = 0;
  // False when no partition met prefill_slo_s and the SLO was dropped.
  bool slo_met = true;
};

// Validates options: InvalidArgument naming the field.
absl::Status ValidateOptions(const ElasticSchedulerOptions& options);

// This iteration's prefill batches over `free_instances` instances (see the file comment).
// `candidates` are the queued requests in priority order (first come first). An empty
// schedule when either is empty/zero.
// Errors: InvalidArgument for bad options, a negative free count or a bad candidate (named).
absl::StatusOr<PrefillSchedule> SchedulePrefill(absl::Span<const PrefillCandidate> candidates,
                                                int32_t free_instances, const BatchCostModel& cost,
                                                const ElasticSchedulerOptions& options);

// One instance as PlaceDecode sees it.
struct DecodeInstance {
  // Decodes it runs now (0: not a decode instance).
  int64_t decodes = 0;
  // The sum of their context tokens.
  int64_t context_tokens = 0;
  // Nothing runs or waits on it: it may become a decode instance.
  bool idle = false;
  // It may take decodes at all (e.g. alive); false excludes it.
  bool eligible = true;
  // This instance's own decode iteration budget, seconds, when its decodes need a tighter one
  // than the call's (e.g. the smallest per-request TPOT bar among them under a per-token SLO);
  // <= 0: the call's budget_s alone. The budget that applies is the smaller of the two.
  double budget_s = 0;
  // Prefill already mixed into its next iteration (ScheduleMixedPrefill's earlier chunks):
  // tokens, and their attention in seconds. MixedChunkTokens adds a chunk on top of them.
  int64_t mixed_tokens = 0;
  double mixed_attention_s = 0;
  // PlaceDecode only: tokens of the new decode's context that this instance already holds
  // (where its prefix lives); among the equally busy instances where it fits, and among the
  // idle ones, the decode goes where this is largest. 0 everywhere = no locality information.
  int64_t local_tokens = 0;
};

// The budget that applies to `instance`: budget_s, or its own when smaller (DecodeInstance).
double EffectiveBudgetSeconds(const DecodeInstance& instance, double budget_s);

// The instance (index into `instances`) that should run a new decode with `context_tokens`
// of context, under a decode iteration budget of `budget_s` seconds and at most `max_decodes`
// decodes on one instance (its running-request limit) (see the file comment). Returns -1 when
// no instance is a decode instance, idle, or eligible (the caller decides).
int32_t PlaceDecode(absl::Span<const DecodeInstance> instances, int64_t context_tokens,
                    double budget_s, const BatchCostModel& cost,
                    int64_t max_decodes = std::numeric_limits<int64_t>::max());

// The estimated decode iteration of `decodes` sequences with `context_tokens` in total.
double DecodeIterationSeconds(int64_t decodes, int64_t context_tokens, const BatchCostModel& cost);

// The estimated iteration of `decodes` decodes (`context_tokens` in total) with a prefill chunk
// of `chunk_tokens` (>= 0) new tokens after `chunk_context` tokens of its sequence: dense work
// over every token of the iteration, plus the decodes' and the chunk's attention.
double MixedIterationSeconds(int64_t decodes, int64_t context_tokens, int64_t chunk_tokens,
                             int64_t chunk_context, const BatchCostModel& cost);

// The largest chunk of `candidate` that decode instance `instance` can mix into its next
// iteration on top of its mixed_tokens: q in [0, min(remaining, chunk_tokens - decodes -
// mixed_tokens)], q = remaining or a multiple of align_tokens, with
// MixedIterationSeconds(decodes, context, mixed_tokens + q, ...) + mixed_attention_s (the chunk's
// attention counted once) <= EffectiveBudgetSeconds(instance, budget_s). 0 when none (or the
// instance has no decodes, or is not eligible). The search assumes the cost model's times do not
// decrease as tokens grow (then q is the largest; otherwise q still meets the budget).
int64_t MixedChunkTokens(const DecodeInstance& instance, const PrefillCandidate& candidate,
                         double budget_s, const BatchCostModel& cost,
                         const ElasticSchedulerOptions& options);

struct MixedChunk {
  // Index into the instances.
  int32_t instance = 0;
  // Index into the candidates.
  int32_t candidate = 0;
  // Prefill tokens it computes in the instance's next iteration (>= 1).
  int64_t tokens = 0;
  // MixedIterationSeconds of that iteration.
  double estimated_s = 0;
};

// Chunks of `candidates` (queued requests in priority order, first come first) mixed into the
// decode instances' next iterations (see the file comment): each candidate in order takes the
// eligible decode instance (decodes > 0) where MixedChunkTokens is largest given the chunks
// that instance took before it (ties: the lower index); a candidate with no positive chunk
// anywhere is skipped. An instance may take several candidates; MixedChunk::estimated_s is its
// iteration's estimate with the chunks given so far.
// Errors: InvalidArgument for bad options, budget_s <= 0, or a bad candidate (named).
absl::StatusOr<std::vector<MixedChunk>> ScheduleMixedPrefill(
    absl::Span<const PrefillCandidate> candidates, absl::Span<const DecodeInstance> instances,
    double budget_s, const BatchCostModel& cost, const ElasticSchedulerOptions& options);

}  // namespace tokenlake::sched

#endif  // TOKENLAKE_SCHED_ELASTIC_SCHEDULER_H_
