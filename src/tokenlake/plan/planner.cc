#include "tokenlake/plan/planner.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/plan/transport_problem.h"

namespace tokenlake::plan {

absl::StatusOr<std::unique_ptr<Planner>> Planner::Create(const PlannerOptions& options,
                                                         const balance::Balancer* balancer) {
  if (balancer == nullptr) return absl::InvalidArgumentError("Planner: balancer is null");
  TOKENLAKE_RETURN_IF_ERROR(options.shape.Validate());
  if (options.segment_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PlannerOptions.segment_tokens must be > 0, got %d", options.segment_tokens));
  }
  if (!(options.compute_slack >= 0)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PlannerOptions.compute_slack must be >= 0, got %g", options.compute_slack));
  }
  if (!(options.holder_slack >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PlannerOptions.holder_slack must be >= 0, got %g", options.holder_slack));
  }
  if (!(options.access_slack >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PlannerOptions.access_slack must be >= 0, got %g", options.access_slack));
  }
  return std::unique_ptr<Planner>(new Planner(options, balancer));
}

namespace {

absl::Status ValidateInstances(absl::Span<const balance::InstanceState> instances) {
  if (instances.empty()) return absl::InvalidArgumentError("Planner: no instances");
  for (size_t i = 0; i < instances.size(); ++i) {
    if (instances[i].id != InstanceId(static_cast<int32_t>(i))) {
      return absl::InvalidArgumentError(
          absl::StrFormat("Planner: instances must be dense and ordered; instances[%d] has id %d",
                          i, instances[i].id.value()));
    }
    if (instances[i].used_slots < 0 || instances[i].used_slots > instances[i].capacity_slots) {
      return absl::InvalidArgumentError(
          absl::StrFormat("Planner: instance %d has used_slots=%d, capacity_slots=%d", i,
                          instances[i].used_slots, instances[i].capacity_slots));
    }
  }
  return absl::OkStatus();
}

// Same set of replicas (each list is distinct; the Lake may list them in any order).
bool SameReplicas(const CachedSegment& a, const CachedSegment& b) {
  if (a.replicas.size() != b.replicas.size()) return false;
  for (InstanceId r : a.replicas) {
    if (std::find(b.replicas.begin(), b.replicas.end(), r) == b.replicas.end()) return false;
  }
  return true;
}

// Step 3 under Dispatch::kGreedy (planner.h), rule (a): the reader of a run of `run_tokens`
// tokens in consecutive segments with the same `replicas`. `uses` marks the instances the
// request reads from already (or will: its segments with one copy); `access` is each
// instance's cache access in force plus this call's reads so far, summing to `access_total`.
int32_t RunReader(absl::Span<const InstanceId> replicas, int64_t run_tokens, int32_t compute,
                  absl::Span<const char> uses, absl::Span<const double> access, double access_total,
                  absl::Span<const balance::InstanceState> state, RequestId request, double slack) {
  const auto n = static_cast<int32_t>(access.size());
  const auto run = static_cast<double>(run_tokens);
  const double bound = (1 + slack) * (access_total + run) / n + 1e-9;
  const auto within = [&](int32_t i) { return access[i] + run <= bound; };
  const auto rotated = [&](int32_t x) {
    return (x + n - static_cast<int32_t>(request.value() % n)) % n;
  };
  // Less access first; ties: the computing instance, an instance the request reads from, the
  // less loaded, then an order rotated by the request id.
  const auto better = [&](int32_t i, int32_t cur) {
    if (cur < 0) return true;
    if (access[i] != access[cur]) return access[i] < access[cur];
    if ((i == compute) != (cur == compute)) return i == compute;
    if (uses[i] != uses[cur]) return uses[i] > uses[cur];
    if (state[i].load != state[cur].load) return state[i].load < state[cur].load;
    return rotated(i) < rotated(cur);
  };
  int32_t used = -1, least = -1;
  for (InstanceId rep : replicas) {
    const int32_t i = rep.value();
    if (i == compute && within(i)) return i;
    if (uses[i] && within(i) && better(i, used)) used = i;
    if (better(i, least)) least = i;
  }
  return used >= 0 ? used : least;
}

// Step 3 under Dispatch::kMatching (planner.h): the serving replica of every (request, cached
// segment) of one batch, from a min-cost transportation problem over the batch's runs of
// segments with the same replicas. `holder_work` is the work earlier batches of this call put on
// each instance; `work_cap` the per-holder cap including this batch.
absl::StatusOr<std::vector<std::vector<int32_t>>> MatchQueries(
    absl::Span<const PlanRequest> reqs, absl::Span<const int32_t> compute,
    absl::Span<const double> holder_work, double work_cap,
    absl::Span<const balance::InstanceState> state, const ModelShape& shape) {
  const auto n = static_cast<int32_t>(state.size());
  std::vector<std::vector<int32_t>> pick(reqs.size());
  std::vector<double> forced(n, 0.0);
  struct Run {
    int32_t request = 0;
    int32_t first = 0;  // segment index
    int32_t end = 0;    // one past the last
    double work = 0;
  };
  std::vector<Run> runs;
  double flex_work = 0;
  for (size_t ri = 0; ri < reqs.size(); ++ri) {
    const PlanRequest& r = reqs[ri];
    const auto q = static_cast<double>(r.new_tokens);
    pick[ri].assign(r.cached.size(), -1);
    for (size_t si = 0; si < r.cached.size(); ++si) {
      const CachedSegment& s = r.cached[si];
      if (s.replicas.size() == 1) {
        pick[ri][si] = s.replicas[0].value();
        forced[pick[ri][si]] += q * s.num_tokens;
        continue;
      }
      if (r.new_tokens == 0) {  // no work: any replica serves; prefer the computing instance
        pick[ri][si] = s.replicas[0].value();
        for (InstanceId rep : s.replicas) {
          if (rep.value() == compute[ri]) pick[ri][si] = rep.value();
        }
        continue;
      }
      const bool extends = !runs.empty() && runs.back().request == static_cast<int32_t>(ri) &&
                           runs.back().end == static_cast<int32_t>(si) &&
                           SameReplicas(r.cached[si - 1], s);
      if (!extends) {
        runs.push_back(
            Run{static_cast<int32_t>(ri), static_cast<int32_t>(si), static_cast<int32_t>(si), 0});
      }
      runs.back().end = static_cast<int32_t>(si) + 1;
      runs.back().work += q * s.num_tokens;
      flex_work += q * s.num_tokens;
    }
  }
  if (runs.empty()) return pick;

  // Integer costs. Within an instance's work cap a unit costs its byte rate (below), scaled to
  // [0, kByteScale], times step_cost, plus a tie-break below step_cost: the replica's rank (less
  // plan work, then less load, then an order rotated by the request id). Beyond the cap a unit
  // costs more than any unit within one, in kOverTiers tiers of `step` units (a quarter of the
  // batch's mean work per instance) at rising costs, plus the rank, bytes aside: work goes over
  // a cap only where no placement within one exists, and then spreads over the replicas by load
  // alone, as greedy's does.
  constexpr int64_t kByteScale = 1'000'000;
  constexpr int kOverTiers = 8;
  const int64_t step_cost = 64 * static_cast<int64_t>(n);
  const int64_t over_base = (kByteScale + 2) * step_cost;
  const int64_t overflow_cost = over_base * (kOverTiers + 2);
  // Work in units the solver's int64 arithmetic holds with room.
  constexpr int64_t kMaxCost = std::numeric_limits<int64_t>::max() / 8;
  const double max_units =
      std::min<double>(1 << 20, static_cast<double>(kMaxCost) / static_cast<double>(overflow_cost));
  const double unit = std::max(1.0, std::ceil(flex_work / max_units));
  double batch_work = flex_work;
  for (double f : forced) batch_work += f;
  const int64_t step = std::max<int64_t>(1, std::llround(batch_work / unit / n / 4));
  std::vector<InstanceCapacity> capacity(n);
  for (int32_t i = 0; i < n; ++i) {
    const double used = holder_work[i];
    const int64_t free_units =
        static_cast<int64_t>(std::floor(std::max(0.0, work_cap - used) / unit));
    capacity[i].tiers.push_back(CapacityTier{free_units, 0});
    const int64_t over = static_cast<int64_t>(std::max(0.0, used - work_cap) / unit);
    for (int64_t k = over / step; k < kOverTiers; ++k) {
      const int64_t units = k == over / step ? step - over % step : step;
      capacity[i].over_tiers.push_back(CapacityTier{units, over_base * (k + 1)});
    }
  }
  // The bytes of request r on remote holder h are a fixed charge: bytes(r, h) once h serves any
  // of r's segments (step 4). A transportation problem prices per unit, so the charge is spread
  // over the work: first as if h served all of r's segments it holds, then, for a few rounds,
  // over the work h took in the last solution (dynamic slope scaling, as for fixed-charge
  // network flows: a holder that took little becomes dear per unit, one that took much cheap).
  // The best solution found (least work over the caps, then least bytes) is kept.
  std::vector<double> tokens_on(n);
  std::vector<std::vector<double>> fixed(reqs.size()), rate(reqs.size());
  for (size_t ri = 0; ri < reqs.size(); ++ri) {
    const PlanRequest& r = reqs[ri];
    if (r.new_tokens == 0) continue;
    std::fill(tokens_on.begin(), tokens_on.end(), 0.0);
    for (const CachedSegment& s : r.cached) {
      for (InstanceId rep : s.replicas) tokens_on[rep.value()] += s.num_tokens;
    }
    fixed[ri].assign(n, 0.0);
    rate[ri].assign(n, 0.0);
    for (int32_t h = 0; h < n; ++h) {
      if (h == compute[ri] || tokens_on[h] == 0) continue;
      const auto tokens = static_cast<int64_t>(tokens_on[h]);
      fixed[ri][h] = static_cast<double>(
          std::min(MoveQueriesBytes(shape, r.new_tokens), KvBytes(shape, tokens)));
      rate[ri][h] = fixed[ri][h] / (static_cast<double>(r.new_tokens) * tokens_on[h]);
    }
  }
  std::vector<int32_t> rank_order(n), rank(n);
  std::vector<TransportItem> items(runs.size());
  std::vector<absl::InlinedVector<int64_t, 4>> option_rank(runs.size());
  for (size_t k = 0; k < runs.size(); ++k) {
    const Run& run = runs[k];
    const PlanRequest& r = reqs[run.request];
    if (k == 0 || runs[k - 1].request != run.request) {  // the ranks are per request
      std::iota(rank_order.begin(), rank_order.end(), 0);
      const auto rotated = [&](int32_t x) {
        return (x + n - static_cast<int32_t>(r.request.value() % n)) % n;
      };
      std::sort(rank_order.begin(), rank_order.end(), [&](int32_t a, int32_t b) {
        if (holder_work[a] != holder_work[b]) return holder_work[a] < holder_work[b];
        if (state[a].load != state[b].load) return state[a].load < state[b].load;
        return rotated(a) < rotated(b);
      });
      for (int32_t i = 0; i < n; ++i) rank[rank_order[i]] = i;
    }
    items[k].amount = std::max<int64_t>(1, std::llround(run.work / unit));
    for (InstanceId rep : r.cached[run.first].replicas) {
      items[k].options.push_back(TransportOption{rep.value(), 0, rank[rep.value()]});
      option_rank[k].push_back(rank[rep.value()]);
    }
  }
  constexpr int kRounds = 4;
  TransportSolution sol;
  int64_t best_over = std::numeric_limits<int64_t>::max();
  double best_bytes = 0;
  std::vector<std::vector<double>> took(reqs.size());  // work units r placed on h
  for (int round = 0; round < kRounds; ++round) {
    double max_rate = 0;
    for (const Run& run : runs) {
      for (InstanceId rep : reqs[run.request].cached[run.first].replicas) {
        max_rate = std::max(max_rate, rate[run.request][rep.value()]);
      }
    }
    for (size_t k = 0; k < runs.size(); ++k) {
      for (size_t o = 0; o < items[k].options.size(); ++o) {
        TransportOption& opt = items[k].options[o];
        const double scaled = max_rate > 0 ? rate[runs[k].request][opt.instance] / max_rate : 0;
        opt.unit_cost = std::llround(scaled * kByteScale) * step_cost + option_rank[k][o];
      }
    }
    TOKENLAKE_ASSIGN_OR_RETURN(TransportSolution trial,
                               SolveTransportProblem(items, capacity, overflow_cost));
    for (const Run& run : runs) took[run.request].assign(n, 0.0);
    for (size_t k = 0; k < runs.size(); ++k) {
      for (size_t o = 0; o < items[k].options.size(); ++o) {
        took[runs[k].request][items[k].options[o].instance] +=
            static_cast<double>(trial.flow[k][o]);
      }
    }
    double bytes = 0;
    for (size_t ri = 0; ri < reqs.size(); ++ri) {
      if (took[ri].empty()) continue;
      for (int32_t h = 0; h < n; ++h) {
        if (took[ri][h] > 0) bytes += fixed[ri][h];
      }
    }
    const bool better = trial.overflow_units < best_over ||
                        (trial.overflow_units == best_over && bytes < best_bytes);
    if (better) {
      best_over = trial.overflow_units;
      best_bytes = bytes;
      sol = std::move(trial);
    } else if (round > 0) {
      break;  // no better than the last: the slopes have settled
    }
    for (size_t ri = 0; ri < reqs.size(); ++ri) {
      if (took[ri].empty()) continue;
      for (int32_t h = 0; h < n; ++h) {
        if (took[ri][h] > 0 && fixed[ri][h] > 0) rate[ri][h] = fixed[ri][h] / (took[ri][h] * unit);
      }
    }
  }

  // Cut each run on segment boundaries in prefix order: the largest share first, each replica
  // serving segments while its share lasts (at least half of the next segment's work left).
  std::vector<int32_t> order;
  std::vector<double> left;
  for (size_t k = 0; k < runs.size(); ++k) {
    const Run& run = runs[k];
    const PlanRequest& r = reqs[run.request];
    const size_t m = items[k].options.size();
    order.resize(m);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return sol.flow[k][a] > sol.flow[k][b]; });
    left.assign(m, 0.0);
    for (size_t o = 0; o < m; ++o) left[o] = static_cast<double>(sol.flow[k][o]) * unit;
    size_t cur = 0;
    for (int32_t si = run.first; si < run.end; ++si) {
      const double w = static_cast<double>(r.new_tokens) * r.cached[si].num_tokens;
      while (left[order[cur]] < w / 2 && cur + 1 < m && sol.flow[k][order[cur + 1]] > 0) ++cur;
      pick[run.request][si] = items[k].options[order[cur]].instance;
      left[order[cur]] -= w;
    }
  }
  return pick;
}

}  // namespace

absl::Status Planner::ValidateRequests(absl::Span<const PlanRequest> requests,
                                       int32_t num_instances, int32_t batch) const {
  for (size_t r = 0; r < requests.size(); ++r) {
    const PlanRequest& req = requests[r];
    if (req.new_tokens < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("batch %d request %d (id %d): new_tokens must be >= 0, got %d", batch, r,
                          req.request.value(), req.new_tokens));
    }
    for (size_t s = 0; s < req.cached.size(); ++s) {
      const CachedSegment& seg = req.cached[s];
      if (seg.num_tokens <= 0) {
        return absl::InvalidArgumentError(
            absl::StrFormat("batch %d request %d cached segment %d: num_tokens must be > 0, got %d",
                            batch, r, s, seg.num_tokens));
      }
      if (seg.replicas.empty()) {
        return absl::InvalidArgumentError(
            absl::StrFormat("batch %d request %d cached segment %d (id %d) has no replica", batch,
                            r, s, seg.segment.value()));
      }
      for (InstanceId rep : seg.replicas) {
        if (!rep.valid() || rep.value() < 0 || rep.value() >= num_instances) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "batch %d request %d cached segment %d: unknown instance %d (pool has %d)", batch, r,
              s, rep.value(), num_instances));
        }
      }
    }
    for (size_t s = 0; s < req.new_segments.size(); ++s) {
      if (req.new_segments[s].num_tokens <= 0 ||
          req.new_segments[s].num_tokens > options_.segment_tokens) {
        return absl::InvalidArgumentError(
            absl::StrFormat("batch %d request %d new segment %d: num_tokens %d not in [1, %d]",
                            batch, r, s, req.new_segments[s].num_tokens, options_.segment_tokens));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<BatchPlan>> Planner::GenPlans(
    absl::Span<const PlanBatch> batches, absl::Span<const balance::InstanceState> instances) const {
  TOKENLAKE_RETURN_IF_ERROR(ValidateInstances(instances));
  const int32_t n = static_cast<int32_t>(instances.size());
  for (size_t b = 0; b < batches.size(); ++b) {
    if (batches[b].dop < 1 || batches[b].dop > n) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "batch %d: dop %d is outside [1, %d] (the number of instances)", b, batches[b].dop, n));
    }
    TOKENLAKE_RETURN_IF_ERROR(ValidateRequests(batches[b].requests, n, static_cast<int32_t>(b)));
    const auto& cands = batches[b].candidates;
    if (!cands.empty()) {
      std::vector<char> seen(n, 0);
      for (InstanceId c : cands) {
        if (!c.valid() || c.value() < 0 || c.value() >= n || seen[c.value()]) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "batch %d: candidate instance %d is outside [0, %d) or repeated", b, c.value(), n));
        }
        seen[c.value()] = 1;
      }
      if (static_cast<int32_t>(cands.size()) < batches[b].dop) {
        return absl::InvalidArgumentError(
            absl::StrFormat("batch %d: dop %d exceeds its %d candidate instances", b,
                            batches[b].dop, cands.size()));
      }
    }
  }
  const ModelShape& shape = options_.shape;
  std::vector<balance::InstanceState> state(instances.begin(), instances.end());
  std::vector<double> holder_work(n, 0.0);  // work assigned by the plans of this call
  double plan_work_total = 0;
  std::vector<double> held(n), held_r(n);
  std::vector<char> in_group(n);
  std::vector<int64_t> assigned_q(n);
  std::vector<int32_t> order(n);
  std::vector<int32_t> seg_holder;
  std::vector<int32_t> holder_slot(n, -1);  // instance -> index in rp.holders (-1: none yet)
  std::vector<char> uses(n);                // instances the current request reads from
  std::vector<BatchPlan> plans;
  plans.reserve(batches.size());

  for (size_t b = 0; b < batches.size(); ++b) {
    const PlanBatch& batch = batches[b];
    const auto& reqs = batch.requests;
    BatchPlan plan;
    plan.batch_index = static_cast<int32_t>(b);
    std::vector<balance::InstanceState> state_at_start;
    if (options_.compare_dispatch) state_at_start = state;
    plan.dop = batch.dop;

    // 1. Instance group.
    std::fill(held.begin(), held.end(), 0.0);
    double batch_work = 0;
    for (const PlanRequest& r : reqs) {
      int64_t tokens = 0;
      for (const CachedSegment& s : r.cached) {
        tokens += s.num_tokens;
        if (s.replicas.size() == 1) {
          held[s.replicas[0].value()] += s.num_tokens;
          continue;
        }
        const double share = static_cast<double>(s.num_tokens) / s.replicas.size();
        for (InstanceId rep : s.replicas) held[rep.value()] += share;
      }
      batch_work += static_cast<double>(r.new_tokens) * static_cast<double>(tokens);
    }
    double mean_load = 0;
    for (const auto& st : state) mean_load += st.load;
    mean_load /= n;
    std::vector<double> score(n);
    for (int32_t i = 0; i < n; ++i) {
      const double over = mean_load > 0 ? std::max(0.0, state[i].load / mean_load - 1) : 0.0;
      score[i] = held[i] / (1 + over);
    }
    order.resize(n);
    std::iota(order.begin(), order.end(), 0);
    if (!batch.candidates.empty()) {
      order.clear();
      for (InstanceId c : batch.candidates) order.push_back(c.value());
    }
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t c) {
      if (score[a] != score[c]) return score[a] > score[c];
      if (state[a].load != state[c].load) return state[a].load < state[c].load;
      return a < c;
    });
    std::fill(in_group.begin(), in_group.end(), 0);
    for (int32_t k = 0; k < batch.dop; ++k) {
      plan.instance_group.push_back(InstanceId(order[k]));
      in_group[order[k]] = 1;
    }

    // 2. Computing instances.
    std::vector<int32_t> compute(reqs.size(), -1);
    {
      int64_t total_q = 0, max_q = 0;
      for (const PlanRequest& r : reqs) {
        total_q += r.new_tokens;
        max_q = std::max(max_q, r.new_tokens);
      }
      const int64_t q_cap = std::max<int64_t>(
          max_q, static_cast<int64_t>(std::ceil(static_cast<double>(total_q) / batch.dop *
                                                (1 + options_.compute_slack))));
      std::fill(assigned_q.begin(), assigned_q.end(), 0);
      std::vector<int32_t> by_q(reqs.size());
      std::iota(by_q.begin(), by_q.end(), 0);
      std::stable_sort(by_q.begin(), by_q.end(), [&](int32_t a, int32_t c) {
        return reqs[a].new_tokens > reqs[c].new_tokens;
      });
      for (int32_t ri : by_q) {
        const PlanRequest& r = reqs[ri];
        int32_t chosen = -1;
        const InstanceId pref = r.preferred_instance;
        if (pref.valid() && pref.value() >= 0 && pref.value() < n && in_group[pref.value()] &&
            assigned_q[pref.value()] + r.new_tokens <= q_cap) {
          chosen = pref.value();
        }
        if (chosen < 0) {
          for (const InstanceId g : plan.instance_group) held_r[g.value()] = 0;
          for (const CachedSegment& s : r.cached) {
            for (InstanceId rep : s.replicas) {
              if (in_group[rep.value()]) held_r[rep.value()] += s.num_tokens;
            }
          }
          for (const InstanceId g : plan.instance_group) {
            const int32_t i = g.value();
            if (assigned_q[i] + r.new_tokens > q_cap) continue;
            if (chosen < 0 || held_r[i] > held_r[chosen] ||
                (held_r[i] == held_r[chosen] && assigned_q[i] < assigned_q[chosen])) {
              chosen = i;
            }
          }
        }
        if (chosen < 0) {
          for (const InstanceId g : plan.instance_group) {
            if (chosen < 0 || assigned_q[g.value()] < assigned_q[chosen]) chosen = g.value();
          }
        }
        compute[ri] = chosen;
        assigned_q[chosen] += r.new_tokens;
      }
    }

    // 3-4. Query plans.
    plan_work_total += batch_work;
    const double work_cap = (1 + options_.holder_slack) * plan_work_total / n;
    std::vector<std::vector<int32_t>> matched;
    if (options_.dispatch == PlannerOptions::Dispatch::kMatching) {
      TOKENLAKE_ASSIGN_OR_RETURN(matched,
                                 MatchQueries(reqs, compute, holder_work, work_cap, state, shape));
    }
    plan.requests.reserve(reqs.size());
    // Cache access (tokens attended per iteration) in force on each instance, with this batch's
    // reads added as they are chosen (the greedy rule's run readers).
    std::vector<double> access(n);
    double access_total = 0;
    for (int32_t i = 0; i < n; ++i) {
      access[i] = state[i].access_tokens;
      access_total += access[i];
    }
    for (size_t ri = 0; ri < reqs.size(); ++ri) {
      const PlanRequest& r = reqs[ri];
      // Instances this request reads from whatever the dispatch: its segments with one copy.
      std::fill(uses.begin(), uses.end(), 0);
      for (const CachedSegment& s : r.cached) {
        if (s.replicas.size() == 1) uses[s.replicas[0].value()] = 1;
      }
      int32_t reader = -1;  // the current run's reader (greedy, several replicas)
      RequestPlan rp;
      rp.request = r.request;
      rp.compute_instance = InstanceId(compute[ri]);
      rp.new_tokens = r.new_tokens;
      rp.segments.reserve(r.cached.size());
      rp.holders.reserve(4);
      const double q = static_cast<double>(r.new_tokens);
      size_t last_holder = 0;  // index in rp.holders of the previous segment's holder
      seg_holder.clear();      // index in rp.holders of each segment's holder
      for (size_t si = 0; si < r.cached.size(); ++si) {
        const CachedSegment& s = r.cached[si];
        const double w = q * s.num_tokens;
        int32_t pick = -1;
        if (!matched.empty()) {
          pick = matched[ri][si];
        } else if (s.replicas.size() == 1) {
          pick = s.replicas[0].value();
        } else {
          auto fits = [&](int32_t i) { return holder_work[i] + w <= work_cap + 1e-9; };
          if (si == 0 || !SameReplicas(r.cached[si - 1], s)) {
            int64_t run_tokens = 0;
            for (size_t k = si; k < r.cached.size() && SameReplicas(r.cached[k], s); ++k) {
              run_tokens += r.cached[k].num_tokens;
            }
            reader = RunReader(s.replicas, run_tokens, compute[ri], uses, access, access_total,
                               state, r.request, options_.access_slack);
          }
          // (a) the run's reader.
          if (fits(reader)) pick = reader;
          // (b) a holder this request already uses.
          if (pick < 0) {
            for (const HolderPlan& h : rp.holders) {
              for (InstanceId rep : s.replicas) {
                if (pick < 0 && rep == h.holder && fits(rep.value())) pick = rep.value();
              }
            }
          }
          // (c) the replica with the least plan work (fitting first).
          if (pick < 0) {
            int32_t best_fit = -1, best_any = -1;
            for (InstanceId rep : s.replicas) {
              const int32_t i = rep.value();
              // Ties: the less loaded instance, then an order rotated by the request id, so that
              // plans of one request each (decodes) spread over the replicas.
              const auto rotated = [&](int32_t x) {
                return (x + n - static_cast<int32_t>(r.request.value() % n)) % n;
              };
              auto better = [&](int32_t cur) {
                if (cur < 0 || holder_work[i] < holder_work[cur]) return true;
                if (holder_work[i] > holder_work[cur]) return false;
                if (state[i].load != state[cur].load) return state[i].load < state[cur].load;
                return rotated(i) < rotated(cur);
              };
              if (fits(i) && better(best_fit)) best_fit = i;
              if (better(best_any)) best_any = i;
            }
            pick = best_fit >= 0 ? best_fit : best_any;
          }
        }
        holder_work[pick] += w;
        access[pick] += s.num_tokens;
        access_total += s.num_tokens;
        uses[pick] = 1;
        rp.segments.push_back(
            SegmentAssignment{s.segment, s.num_tokens, InstanceId(pick), HolderAction::kLocal});
        rp.cached_tokens += s.num_tokens;
        if (last_holder >= rp.holders.size() || rp.holders[last_holder].holder.value() != pick) {
          if (holder_slot[pick] < 0) {
            holder_slot[pick] = static_cast<int32_t>(rp.holders.size());
            rp.holders.push_back(HolderPlan{InstanceId(pick), HolderAction::kLocal, 0, 0, 0});
          }
          last_holder = static_cast<size_t>(holder_slot[pick]);
        }
        seg_holder.push_back(static_cast<int32_t>(last_holder));
        HolderPlan& h = rp.holders[last_holder];
        h.num_segments += 1;
        h.cached_tokens += s.num_tokens;
      }
      for (const HolderPlan& h : rp.holders) holder_slot[h.holder.value()] = -1;
      rp.attention_flops = AttentionFlops(shape, r.new_tokens, rp.cached_tokens);
      for (HolderPlan& h : rp.holders) {
        h.attention_flops = AttentionFlops(shape, r.new_tokens, h.cached_tokens);
        if (h.holder == rp.compute_instance) continue;
        if (PreferMoveQueries(shape, r.new_tokens, h.cached_tokens)) {
          h.action = HolderAction::kMoveQueries;
          h.bytes = MoveQueriesBytes(shape, r.new_tokens);
        } else {
          h.action = HolderAction::kPullKv;
          h.bytes = KvBytes(shape, h.cached_tokens);
          // Pulled KV is attended where the request computes.
          access[h.holder.value()] -= static_cast<double>(h.cached_tokens);
          access[compute[ri]] += static_cast<double>(h.cached_tokens);
        }
      }
      if (rp.holders.size() > 1 ||
          (rp.holders.size() == 1 && rp.holders[0].holder != rp.compute_instance)) {
        for (size_t k = 0; k < rp.segments.size(); ++k) {
          rp.segments[k].action = rp.holders[seg_holder[k]].action;
        }
      }
      // Transfers of this request: queries and results holder by holder, then pulled segments
      // in prefix order.
      TransferPlan& tp = plan.transfer;
      bool any_pull = false;
      for (const HolderPlan& h : rp.holders) {
        if (h.action == HolderAction::kMoveQueries) {
          const int64_t out = QueryBytes(shape, r.new_tokens);
          const int64_t back = PartialResultBytes(shape, r.new_tokens);
          tp.transfers.push_back(Transfer{TransferKind::kQueries, r.request, SegmentId(),
                                          rp.compute_instance, h.holder, out});
          tp.transfers.push_back(Transfer{TransferKind::kPartialResults, r.request, SegmentId(),
                                          h.holder, rp.compute_instance, back});
          tp.query_bytes += out + back;
        } else if (h.action == HolderAction::kPullKv) {
          any_pull = true;
        }
      }
      if (any_pull) {
        for (const SegmentAssignment& a : rp.segments) {
          if (a.action != HolderAction::kPullKv) continue;
          const int64_t bytes = KvBytes(shape, a.num_tokens);
          tp.transfers.push_back(Transfer{TransferKind::kSegmentKv, r.request, a.segment, a.holder,
                                          rp.compute_instance, bytes});
          tp.kv_pull_bytes += bytes;
        }
      }
      plan.requests.push_back(std::move(rp));
    }

    // 5. New segments. Under kMatching, first every segment its producer keeps (the Balancer
    // places it there on the state so far), a request's chain from its start; then the rest.
    std::vector<std::vector<InstanceId>> targets(reqs.size());
    const auto place = [&](size_t ri, size_t k) -> absl::Status {
      const InstanceId source(compute[ri]);
      TOKENLAKE_ASSIGN_OR_RETURN(std::optional<InstanceId> placed,
                                 balancer_->PlaceNewSegment(source, state));
      const InstanceId target = placed.value_or(source);
      auto& st = state[target.value()];
      if (st.used_slots < st.capacity_slots) st.used_slots += 1;
      targets[ri][k] = target;
      return absl::OkStatus();
    };
    for (size_t ri = 0; ri < reqs.size(); ++ri) {
      targets[ri].assign(reqs[ri].new_segments.size(), InstanceId());
      if (options_.dispatch != PlannerOptions::Dispatch::kMatching) continue;
      const InstanceId source(compute[ri]);
      for (InstanceId& target : targets[ri]) {
        TOKENLAKE_ASSIGN_OR_RETURN(std::optional<InstanceId> placed,
                                   balancer_->PlaceNewSegment(source, state));
        if (placed != source) break;
        state[source.value()].used_slots += 1;  // PlaceNewSegment chose it: it has a free slot
        target = source;
      }
    }
    for (size_t ri = 0; ri < reqs.size(); ++ri) {
      for (size_t k = 0; k < targets[ri].size(); ++k) {
        if (!targets[ri][k].valid()) TOKENLAKE_RETURN_IF_ERROR(place(ri, k));
      }
    }
    for (size_t ri = 0; ri < reqs.size(); ++ri) {
      const PlanRequest& r = reqs[ri];
      const InstanceId source(compute[ri]);
      SegmentId parent = r.cached.empty() ? SegmentId() : r.cached.back().segment;
      for (size_t k = 0; k < r.new_segments.size(); ++k) {
        const index::SegmentKey& key = r.new_segments[k];
        const InstanceId target = targets[ri][k];
        plan.transfer.new_segments.push_back(
            NewSegmentPlacement{r.request, key.id, parent, key.num_tokens, source, target});
        if (target != source) {
          const int64_t bytes = KvBytes(shape, key.num_tokens);
          plan.transfer.transfers.push_back(
              Transfer{TransferKind::kNewSegmentKv, r.request, key.id, source, target, bytes});
          plan.transfer.new_segment_bytes += bytes;
        }
        parent = key.id;
      }
    }
    plan.transfer.total_bytes =
        plan.transfer.query_bytes + plan.transfer.kv_pull_bytes + plan.transfer.new_segment_bytes;
    // This batch's work now loads its holders for the next batch's decisions.
    for (int32_t i = 0; i < n; ++i) state[i].access_tokens = access[i];
    for (const RequestPlan& rp : plan.requests) {
      for (const HolderPlan& h : rp.holders) {
        state[h.holder.value()].load +=
            static_cast<double>(rp.new_tokens) * static_cast<double>(h.cached_tokens);
      }
    }
    if (options_.compare_dispatch) {
      PlannerOptions other_options = options_;
      other_options.compare_dispatch = false;
      other_options.dispatch = options_.dispatch == PlannerOptions::Dispatch::kMatching
                                   ? PlannerOptions::Dispatch::kGreedy
                                   : PlannerOptions::Dispatch::kMatching;
      const Planner other(other_options, balancer_);
      TOKENLAKE_ASSIGN_OR_RETURN(std::vector<BatchPlan> other_plan,
                                 other.GenPlans(absl::MakeConstSpan(&batch, 1), state_at_start));
      const auto holders = [](const BatchPlan& p) {
        int64_t h = 0;
        for (const RequestPlan& rp : p.requests) h += static_cast<int64_t>(rp.holders.size());
        return h;
      };
      absl::MutexLock lock(&comparison_mu_);
      comparison_.batches += 1;
      comparison_.query_bytes += plan.transfer.query_bytes + plan.transfer.kv_pull_bytes;
      comparison_.other_query_bytes +=
          other_plan[0].transfer.query_bytes + other_plan[0].transfer.kv_pull_bytes;
      comparison_.holders += holders(plan);
      comparison_.other_holders += holders(other_plan[0]);
      comparison_.new_segment_bytes += plan.transfer.new_segment_bytes;
      comparison_.other_new_segment_bytes += other_plan[0].transfer.new_segment_bytes;
    }
    plans.push_back(std::move(plan));
  }
  return plans;
}

