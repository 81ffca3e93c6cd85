#include "tokenlake/plan/transport_problem.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokenlake::plan {
namespace {

using Flow = std::vector<absl::InlinedVector<int64_t, 4>>;
constexpr int64_t kInfeasible = std::numeric_limits<int64_t>::max();

// One free tier of capacities[i] units per instance, nothing between it and the overflow.
std::vector<InstanceCapacity> Caps(std::vector<int64_t> capacities) {
  std::vector<InstanceCapacity> c(capacities.size());
  for (size_t i = 0; i < capacities.size(); ++i) c[i].tiers = {CapacityTier{capacities[i], 0}};
  return c;
}

// Fills `load` units into `tiers` cheapest first; returns the cost and leaves the rest in load.
int64_t Fill(std::vector<CapacityTier> tiers, int64_t* load) {
  std::sort(tiers.begin(), tiers.end(),
            [](const CapacityTier& a, const CapacityTier& b) { return a.unit_cost < b.unit_cost; });
  int64_t cost = 0;
  for (const CapacityTier& t : tiers) {
    const int64_t take = std::min(*load, t.units);
    cost += take * t.unit_cost;
    *load -= take;
  }
  return cost;
}

// The objective of an allocation given per option as units within the capacity and beyond it;
// kInfeasible when an instance's units within exceed its tiers.
int64_t Objective(const std::vector<TransportItem>& items,
                  const std::vector<InstanceCapacity>& inst, int64_t overflow_cost, const Flow& in,
                  const Flow& over) {
  std::vector<int64_t> load_in(inst.size(), 0), load_over(inst.size(), 0);
  int64_t cost = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    for (size_t k = 0; k < items[i].options.size(); ++k) {
      const TransportOption& o = items[i].options[k];
      cost += in[i][k] * o.unit_cost + over[i][k] * o.over_unit_cost;
      load_in[o.instance] += in[i][k];
      load_over[o.instance] += over[i][k];
    }
  }
  for (size_t j = 0; j < inst.size(); ++j) {
    cost += Fill(inst[j].tiers, &load_in[j]);
    if (load_in[j] > 0) return kInfeasible;
    cost += Fill(inst[j].over_tiers, &load_over[j]);
    cost += load_over[j] * overflow_cost;
  }
  return cost;
}

// The naive model: every split of every item's units over its options' two sides.
int64_t BruteForce(const std::vector<TransportItem>& items,
                   const std::vector<InstanceCapacity>& inst, int64_t overflow_cost) {
  Flow in(items.size()), over(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    in[i].assign(items[i].options.size(), 0);
    over[i].assign(items[i].options.size(), 0);
  }
  int64_t best = kInfeasible;
  // Slot s of item i: option s / 2, within (even) or beyond (odd) the capacity.
  std::function<void(size_t, size_t, int64_t)> go = [&](size_t i, size_t s, int64_t left) {
    if (i == items.size()) {
      best = std::min(best, Objective(items, inst, overflow_cost, in, over));
      return;
    }
    const size_t slots = 2 * items[i].options.size();
    const auto next = [&] { go(i + 1, 0, i + 1 < items.size() ? items[i + 1].amount : 0); };
    if (slots == 0) return next();
    int64_t& cell = s % 2 == 0 ? in[i][s / 2] : over[i][s / 2];
    if (s + 1 == slots) {
      cell = left;
      next();
      cell = 0;
      return;
    }
    for (int64_t u = 0; u <= left; ++u) {
      cell = u;
      go(i, s + 1, left - u);
    }
    cell = 0;
  };
  go(0, 0, items.empty() ? 0 : items[0].amount);
  return best;
}

TEST(TransportProblemTest, MatchesExhaustiveSearchOnRandomProblems) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::printf("TransportProblemTest seed %u\n", seed);
  std::mt19937 rng(seed);
  const auto uniform = [&](int lo, int hi) {
    return std::uniform_int_distribution<int>(lo, hi)(rng);
  };
  const auto random_tiers = [&] {
    std::vector<CapacityTier> tiers(uniform(0, 2));
    for (auto& t : tiers) t = {uniform(0, 3), uniform(0, 9)};
    return tiers;
  };
  for (int trial = 0; trial < 300; ++trial) {
    const int n = uniform(1, 3);
    std::vector<InstanceCapacity> inst(n);
    for (auto& c : inst) {
      c.tiers = random_tiers();
      c.over_tiers = random_tiers();
    }
    const int64_t overflow = uniform(10, 30);
    std::vector<TransportItem> items(uniform(0, 3));
    for (auto& item : items) {
      item.amount = uniform(0, 2);
      std::vector<int> order(n);
      for (int j = 0; j < n; ++j) order[j] = j;
      std::shuffle(order.begin(), order.end(), rng);
      const int k = uniform(1, n);
      for (int j = 0; j < k; ++j) item.options.push_back({order[j], uniform(0, 9), uniform(0, 9)});
    }
    SCOPED_TRACE(testing::Message() << "trial " << trial);
    auto sol = SolveTransportProblem(items, inst, overflow);
    ASSERT_TRUE(sol.ok()) << sol.status();
    ASSERT_EQ(sol->flow.size(), items.size());
    Flow in(items.size());
    int64_t overflow_units = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      int64_t placed = 0;
      for (size_t k = 0; k < items[i].options.size(); ++k) {
        EXPECT_GE(sol->over_flow[i][k], 0);
        EXPECT_GE(sol->flow[i][k], sol->over_flow[i][k]);
        in[i].push_back(sol->flow[i][k] - sol->over_flow[i][k]);
        placed += sol->flow[i][k];
        overflow_units += sol->over_flow[i][k];
      }
      EXPECT_EQ(placed, items[i].amount);
    }
    EXPECT_EQ(sol->overflow_units, overflow_units);
    EXPECT_EQ(sol->total_cost, Objective(items, inst, overflow, in, sol->over_flow));
    EXPECT_EQ(sol->total_cost, BruteForce(items, inst, overflow));
  }
}

