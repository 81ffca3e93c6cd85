#include "tokenlake/service/etcd_client.h"

#include <atomic>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/service/etcd_testing.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;

class EtcdClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<EtcdTestServer>> server = EtcdTestServer::Start();
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    absl::StatusOr<std::unique_ptr<EtcdClient>> client =
        EtcdClient::Create({.endpoint = server_->endpoint()});
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
  }

  std::unique_ptr<EtcdTestServer> server_;
  std::unique_ptr<EtcdClient> client_;
};

TEST(EtcdClientCreateTest, RefusesMalformedEndpointsNamingThem) {
  for (const char* bad : {"", "localhost", "http://host:0", "http://host:70000", "host:port",
                          "https://host:2379", "http://[::1]2379"}) {
    absl::StatusOr<std::unique_ptr<EtcdClient>> c = EtcdClient::Create({.endpoint = bad});
    ASSERT_FALSE(c.ok()) << bad;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(bad)) << bad;
  }
  absl::StatusOr<std::unique_ptr<EtcdClient>> v6 = EtcdClient::Create({.endpoint = "[::1]:2379"});
  ASSERT_TRUE(v6.ok()) << v6.status();
  EXPECT_EQ((*v6)->endpoint(), "http://[::1]:2379");
}

TEST(EtcdClientCreateTest, UnreachableEtcdIsUnavailableNamingTheEndpoint) {
  // Port 1 on loopback: nothing listens there (connection refused at once).
  absl::StatusOr<std::unique_ptr<EtcdClient>> c =
      EtcdClient::Create({.endpoint = "127.0.0.1:1", .timeout = absl::Milliseconds(500)});
  ASSERT_TRUE(c.ok());
  absl::StatusOr<int64_t> put = (*c)->Put("k", "v");
  ASSERT_FALSE(put.ok());
  EXPECT_EQ(put.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(put.status().message()), HasSubstr("127.0.0.1:1"));
}

TEST(EtcdPrefixEndTest, IncrementsTheLastByteBelow0xff) {
  EXPECT_EQ(EtcdPrefixEnd("abc"), "abd");
  EXPECT_EQ(EtcdPrefixEnd(std::string("a\xff", 2)), "b");
  EXPECT_EQ(EtcdPrefixEnd(std::string("\xff\xff", 2)), std::string(1, '\0'));
}

// Random puts, deletes, conditional creates and prefix reads against a std::map, with binary
// keys and values (base64 in the gateway's JSON must round-trip every byte).
TEST_F(EtcdClientTest, RandomOperationsMatchANaiveMap) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::printf("EtcdClientTest seed %u\n", seed);
  std::mt19937 rng(seed);
  std::map<std::string, std::string> model;
  auto random_key = [&] {
    std::string key = "/t/";
    key += static_cast<char>('a' + rng() % 3);
    key += static_cast<char>(rng() % 4 == 0 ? '\xff' : 'a' + rng() % 3);
    return key;
  };
  auto random_value = [&] {
    std::string v(rng() % 6, '\0');
    for (char& c : v) c = static_cast<char>(rng() % 256);
    return v;
  };
  for (int step = 0; step < 300; ++step) {
    const std::string key = random_key();
    switch (rng() % 6) {
      case 0:
      case 1: {
        const std::string value = random_value();
        ASSERT_TRUE(client_->Put(key, value).ok());
        model[key] = value;
        break;
      }
      case 2: {
        absl::StatusOr<int64_t> n = client_->Delete(key);
        ASSERT_TRUE(n.ok()) << n.status();
        EXPECT_EQ(*n, model.erase(key)) << key;
        break;
      }
      case 3: {
        const std::string value = random_value();
        EtcdKeyValue current;
        absl::StatusOr<bool> created = client_->PutIfAbsent(key, value, 0, &current);
        ASSERT_TRUE(created.ok()) << created.status();
        EXPECT_EQ(*created, !model.contains(key)) << key;
        if (*created) {
          model[key] = value;
        } else {
          EXPECT_EQ(current.value, model[key]);
        }
        EXPECT_EQ(current.key, key);
        break;
      }
      case 4: {
        absl::StatusOr<std::optional<EtcdKeyValue>> kv = client_->Get(key);
        ASSERT_TRUE(kv.ok()) << kv.status();
        ASSERT_EQ(kv->has_value(), model.contains(key)) << key;
        if (kv->has_value()) {
          EXPECT_EQ((*kv)->value, model[key]);
        }
        break;
      }
      case 5: {
        const std::string prefix = key.substr(0, 4);
        absl::StatusOr<EtcdClient::Range> range = client_->GetPrefix(prefix);
        ASSERT_TRUE(range.ok()) << range.status();
        std::vector<std::pair<std::string, std::string>> want, got;
        for (const auto& [k, v] : model) {
          if (k.starts_with(prefix)) want.emplace_back(k, v);
        }
        for (const EtcdKeyValue& kv : range->kvs) got.emplace_back(kv.key, kv.value);
        EXPECT_EQ(got, want) << prefix;
        break;
      }
    }
  }
  absl::StatusOr<int64_t> n = client_->DeletePrefix("/t/");
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, static_cast<int64_t>(model.size()));
}

