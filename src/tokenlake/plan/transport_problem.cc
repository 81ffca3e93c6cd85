#include "tokenlake/plan/transport_problem.h"

#include <algorithm>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "lemon/network_simplex.h"
#include "lemon/smart_graph.h"

namespace tokenlake::plan {
namespace {

absl::Status ValidateTiers(const std::vector<CapacityTier>& tiers, int32_t instance,
                           const char* what, int64_t overflow_cost, int64_t* max_cost) {
  for (size_t t = 0; t < tiers.size(); ++t) {
    const CapacityTier& tier = tiers[t];
    if (tier.units < 0 || tier.unit_cost < 0 || tier.unit_cost >= overflow_cost) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "transport problem: instance %d %s %d has %d units at %d per unit; both must be >= 0 "
          "and the cost below %d, the overflow cost",
          instance, what, t, tier.units, tier.unit_cost, overflow_cost));
    }
    *max_cost = std::max(*max_cost, tier.unit_cost);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TransportSolution> SolveTransportProblem(
    absl::Span<const TransportItem> items, absl::Span<const InstanceCapacity> instances,
    int64_t overflow_cost) {
  const auto n = static_cast<int32_t>(instances.size());
  if (overflow_cost < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("transport problem: the overflow cost %d is < 0", overflow_cost));
  }
  int64_t max_tier_cost = overflow_cost;
  for (int32_t i = 0; i < n; ++i) {
    if (absl::Status s =
            ValidateTiers(instances[i].tiers, i, "tier", overflow_cost, &max_tier_cost);
        !s.ok()) {
      return s;
    }
    if (absl::Status s =
            ValidateTiers(instances[i].over_tiers, i, "over tier", overflow_cost, &max_tier_cost);
        !s.ok()) {
      return s;
    }
  }
  constexpr int64_t kLimit = std::numeric_limits<int64_t>::max() / 4;
  int64_t total = 0, max_option_cost = 0;
  for (size_t it = 0; it < items.size(); ++it) {
    const TransportItem& item = items[it];
    if (item.amount < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("transport problem: item %d has amount %d < 0", it, item.amount));
    }
    if (item.amount > 0 && item.options.empty()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "transport problem: item %d has %d units and no option", it, item.amount));
    }
    for (size_t k = 0; k < item.options.size(); ++k) {
      const TransportOption& o = item.options[k];
      if (o.instance < 0 || o.instance >= n) {
        return absl::InvalidArgumentError(
            absl::StrFormat("transport problem: item %d option %d names instance %d (%d exist)", it,
                            k, o.instance, n));
      }
      if (o.unit_cost < 0 || o.over_unit_cost < 0 || o.unit_cost > kLimit ||
          o.over_unit_cost > kLimit) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "transport problem: item %d option %d costs %d / %d per unit; must be >= 0", it, k,
            o.unit_cost, o.over_unit_cost));
      }
      max_option_cost = std::max({max_option_cost, o.unit_cost, o.over_unit_cost});
      for (size_t j = 0; j < k; ++j) {
        if (item.options[j].instance == o.instance) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "transport problem: item %d names instance %d twice", it, o.instance));
        }
      }
    }
    if (item.amount > kLimit - total) {
      return absl::InvalidArgumentError("transport problem: the amounts overflow int64");
    }
    total += item.amount;
  }
  const int64_t max_unit_cost = max_option_cost + max_tier_cost;
  if (max_option_cost > kLimit - max_tier_cost || (total > 0 && max_unit_cost > kLimit / total)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("transport problem: %d units at up to %d per unit could overflow int64",
                        total, max_unit_cost));
  }

  TransportSolution solution;
  solution.flow.resize(items.size());
  solution.over_flow.resize(items.size());
  for (size_t it = 0; it < items.size(); ++it) {
    solution.flow[it].assign(items[it].options.size(), 0);
    solution.over_flow[it].assign(items[it].options.size(), 0);
  }
  if (total == 0) return solution;

  // Nodes: each item, each instance's capacity and beyond-capacity side, one sink.
  using Graph = lemon::SmartDigraph;
  Graph g;
  Graph::ArcMap<int64_t> upper(g), cost(g);
  const auto arc = [&](Graph::Node from, Graph::Node to, int64_t cap, int64_t c) {
    const Graph::Arc a = g.addArc(from, to);
    upper[a] = cap;
    cost[a] = c;
    return a;
  };
  const Graph::Node sink = g.addNode();
  std::vector<Graph::Node> within(n), beyond(n);
  std::vector<Graph::Arc> unbounded(n);
  for (int32_t i = 0; i < n; ++i) {
    within[i] = g.addNode();
    beyond[i] = g.addNode();
    for (const CapacityTier& t : instances[i].tiers) {
      if (t.units > 0) arc(within[i], sink, std::min(t.units, total), t.unit_cost);
    }
    for (const CapacityTier& t : instances[i].over_tiers) {
      if (t.units > 0) arc(beyond[i], sink, std::min(t.units, total), t.unit_cost);
    }
    unbounded[i] = arc(beyond[i], sink, total, overflow_cost);
  }
  Graph::NodeMap<int64_t> supply(g, 0);
  supply[sink] = -total;
  std::vector<absl::InlinedVector<std::pair<Graph::Arc, Graph::Arc>, 4>> option_arcs(items.size());
  for (size_t it = 0; it < items.size(); ++it) {
    if (items[it].amount == 0) continue;
    const Graph::Node node = g.addNode();
    supply[node] = items[it].amount;
    for (const TransportOption& o : items[it].options) {
      option_arcs[it].emplace_back(
          arc(node, within[o.instance], items[it].amount, o.unit_cost),
          arc(node, beyond[o.instance], items[it].amount, o.over_unit_cost));
    }
  }

  lemon::NetworkSimplex<Graph, int64_t, int64_t> solver(g);
  solver.upperMap(upper).costMap(cost).supplyMap(supply);
  const auto result = solver.run();
  // Every unit can always overflow through any of its options, so the problem is feasible and
  // bounded; anything else is a bug here.
  if (result != lemon::NetworkSimplex<Graph, int64_t, int64_t>::OPTIMAL) {
    return absl::InternalError(
        absl::StrFormat("transport problem: the solver returned %d", static_cast<int>(result)));
  }
  for (size_t it = 0; it < items.size(); ++it) {
    for (size_t k = 0; k < option_arcs[it].size(); ++k) {
      solution.over_flow[it][k] = solver.flow(option_arcs[it][k].second);
      solution.flow[it][k] = solver.flow(option_arcs[it][k].first) + solution.over_flow[it][k];
      solution.overflow_units += solution.over_flow[it][k];
    }
  }
  solution.total_cost = solver.totalCost<int64_t>();
  return solution;
}

}  // namespace tokenlake::plan