TEST(TransportProblemTest, ExceedsACapacityOnlyWhenNothingElseFits) {
  // Item 0 can go to instance 0 or 1, item 1 only to 0 (capacity 2 each). The cheap option of
  // item 0 is instance 0, but taking it would push item 1 over: the matching gives item 0
  // instance 1, where greedy in item order would overflow.
  std::vector<TransportItem> items(2);
  items[0].amount = 2;
  items[0].options = {{0, 0, 0}, {1, 5, 5}};
  items[1].amount = 2;
  items[1].options = {{0, 0, 0}};
  auto sol = SolveTransportProblem(items, Caps({2, 2}), 100);
  ASSERT_TRUE(sol.ok()) << sol.status();
  EXPECT_EQ(sol->flow[0][0], 0);
  EXPECT_EQ(sol->flow[0][1], 2);
  EXPECT_EQ(sol->flow[1][0], 2);
  EXPECT_EQ(sol->overflow_units, 0);
  EXPECT_EQ(sol->total_cost, 10);

  // Nothing fits: the units overflow where they must.
  sol = SolveTransportProblem(items, Caps({0, 0}), 100);
  ASSERT_TRUE(sol.ok()) << sol.status();
  EXPECT_EQ(sol->overflow_units, 4);
}

TEST(TransportProblemTest, WorkBeyondTheCapacitiesSpreadsByTheOverTiers) {
  // One item of 8 units, free on neither instance; option 0 is cheaper within a capacity but
  // the same beyond it; over tiers of 2 units at rising costs: the 8 units split 4 / 4.
  std::vector<TransportItem> items(1);
  items[0].amount = 8;
  items[0].options = {{0, 0, 0}, {1, 50, 0}};
  std::vector<InstanceCapacity> inst(2);
  for (auto& c : inst) c.over_tiers = {{2, 1}, {2, 2}, {2, 3}, {2, 4}};
  auto sol = SolveTransportProblem(items, inst, 100);
  ASSERT_TRUE(sol.ok()) << sol.status();
  EXPECT_EQ(sol->flow[0][0], 4);
  EXPECT_EQ(sol->flow[0][1], 4);
  EXPECT_EQ(sol->overflow_units, 8);
}

TEST(TransportProblemTest, RefusesBadInputNamingIt) {
  std::vector<TransportItem> items(1);
  items[0].amount = 1;
  EXPECT_THAT(SolveTransportProblem(items, Caps({1}), 10).status().message(),
              testing::HasSubstr("item 0 has 1 units and no option"));
  items[0].options = {{2, 0, 0}};
  EXPECT_THAT(SolveTransportProblem(items, Caps({1}), 10).status().message(),
              testing::HasSubstr("names instance 2"));
  items[0].options = {{0, 0, 0}, {0, 1, 1}};
  EXPECT_THAT(SolveTransportProblem(items, Caps({1}), 10).status().message(),
              testing::HasSubstr("instance 0 twice"));
  items[0].options = {{0, -1, 0}};
  EXPECT_THAT(SolveTransportProblem(items, Caps({1}), 10).status().message(),
              testing::HasSubstr("must be >= 0"));
  items[0].options = {{0, 1, 1}};
  EXPECT_THAT(SolveTransportProblem(items, Caps({-1}), 10).status().message(),
              testing::HasSubstr("instance 0 tier 0 has -1 units"));
  std::vector<InstanceCapacity> dear(1);
  dear[0].over_tiers = {{1, 0}, {1, 10}};
  EXPECT_THAT(SolveTransportProblem(items, dear, 10).status().message(),
              testing::HasSubstr("instance 0 over tier 1 has 1 units at 10"));
  items[0].amount = -1;
  EXPECT_THAT(SolveTransportProblem(items, Caps({1}), 10).status().message(),
              testing::HasSubstr("amount -1"));
  items[0].amount = int64_t{1} << 40;
  EXPECT_THAT(SolveTransportProblem(items, Caps({1}), int64_t{1} << 30).status().message(),
              testing::HasSubstr("could overflow int64"));
}

}  // namespace
}  // namespace tokenlake::plan
