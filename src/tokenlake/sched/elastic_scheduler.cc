#include "tokenlake/sched/elastic_scheduler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::sched {

absl::Status ValidateOptions(const ElasticSchedulerOptions& options) {
  if (options.chunk_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ElasticSchedulerOptions.chunk_tokens must be >= 1, got %d", options.chunk_tokens));
  }
  if (!(options.prefill_slo_s > 0)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ElasticSchedulerOptions.prefill_slo_s must be > 0, got %g", options.prefill_slo_s));
  }
  if (options.max_dop < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("ElasticSchedulerOptions.max_dop must be >= 1, got %d", options.max_dop));
  }
  if (options.align_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ElasticSchedulerOptions.align_tokens must be >= 1, got %d", options.align_tokens));
  }
  if (options.pool_instances < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ElasticSchedulerOptions.pool_instances must be >= 0, got %d", options.pool_instances));
  }
  if (options.pool_instances > 0) {
    if (absl::Status s = options.shape.Validate(); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("ElasticSchedulerOptions.shape: %s", s.message()));
    }
    if (!(options.roofline.kv_bytes_per_s > 0) || !(options.roofline.attention_flops_per_s > 0)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "ElasticSchedulerOptions.roofline: kv_bytes_per_s (%g) and attention_flops_per_s (%g) "
          "must be > 0 with pool_instances > 0",
          options.roofline.kv_bytes_per_s, options.roofline.attention_flops_per_s));
    }
  }
  if (options.max_dp_items < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ElasticSchedulerOptions.max_dp_items must be >= 1, got %d", options.max_dp_items));
  }
  return absl::OkStatus();
}

namespace {

struct Chunk {
  int32_t candidate = 0;
  int64_t tokens = 0;
  // Attention on the batch's instances: over its context and itself, or with pool_instances
  // only the causal part among its own tokens.
  double attention_s = 0;
  // With pool_instances: its cache access (prefix = context, input = its tokens).
  plan::CacheAccess cache;
};

}  // namespace