TEST_F(EtcdClientTest, DeleteIfCreatedAtDeletesOnlyThatIncarnation) {
  EtcdKeyValue first;
  ASSERT_TRUE(*client_->PutIfAbsent("/k", "one", 0, &first));
  ASSERT_GT(first.create_revision, 0);
  ASSERT_TRUE(client_->Delete("/k").ok());
  EtcdKeyValue second;
  ASSERT_TRUE(*client_->PutIfAbsent("/k", "two", 0, &second));
  EXPECT_FALSE(*client_->DeleteIfCreatedAt("/k", first.create_revision));
  EXPECT_TRUE(client_->Get("/k")->has_value());
  EXPECT_TRUE(*client_->DeleteIfCreatedAt("/k", second.create_revision));
  EXPECT_FALSE(client_->Get("/k")->has_value());
}

TEST_F(EtcdClientTest, RevokingALeaseDeletesItsKeysAndRenewalsThenFailWithNotFound) {
  absl::StatusOr<EtcdLease> lease = client_->GrantLease(absl::Seconds(10));
  ASSERT_TRUE(lease.ok()) << lease.status();
  EXPECT_EQ(lease->ttl, absl::Seconds(10));
  ASSERT_TRUE(client_->Put("/leased/a", "x", lease->id).ok());
  EXPECT_EQ((*client_->Get("/leased/a"))->lease, lease->id);
  absl::StatusOr<absl::Duration> renewed = client_->KeepAliveOnce(lease->id);
  ASSERT_TRUE(renewed.ok()) << renewed.status();
  EXPECT_EQ(*renewed, absl::Seconds(10));
  ASSERT_TRUE(client_->RevokeLease(lease->id).ok());
  EXPECT_FALSE(client_->Get("/leased/a")->has_value());
  EXPECT_EQ(client_->KeepAliveOnce(lease->id).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(client_->RevokeLease(lease->id).ok());  // unknown lease: nothing to do
  // A put under a lease etcd does not know is refused.
  EXPECT_EQ(client_->Put("/leased/b", "x", lease->id).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(EtcdClientTest, AnUnrenewedLeaseExpiresWithItsKeys) {
  absl::StatusOr<EtcdLease> lease = client_->GrantLease(absl::Seconds(1));
  ASSERT_TRUE(lease.ok());
  ASSERT_TRUE(client_->Put("/leased/c", "x", lease->id).ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (client_->Get("/leased/c")->has_value()) {
    ASSERT_LT(absl::Now(), deadline) << "the key outlived its 1 s lease by 10 s";
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_EQ(client_->KeepAliveOnce(lease->id).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(EtcdClientTest, WatchDeliversEveryChangeInOrderFromARevision) {
  absl::StatusOr<EtcdClient::Range> start = client_->GetPrefix("/w/");
  ASSERT_TRUE(start.ok());
  std::atomic<bool> stop{false};
  std::vector<EtcdEvent> seen;
  absl::Mutex mu;
  absl::Status watch_status;
  std::thread watcher([&] {
    watch_status = client_->Watch(
        "/w/", start->revision + 1,
        [&](const std::vector<EtcdEvent>& events) {
          absl::MutexLock lock(&mu);
          seen.insert(seen.end(), events.begin(), events.end());
          return true;
        },
        stop, absl::Milliseconds(20));
  });
  // Changes made before the watch connects are delivered too (it starts at a revision).
  ASSERT_TRUE(client_->Put("/w/a", "1").ok());
  ASSERT_TRUE(client_->Put("/x/outside", "1").ok());
  ASSERT_TRUE(client_->Put("/w/b", "2").ok());
  ASSERT_TRUE(client_->Delete("/w/a").ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (true) {
    {
      absl::MutexLock lock(&mu);
      if (seen.size() >= 3) break;
    }
    ASSERT_LT(absl::Now(), deadline);
    absl::SleepFor(absl::Milliseconds(10));
  }
  stop.store(true);
  watcher.join();
  EXPECT_TRUE(watch_status.ok()) << watch_status;
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[0].type, EtcdEvent::Type::kPut);
  EXPECT_EQ(seen[0].kv.key, "/w/a");
  EXPECT_EQ(seen[0].kv.value, "1");
  EXPECT_EQ(seen[1].kv.key, "/w/b");
  EXPECT_EQ(seen[2].type, EtcdEvent::Type::kDelete);
  EXPECT_EQ(seen[2].kv.key, "/w/a");
  EXPECT_LT(seen[0].kv.mod_revision, seen[1].kv.mod_revision);
  EXPECT_LT(seen[1].kv.mod_revision, seen[2].kv.mod_revision);
}

TEST_F(EtcdClientTest, AWatchWhoseServerDiesEndsUnavailable) {
  std::atomic<bool> stop{false};
  absl::Status status;
  std::thread watcher([&] {
    status = client_->Watch(
        "/w/", 0, [](const std::vector<EtcdEvent>&) { return true; }, stop);
  });
  absl::SleepFor(absl::Milliseconds(300));
  server_->Kill();
  watcher.join();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
}

}  // namespace
}  // namespace tokenlake::service
