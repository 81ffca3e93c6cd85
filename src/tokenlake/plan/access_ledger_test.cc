#include "tokenlake/plan/access_ledger.h"

#include <map>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/base/random_testing.h"

namespace tokenlake::plan {
namespace {

using Shares = AccessLedger::Shares;

TEST(AccessLedgerTest, SharesOfCountsPulledKvOnTheComputingInstance) {
  RequestPlan rp;
  rp.request = RequestId(7);
  rp.compute_instance = InstanceId(1);
  rp.holders = {HolderPlan{InstanceId(1), HolderAction::kLocal, 2, 1024, 0, 0},
                HolderPlan{InstanceId(2), HolderAction::kMoveQueries, 1, 512, 0, 0},
                HolderPlan{InstanceId(3), HolderAction::kPullKv, 1, 300, 0, 0}};
  const Shares shares = AccessLedger::SharesOf(rp);
  ASSERT_EQ(shares.size(), 2u);
  EXPECT_EQ(shares[0], std::make_pair(InstanceId(1), int64_t{1324}));
  EXPECT_EQ(shares[1], std::make_pair(InstanceId(2), int64_t{512}));
}

TEST(AccessLedgerTest, ANewPlanReplacesTheRequestsOldOne) {
  AccessLedger ledger(3);
  ASSERT_TRUE(ledger.Set(RequestId(1), Shares{{InstanceId(0), 100}, {InstanceId(2), 50}}).ok());
  ASSERT_TRUE(ledger.Set(RequestId(2), Shares{{InstanceId(0), 10}}).ok());
  EXPECT_EQ(ledger.tokens(InstanceId(0)), 110);
  ASSERT_TRUE(ledger.Set(RequestId(1), Shares{{InstanceId(1), 70}}).ok());
  EXPECT_EQ(ledger.tokens(InstanceId(0)), 10);
  EXPECT_EQ(ledger.tokens(InstanceId(1)), 70);
  EXPECT_EQ(ledger.tokens(InstanceId(2)), 0);
  ledger.Erase(RequestId(1));
  EXPECT_EQ(ledger.tokens(InstanceId(1)), 0);
  EXPECT_EQ(ledger.num_requests(), 1);
  EXPECT_TRUE(ledger.CheckIntegrity().ok());
}

TEST(AccessLedgerTest, RefusesInstancesOutsideThePoolAndNegativeTokens) {
  AccessLedger ledger(2);
  ASSERT_TRUE(ledger.Set(RequestId(1), Shares{{InstanceId(0), 5}}).ok());
  EXPECT_EQ(ledger.Set(RequestId(1), Shares{{InstanceId(2), 5}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ledger.Set(RequestId(1), Shares{{InstanceId(1), -1}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ledger.tokens(InstanceId(0)), 5);  // unchanged
  EXPECT_TRUE(ledger.CheckIntegrity().ok());
}

// Random Set / Erase / EraseUnless / DropInstance against a map of the entries, with the sums
// recomputed from the model after every step.
TEST(AccessLedgerTest, MatchesANaiveModelUnderRandomOperations) {
  const uint64_t seed = TestSeed(5301);
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  for (int round = 0; round < 20; ++round) {
    const int n = 1 + static_cast<int>(rng() % 6);
    AccessLedger ledger(n);
    std::map<uint64_t, std::map<int, int64_t>> model;  // request -> instance -> tokens
    for (int step = 0; step < 400; ++step) {
      const uint64_t request = 1 + rng() % 12;
      switch (rng() % 6) {
        case 0:
        case 1:
        case 2: {
          Shares shares;
          std::map<int, int64_t> entry;
          const int k = static_cast<int>(rng() % 5);
          for (int j = 0; j < k; ++j) {
            const int instance = static_cast<int>(rng() % n);
            const int64_t tokens = static_cast<int64_t>(rng() % 3) * 256;  // zero sometimes
            shares.emplace_back(InstanceId(instance), tokens);
            if (tokens > 0) entry[instance] += tokens;
          }
          ASSERT_TRUE(ledger.Set(RequestId(request), shares).ok());
          if (entry.empty()) {
            model.erase(request);
          } else {
            model[request] = entry;
          }
          break;
        }
        case 3:
          ledger.Erase(RequestId(request));
          model.erase(request);
          break;
        case 4: {
          const uint64_t parity = rng() % 2;
          ledger.EraseUnless([&](RequestId r) { return r.value() % 2 == parity; });
          std::erase_if(model, [&](const auto& e) { return e.first % 2 != parity; });
          break;
        }
        case 5: {
          const int instance = static_cast<int>(rng() % n);
          ledger.DropInstance(InstanceId(instance));
          for (auto& [r, entry] : model) entry.erase(instance);
          std::erase_if(model, [](const auto& e) { return e.second.empty(); });
          break;
        }
      }
      ASSERT_TRUE(ledger.CheckIntegrity().ok()) << ledger.CheckIntegrity();
      ASSERT_EQ(ledger.num_requests(), static_cast<int64_t>(model.size())) << "step " << step;
      std::vector<int64_t> sums(n, 0);
      for (const auto& [r, entry] : model) {
        for (const auto& [instance, tokens] : entry) {
          sums[instance] += tokens;
          ASSERT_EQ(ledger.Share(RequestId(r), InstanceId(instance)), tokens);
        }
      }
      for (int i = 0; i < n; ++i) {
        ASSERT_EQ(ledger.tokens(InstanceId(i)), sums[i]) << "step " << step;
      }
    }
  }
}

}  // namespace
}  // namespace tokenlake::plan