namespace {

// Steps b and c of the file comment on the admitted chunks; false when no partition fits.
bool Partition(std::vector<Chunk> chunks, int32_t n, const BatchCostModel& cost,
               const ElasticSchedulerOptions& options, PrefillSchedule* schedule) {
  const int32_t max_dop = std::min(options.max_dop, n);
  // b. Sorted by length (stable: ties keep arrival order).
  std::stable_sort(chunks.begin(), chunks.end(),
                   [](const Chunk& a, const Chunk& b) { return a.tokens < b.tokens; });
  // The DP's indivisible items: one chunk each, or, beyond max_dp_items chunks, runs of
  // adjacent (sorted) chunks merged while a run fits one instance's budget. Two adjacent runs
  // then hold more than chunk_tokens, so there are at most 2 x free + 1 runs.
  const int32_t num_chunks = static_cast<int32_t>(chunks.size());
  std::vector<int32_t> first;  // item g = chunks [first[g], first[g + 1])
  if (num_chunks <= options.max_dp_items) {
    first.resize(num_chunks + 1);
    std::iota(first.begin(), first.end(), 0);
  } else {
    int64_t run = 0;
    for (int32_t c = 0; c < num_chunks; ++c) {
      if (c == 0 || run + chunks[c].tokens > options.chunk_tokens) {
        first.push_back(c);
        run = 0;
      }
      run += chunks[c].tokens;
    }
    first.push_back(num_chunks);
  }
  const int32_t m = static_cast<int32_t>(first.size()) - 1;
  std::vector<int64_t> pre_count(m + 1, 0), pre_tokens(m + 1, 0);
  std::vector<double> pre_attention(m + 1, 0);
  std::vector<plan::CacheAccess> pre_cache(m + 1);
  for (int32_t g = 0; g < m; ++g) {
    int64_t tokens = 0;
    double attention = 0;
    plan::CacheAccess cache;
    for (int32_t c = first[g]; c < first[g + 1]; ++c) {
      tokens += chunks[c].tokens;
      attention += chunks[c].attention_s;
      cache += chunks[c].cache;
    }
    pre_count[g + 1] = pre_count[g] + (first[g + 1] - first[g]);
    pre_tokens[g + 1] = pre_tokens[g] + tokens;
    pre_attention[g + 1] = pre_attention[g] + attention;
    pre_cache[g + 1] = pre_cache[g];
    pre_cache[g + 1] += cache;
  }
  // T(items [j, i) on d instances), or infinity when they do not fit d instances' budget.
  const double inf = std::numeric_limits<double>::infinity();
  auto batch_seconds = [&](int32_t j, int32_t i, int32_t d) {
    const int64_t tokens = pre_tokens[i] - pre_tokens[j];
    if (tokens > d * options.chunk_tokens || tokens < d) return inf;
    const double attention = pre_attention[i] - pre_attention[j];
    double t = cost.DenseSeconds((tokens + d - 1) / d) + attention / d;
    if (d > 1) t += cost.ParallelSeconds(tokens, d);
    if (options.pool_instances > 0 && t > 0) {
      plan::CacheAccess cache;
      cache.kv_bytes = pre_cache[i].kv_bytes - pre_cache[j].kv_bytes;
      cache.attention_flops = pre_cache[i].attention_flops - pre_cache[j].attention_flops;
      t /= 1 - plan::CacheLoad(cache, options.pool_instances, options.roofline, t);
    }
    return t;
  };
  // c. f[i][k]: least total latency of the first i items on exactly k instances.
  std::vector<std::vector<double>> f;
  std::vector<std::vector<std::pair<int32_t, int32_t>>> from;  // (j, d) of the last batch
  auto solve = [&](double slo_s) {
    f.assign(m + 1, std::vector<double>(n + 1, inf));
    from.assign(m + 1, std::vector<std::pair<int32_t, int32_t>>(n + 1, {-1, -1}));
    f[0][0] = 0;
    for (int32_t i = 1; i <= m; ++i) {
      for (int32_t j = 0; j < i; ++j) {
        const double count = static_cast<double>(pre_count[i] - pre_count[j]);
        for (int32_t d = 1; d <= max_dop; ++d) {
          const double t = batch_seconds(j, i, d);
          if (!(t <= slo_s)) continue;
          for (int32_t l = 0; l + d <= n; ++l) {
            if (f[j][l] == inf) continue;
            const double v = f[j][l] + count * t;
            if (v < f[i][l + d]) {
              f[i][l + d] = v;
              from[i][l + d] = {j, d};
            }
          }
        }
      }
    }
    int32_t best_k = -1;
    for (int32_t k = 1; k <= n; ++k) {
      if (f[m][k] < inf && (best_k < 0 || f[m][k] < f[m][best_k])) best_k = k;
    }
    return best_k;
  };
  schedule->slo_met = true;
  int32_t k = solve(options.prefill_slo_s);
  if (k < 0 && options.prefill_slo_s < inf) {
    schedule->slo_met = false;  // throughput fallback
    k = solve(inf);
  }
  if (k < 0) return false;
  schedule->total_latency_s = f[m][k];
  schedule->batches.clear();
  for (int32_t i = m; i > 0;) {
    const auto [j, d] = from[i][k];
    PrefillBatch batch;
    batch.dop = d;
    batch.estimated_s = batch_seconds(j, i, d);
    for (int32_t c = first[j]; c < first[i]; ++c) {
      batch.items.push_back(chunks[c].candidate);
      batch.tokens.push_back(chunks[c].tokens);
    }
    schedule->batches.push_back(std::move(batch));
    i = j;
    k -= d;
  }
  std::reverse(schedule->batches.begin(), schedule->batches.end());
  return true;
}

}  // namespace