DispatchComparison Planner::dispatch_comparison() const {
  absl::MutexLock lock(&comparison_mu_);
  return comparison_;
}

absl::StatusOr<std::vector<InstanceCacheLoad>> Planner::GetCacheLoad(
    absl::Span<const PlanRequest> requests,
    absl::Span<const balance::InstanceState> instances) const {
  TOKENLAKE_RETURN_IF_ERROR(ValidateInstances(instances));
  const int32_t n = static_cast<int32_t>(instances.size());
  TOKENLAKE_RETURN_IF_ERROR(ValidateRequests(requests, n, 0));
  const ModelShape& shape = options_.shape;
  const int64_t slot_bytes = KvBytes(shape, options_.segment_tokens);
  std::vector<InstanceCacheLoad> out(n);
  for (int32_t i = 0; i < n; ++i) {
    out[i].instance = InstanceId(i);
    out[i].memory_used_bytes = instances[i].used_slots * slot_bytes;
    out[i].memory_free_bytes = (instances[i].capacity_slots - instances[i].used_slots) * slot_bytes;
  }
  std::vector<double> held(n);
  for (const PlanRequest& r : requests) {
    std::fill(held.begin(), held.end(), 0.0);
    for (const CachedSegment& s : r.cached) {
      const double reps = static_cast<double>(s.replicas.size());
      const double flops = AttentionFlops(shape, r.new_tokens, s.num_tokens) / reps;
      const double kv = static_cast<double>(KvBytes(shape, s.num_tokens)) / reps;
      const double units = static_cast<double>(r.new_tokens) * s.num_tokens / reps;
      for (InstanceId rep : s.replicas) {
        InstanceCacheLoad& l = out[rep.value()];
        l.attention_flops += flops;
        l.kv_read_bytes += kv;
        l.cached_tokens += s.num_tokens / reps;
        l.load_units += units;
        held[rep.value()] += s.num_tokens;
      }
    }
    int32_t home = 0;
    for (int32_t i = 1; i < n; ++i) {
      if (held[i] > held[home] ||
          (held[i] == held[home] && held[i] == 0 && instances[i].load < instances[home].load)) {
        home = i;
      }
    }
    for (const index::SegmentKey& key : r.new_segments) {
      out[home].new_memory_bytes += KvBytes(shape, key.num_tokens);
    }
  }
  return out;
}

}  // namespace tokenlake::plan
