// A capacitated transportation problem: the matching behind the planner's dispatch of queries
// (planner.h, step 3; ADR 0015).
//
// Items each have an integer amount to place on instances; an item may use only its options.
// Each instance has a capacity made of tiers (a number of units at a cost per unit) and, beyond
// it, overflow tiers and then an unbounded overflow at `overflow_cost` per unit, so every
// problem is feasible. A unit placed within an instance's capacity costs its option's
// `unit_cost` plus the tier's cost; a unit beyond it costs the option's `over_unit_cost` plus
// the overflow tier's cost. (The planner prices bytes within the capacity and lets work beyond a
// load limit spread by load alone.) Tier costs need not ascend, but every caller's do (a convex
// cost), and the solver then fills the cheaper tiers first. The result minimises the sum of
// every unit's costs. Solved exactly as a min-cost flow (LEMON's network simplex, from Debian's
// liblemon-dev).
//
// Thread-safety: a pure function.
#ifndef TOKENLAKE_PLAN_TRANSPORT_PROBLEM_H_
#define TOKENLAKE_PLAN_TRANSPORT_PROBLEM_H_

#include <cstdint>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace tokenlake::plan {

struct TransportOption {
  int32_t instance = 0;        // index into the instances, distinct within an item
  int64_t unit_cost = 0;       // per unit within the instance's capacity, >= 0
  int64_t over_unit_cost = 0;  // per unit beyond it, >= 0
};

struct TransportItem {
  int64_t amount = 0;                               // >= 0
  absl::InlinedVector<TransportOption, 4> options;  // non-empty when amount > 0
};

struct CapacityTier {
  int64_t units = 0;      // >= 0
  int64_t unit_cost = 0;  // >= 0, below the overflow cost
};

struct InstanceCapacity {
  std::vector<CapacityTier> tiers;       // the capacity
  std::vector<CapacityTier> over_tiers;  // beyond it, before the unbounded overflow
};

struct TransportSolution {
  // flow[i][k]: the units of item i placed on its option k (same order as the options).
  std::vector<absl::InlinedVector<int64_t, 4>> flow;
  // over_flow[i][k]: the part of flow[i][k] beyond the instance's capacity.
  std::vector<absl::InlinedVector<int64_t, 4>> over_flow;
  int64_t total_cost = 0;      // the objective
  int64_t overflow_units = 0;  // units beyond a capacity (over tiers and unbounded overflow)
};

// Errors: InvalidArgument naming the item/option or instance for a negative amount, tier or
// cost, a tier cost not below `overflow_cost`, an option's instance outside the instances or
// repeated in an item, an item with units and no option, or an objective that could overflow
// int64 (the sum of amounts x the largest cost a unit can have).
absl::StatusOr<TransportSolution> SolveTransportProblem(
    absl::Span<const TransportItem> items, absl::Span<const InstanceCapacity> instances,
    int64_t overflow_cost);

}  // namespace tokenlake::plan

#endif  // TOKENLAKE_PLAN_TRANSPORT_PROBLEM_H_