absl::StatusOr<PrefillSchedule> SchedulePrefill(absl::Span<const PrefillCandidate> candidates,
                                                int32_t free_instances, const BatchCostModel& cost,
                                                const ElasticSchedulerOptions& options) {
  TOKENLAKE_RETURN_IF_ERROR(ValidateOptions(options));
  if (free_instances < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("SchedulePrefill: free_instances must be >= 0, got %d", free_instances));
  }
  for (size_t i = 0; i < candidates.size(); ++i) {
    if (candidates[i].remaining_tokens < 1 || candidates[i].context_tokens < 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "SchedulePrefill: candidate %d has remaining_tokens %d and context_tokens %d "
          "(need >= 1 and >= 0)",
          i, candidates[i].remaining_tokens, candidates[i].context_tokens));
    }
  }
  PrefillSchedule schedule;
  if (candidates.empty() || free_instances == 0) return schedule;
  const int32_t n = free_instances;
  const int64_t chunk = options.chunk_tokens;
  const int64_t max_take = static_cast<int64_t>(std::min(options.max_dop, n)) * chunk;

  // a. Chunks, first come first served, within the free instances' budget. One request may
  // take up to max_dop instances' budget (then computed sequence-parallel); a take beyond one
  // instance's budget is a whole number of budgets, so that no instance of its group idles.
  std::vector<Chunk> chunks;
  int64_t capacity = static_cast<int64_t>(n) * chunk;
  for (size_t i = 0; i < candidates.size() && capacity > 0; ++i) {
    int64_t take = std::min({candidates[i].remaining_tokens, capacity, max_take});
    if (take < candidates[i].remaining_tokens) {
      if (take > chunk) take -= take % chunk;
      take -= take % options.align_tokens;
      if (take == 0) continue;
    }
    capacity -= take;
    Chunk item{static_cast<int32_t>(i), take, 0, {}};
    if (options.pool_instances > 0) {
      item.attention_s = cost.AttentionSeconds(take, 0);
      item.cache = plan::CacheAccessOf(options.shape, candidates[i].context_tokens, take);
    } else {
      item.attention_s = cost.AttentionSeconds(take, candidates[i].context_tokens);
    }
    chunks.push_back(item);
  }
  // Rounding the DoPs up can make the admitted chunks need more than n instances; the chunk
  // admitted last then waits for the next iteration. One chunk alone always fits.
  while (!chunks.empty() && !Partition(chunks, n, cost, options, &schedule)) chunks.pop_back();
  return schedule;
}

double DecodeIterationSeconds(int64_t decodes, int64_t context_tokens, const BatchCostModel& cost) {
  if (decodes <= 0) return 0;
  // Decode attention reads every context token once, linear in the context: the per-sequence
  // cost at the mean context times the batch is the sum.
  return cost.DenseSeconds(decodes) +
         static_cast<double>(decodes) * cost.AttentionSeconds(1, context_tokens / decodes);
}

double EffectiveBudgetSeconds(const DecodeInstance& instance, double budget_s) {
  return instance.budget_s > 0 ? std::min(budget_s, instance.budget_s) : budget_s;
}

int32_t PlaceDecode(absl::Span<const DecodeInstance> instances, int64_t context_tokens,
                    double budget_s, const BatchCostModel& cost, int64_t max_decodes) {
  int32_t best_fit = -1, idle = -1, least = -1;
  double best_fit_s = -1, least_s = 0;
  for (size_t i = 0; i < instances.size(); ++i) {
    const DecodeInstance& in = instances[i];
    if (!in.eligible) continue;
    const int32_t id = static_cast<int32_t>(i);
    if (in.decodes == 0) {
      if (in.idle && (idle < 0 || in.local_tokens > instances[idle].local_tokens)) idle = id;
      continue;
    }
    const double now_s = DecodeIterationSeconds(in.decodes, in.context_tokens, cost);
    const double with_s =
        DecodeIterationSeconds(in.decodes + 1, in.context_tokens + context_tokens, cost);
    if (with_s <= EffectiveBudgetSeconds(in, budget_s) && in.decodes < max_decodes &&
        (best_fit < 0 || now_s > best_fit_s ||
         (now_s == best_fit_s && in.local_tokens > instances[best_fit].local_tokens))) {
      best_fit = id;
      best_fit_s = now_s;
    }
    if (in.decodes >= max_decodes) continue;  // full: it takes no more
    if (least < 0 || now_s < least_s) {
      least = id;
      least_s = now_s;
    }
  }
  if (best_fit >= 0) return best_fit;
  if (idle >= 0) return idle;
  return least;
}

