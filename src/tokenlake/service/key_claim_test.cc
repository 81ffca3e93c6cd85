#include "tokenlake/service/key_claim.h"

#include <atomic>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/service/etcd_testing.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;

class KeyClaimTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<EtcdTestServer>> server = EtcdTestServer::Start();
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    client_ = *EtcdClient::Create({.endpoint = server_->endpoint()});
  }

  std::unique_ptr<KeyClaim> Claim(const std::string& value, KeyClaim::OnChange on_change = {}) {
    absl::StatusOr<std::unique_ptr<KeyClaim>> claim =
        KeyClaim::Start(client_.get(),
                        {.key = "/cluster/leader",
                         .value = value,
                         .ttl = absl::Seconds(1),
                         .retry = absl::Milliseconds(50),
                         .margin = absl::Milliseconds(300)},
                        std::move(on_change));
    EXPECT_TRUE(claim.ok()) << claim.status();
    return claim.ok() ? *std::move(claim) : nullptr;
  }

  int HeldCount(const std::vector<std::unique_ptr<KeyClaim>>& claims) {
    int held = 0;
    for (const auto& c : claims) held += c != nullptr && c->Held() ? 1 : 0;
    return held;
  }

  std::unique_ptr<EtcdTestServer> server_;
  std::unique_ptr<EtcdClient> client_;
};

TEST_F(KeyClaimTest, RefusesBadOptions) {
  EXPECT_EQ(KeyClaim::Start(client_.get(), {.key = ""}).status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<std::unique_ptr<KeyClaim>> short_ttl =
      KeyClaim::Start(client_.get(), {.key = "/k", .ttl = absl::Milliseconds(500)});
  EXPECT_THAT(std::string(short_ttl.status().message()), HasSubstr("1 s minimum"));
  EXPECT_EQ(
      KeyClaim::Start(client_.get(), {.key = "/k", .margin = absl::Seconds(3)}).status().code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KeyClaim::Start(nullptr, {.key = "/k"}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Three candidates; the holder is then released, killed (its claim paused: cut off from etcd)
// or kept. At every sample at most one holds the key, and after each loss another takes over
// within the TTL plus a few retries.
TEST_F(KeyClaimTest, AtMostOneHolderAndTakeoverAfterReleaseOrLostLease) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::printf("KeyClaimTest seed %u\n", seed);
  std::mt19937 rng(seed);
  std::atomic<int> changes{0};
  std::vector<std::unique_ptr<KeyClaim>> claims;
  for (int i = 0; i < 3; ++i) {
    claims.push_back(Claim(absl::StrCat("coordinator-", i), [&](bool) { ++changes; }));
  }
  std::atomic<bool> stop{false};
  std::atomic<int> max_held{0};
  std::thread sampler([&] {
    while (!stop.load()) {
      max_held.store(std::max(max_held.load(), HeldCount(claims)));
      absl::SleepFor(absl::Milliseconds(2));
    }
  });
  for (int round = 0; round < 3; ++round) {
    const absl::Time deadline = absl::Now() + absl::Seconds(5);
    int holder = -1;
    while (holder < 0) {
      for (int i = 0; i < static_cast<int>(claims.size()); ++i) {
        if (claims[i] != nullptr && claims[i]->Held()) holder = i;
      }
      ASSERT_LT(absl::Now(), deadline) << "no holder in round " << round;
      absl::SleepFor(absl::Milliseconds(5));
    }
    // Every candidate learns who holds it.
    for (const auto& c : claims) {
      if (c == nullptr) continue;
      const absl::Time learn = absl::Now() + absl::Seconds(2);
      while (c->HolderValue() != absl::StrCat("coordinator-", holder) && absl::Now() < learn) {
        absl::SleepFor(absl::Milliseconds(10));
      }
      EXPECT_EQ(c->HolderValue(), absl::StrCat("coordinator-", holder));
    }
    if (rng() % 2 == 0) {
      claims[holder]->Release();  // graceful: the key goes at once
      EXPECT_FALSE(claims[holder]->Held());
    } else {
      claims[holder]->SetPausedForTesting(true);  // cut off: its lease runs out
      const absl::Time lost = absl::Now() + absl::Seconds(2);
      while (claims[holder]->Held()) {
        ASSERT_LT(absl::Now(), lost) << "a cut-off holder kept calling itself the holder";
        absl::SleepFor(absl::Milliseconds(5));
      }
    }
    claims[holder].reset();
  }
  stop.store(true);
  sampler.join();
  EXPECT_EQ(max_held.load(), 1);
  EXPECT_GE(changes.load(), 5);  // three gains and at least two losses
}

TEST_F(KeyClaimTest, ASecondClaimOfALiveKeyWaitsUntilTheFirstsLeaseIsGone) {
  std::unique_ptr<KeyClaim> first = Claim("first");
  ASSERT_TRUE(first->WaitHeld(absl::Seconds(5)).ok());
  std::unique_ptr<KeyClaim> second = Claim("second");
  absl::Status waited = second->WaitHeld(absl::Milliseconds(1500));
  EXPECT_EQ(waited.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(waited.message()), HasSubstr("'first'"));
  // The first process dies without releasing (no revoke): the name frees only when its lease
  // expires.
  first->SetPausedForTesting(true);
  const absl::Time died = absl::Now();
  ASSERT_TRUE(second->WaitHeld(absl::Seconds(10)).ok());
  EXPECT_GE(absl::Now() - died, absl::Milliseconds(500));
  EXPECT_FALSE(first->Held());
}

TEST_F(KeyClaimTest, AHolderWhoseEtcdIsDownStopsHoldingBeforeTheLeaseCouldEnd) {
  std::unique_ptr<KeyClaim> claim = Claim("only");
  ASSERT_TRUE(claim->WaitHeld(absl::Seconds(5)).ok());
  // etcd grants at least its minimum TTL (1.5 election timeouts), which may exceed the 1 s asked.
  absl::StatusOr<EtcdLease> probe = client_->GrantLease(absl::Seconds(1));
  ASSERT_TRUE(probe.ok()) << probe.status();
  server_->Kill();
  const absl::Time killed = absl::Now();
  while (claim->Held()) {
    ASSERT_LT(absl::Now() - killed, probe->ttl) << "held past its lease with etcd gone";
    absl::SleepFor(absl::Milliseconds(5));
  }
  // etcd back (same data): the lease has expired there; the claim gets the key again.
  ASSERT_TRUE(server_->Restart().ok());
  EXPECT_TRUE(claim->WaitHeld(absl::Seconds(10)).ok());
}

}  // namespace
}  // namespace tokenlake::service