namespace {

// Dense work over the decodes and `prefill_tokens` more tokens, plus the decodes' attention.
double DecodesWithPrefillSeconds(int64_t decodes, int64_t context_tokens, int64_t prefill_tokens,
                                 const BatchCostModel& cost) {
  const int64_t tokens = std::max<int64_t>(decodes, 0) + std::max<int64_t>(prefill_tokens, 0);
  if (tokens == 0) return 0;
  double t = cost.DenseSeconds(tokens);
  if (decodes > 0) {
    t += static_cast<double>(decodes) * cost.AttentionSeconds(1, context_tokens / decodes);
  }
  return t;
}

}  // namespace

double MixedIterationSeconds(int64_t decodes, int64_t context_tokens, int64_t chunk_tokens,
                             int64_t chunk_context, const BatchCostModel& cost) {
  double t = DecodesWithPrefillSeconds(decodes, context_tokens, chunk_tokens, cost);
  if (chunk_tokens > 0) t += cost.AttentionSeconds(chunk_tokens, chunk_context);
  return t;
}

int64_t MixedChunkTokens(const DecodeInstance& instance, const PrefillCandidate& candidate,
                         double budget_s, const BatchCostModel& cost,
                         const ElasticSchedulerOptions& options) {
  if (!instance.eligible || instance.decodes <= 0 || candidate.remaining_tokens < 1) return 0;
  const int64_t cap = std::min(candidate.remaining_tokens,
                               options.chunk_tokens - instance.decodes - instance.mixed_tokens);
  if (cap < 1) return 0;
  const double budget = EffectiveBudgetSeconds(instance, budget_s);
  auto fits = [&](int64_t q) {
    return DecodesWithPrefillSeconds(instance.decodes, instance.context_tokens,
                                     instance.mixed_tokens + q, cost) +
               instance.mixed_attention_s + cost.AttentionSeconds(q, candidate.context_tokens) <=
           budget;
  };
  // The whole rest of the prompt, when it fits, needs no alignment.
  if (cap == candidate.remaining_tokens && fits(cap)) return cap;
  // Otherwise the largest multiple of align_tokens (below the rest) that fits: a binary search
  // over k x align_tokens, k in [1, kmax].
  const int64_t align = options.align_tokens;
  int64_t kmax = cap / align;
  if (kmax * align == candidate.remaining_tokens) --kmax;  // that one was tried above
  int64_t lo = 0, hi = kmax;                               // k = lo fits (0: nothing), > hi not
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (fits(mid * align)) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo * align;
}

absl::StatusOr<std::vector<MixedChunk>> ScheduleMixedPrefill(
    absl::Span<const PrefillCandidate> candidates, absl::Span<const DecodeInstance> instances,
    double budget_s, const BatchCostModel& cost, const ElasticSchedulerOptions& options) {
  TOKENLAKE_RETURN_IF_ERROR(ValidateOptions(options));
  if (!(budget_s > 0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("ScheduleMixedPrefill: budget_s must be > 0, got %g", budget_s));
  }
  for (size_t i = 0; i < candidates.size(); ++i) {
    if (candidates[i].remaining_tokens < 1 || candidates[i].context_tokens < 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "ScheduleMixedPrefill: candidate %d has remaining_tokens %d and context_tokens %d "
          "(need >= 1 and >= 0)",
          i, candidates[i].remaining_tokens, candidates[i].context_tokens));
    }
  }
  std::vector<MixedChunk> out;
  std::vector<DecodeInstance> view(instances.begin(), instances.end());
  for (size_t c = 0; c < candidates.size(); ++c) {
    int32_t best = -1;
    int64_t best_tokens = 0;
    for (size_t i = 0; i < view.size(); ++i) {
      const int64_t q = MixedChunkTokens(view[i], candidates[c], budget_s, cost, options);
      if (q > best_tokens) {
        best = static_cast<int32_t>(i);
        best_tokens = q;
      }
    }
    if (best < 0) continue;
    DecodeInstance& in = view[best];
    in.mixed_tokens += best_tokens;
    in.mixed_attention_s += cost.AttentionSeconds(best_tokens, candidates[c].context_tokens);
    const double estimated_s =
        DecodesWithPrefillSeconds(in.decodes, in.context_tokens, in.mixed_tokens, cost) +
        in.mixed_attention_s;
    out.push_back({best, static_cast<int32_t>(c), best_tokens, estimated_s});
  }
  return out;
}

}  // namespace tokenlake::sched
