// Membership (membership.h): registration, heartbeats, reaping, incarnations, routability and
// readiness, against a naive model driven by random operations (the seed is printed; set
// TOKENLAKE_TEST_SEED to replay one), plus the cases the coordinator relies on by name.
#include "tokenlake/service/membership.h"

#include <cstdlib>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tokenlake/store/cuda/ipc_handle.h"

namespace tokenlake::service {
namespace {

constexpr absl::Duration kDeadAfter = absl::Milliseconds(1000);
const absl::Time kStart = absl::FromUnixSeconds(1'000'000);

v1::InstanceState State(int32_t data_port, const std::string& transport_error = "",
                        const std::string& arena_handle = "") {
  v1::InstanceState s;
  s.set_data_port(data_port);
  s.set_arena_handle(arena_handle);
  s.set_transport_error(transport_error);
  s.set_used_slots(3);
  s.set_capacity_slots(10);
  s.set_slot_bytes(64);
  return s;
}

std::vector<int32_t> PeerIds(const google::protobuf::RepeatedPtrField<v1::Peer>& peers) {
  std::vector<int32_t> out;
  for (const v1::Peer& p : peers) out.push_back(p.instance_id());
  return out;
}

TEST(MembershipTest, AnInstanceIsReadyOnlyOnceEveryRoutablePeerWasSentItsPort) {
  Membership m(3, kDeadAfter);
  ASSERT_EQ(m.Register("a", 0, 5000, kStart)->id, 0);
  ASSERT_EQ(m.Register("b", 1, 5001, kStart)->id, 1);
  EXPECT_FALSE(m.Routable(0));  // no data port yet
  m.Report(0, State(6000));
  EXPECT_TRUE(m.Routable(0));
  EXPECT_FALSE(m.Ready(0));  // a itself has not been sent the peers since
  google::protobuf::RepeatedPtrField<v1::Peer> peers;
  m.AddPeers(0, &peers);
  EXPECT_EQ(PeerIds(peers), std::vector<int32_t>{0});
  EXPECT_TRUE(m.Ready(0));
  m.Report(1, State(6001));
  EXPECT_FALSE(m.Ready(1));  // a has not heard of b's port
  peers.Clear();
  m.AddPeers(1, &peers);
  EXPECT_FALSE(m.Ready(1));
  peers.Clear();
  m.AddPeers(0, &peers);
  EXPECT_EQ(PeerIds(peers), (std::vector<int32_t>{0, 1}));
  EXPECT_TRUE(m.Ready(1));
  EXPECT_EQ(m.ReadyCount(), 2);
  // A broken transport makes it unroutable at once, and healthy again later.
  m.Report(1, State(6001, "cannot accept"));
  EXPECT_FALSE(m.Routable(1));
  EXPECT_EQ(m.ReadyCount(), 1);
}

// The arena handle an instance reports reaches every peer with the peers list, and the instance
// is ready only once they all were sent it (those on its GPU map the arena before it gets
// requests); a new incarnation starts without one.
TEST(MembershipTest, AnArenaHandleReachesEveryPeerBeforeTheInstanceIsReady) {
  Membership m(2, kDeadAfter);
  ASSERT_EQ(m.Register("a", 0, 5000, kStart)->id, 0);
  ASSERT_EQ(m.Register("b", 1, 5001, kStart)->id, 1);
  m.Report(0, State(6000));
  m.Report(1, State(6001));
  google::protobuf::RepeatedPtrField<v1::Peer> peers;
  m.AddPeers(0, &peers);
  m.AddPeers(1, &peers);
  ASSERT_TRUE(m.Ready(1));
  m.Report(1, State(6001, "", "arena-of-b"));
  EXPECT_FALSE(m.Ready(1));
  peers.Clear();
  m.AddPeers(0, &peers);
  ASSERT_EQ(peers.size(), 2);
  EXPECT_EQ(peers[0].arena_handle(), "");
  EXPECT_EQ(peers[1].arena_handle(), "arena-of-b");
  EXPECT_FALSE(m.Ready(1));  // b itself has not been sent the list since
  m.AddPeers(1, &peers);
  EXPECT_TRUE(m.Ready(1));
  // A report without a handle keeps it; one too long is ignored.
  m.Report(1, State(6001));
  m.Report(1, State(6001, "", std::string(Membership::kMaxArenaHandleBytes + 1, 'x')));
  EXPECT_TRUE(m.Ready(1));
  EXPECT_EQ(m.Snapshot()[1].arena_handle, "arena-of-b");
  // A new incarnation of b has no handle until it reports its own.
  ASSERT_EQ(m.Register("b", 1, 5002, kStart)->id, 1);
  m.Report(1, State(6002));
  peers.Clear();
  m.AddPeers(0, &peers);
  ASSERT_EQ(peers.size(), 2);
  EXPECT_EQ(peers[1].arena_handle(), "");
}

// A handle as an instance process on the GPU with UUID byte `gpu` exports it (0: no UUID).
std::string HandleOn(uint8_t gpu, uint32_t pid) {
  store::ArenaHandle h;
  h.ipc_handle.fill(7);
  h.size_bytes = 2 << 20;
  h.origin.pid = pid;
  h.origin.process_token = pid * 31 + 1;
  h.origin.device_uuid.fill(gpu);
  return h.Serialize();
}

// Instances on one GPU (the same UUID in their handles) share a device domain; the others are
// each alone; a cluster without handles has one domain (empty).
TEST(MembershipTest, DeviceDomainsGroupInstancesByTheGpuOfTheirArenas) {
  Membership m(5, kDeadAfter);
  for (int32_t i = 0; i < 5; ++i) {
    ASSERT_EQ(m.Register(absl::StrCat("i", i), i, 5000 + i, kStart)->id, i);
    m.Report(i, State(6000 + i));
  }
  EXPECT_TRUE(m.DeviceDomains().empty());
  m.Report(0, State(6000, "", HandleOn(9, 100)));
  m.Report(1, State(6001, "", HandleOn(4, 101)));
  m.Report(2, State(6002, "", HandleOn(9, 102)));
  m.Report(3, State(6003, "", HandleOn(0, 103)));  // no UUID: alone
  const std::vector<int32_t> d = m.DeviceDomains();
  ASSERT_EQ(d.size(), 5u);
  EXPECT_EQ(d[0], d[2]);
  EXPECT_NE(d[0], d[1]);
  EXPECT_EQ(std::set<int32_t>(d.begin(), d.end()).size(), 4u);  // {0, 2}, {1}, {3}, {4}
  // A new incarnation of 2 has no handle until it reports one: alone meanwhile.
  ASSERT_EQ(m.Register("i2", 2, 5012, kStart)->id, 2);
  EXPECT_NE(m.DeviceDomains()[2], m.DeviceDomains()[0]);
  m.Report(2, State(6012, "", HandleOn(4, 112)));
  EXPECT_EQ(m.DeviceDomains()[2], m.DeviceDomains()[1]);
}

TEST(MembershipTest, SilentInstancesAreReapedAndTheirNameComesBackOnTheSameId) {
  Membership m(2, kDeadAfter);
  ASSERT_EQ(m.Register("a", 1, 5000, kStart)->id, 1);
  ASSERT_TRUE(m.Heartbeat(1, kStart + absl::Milliseconds(500)).ok());
  EXPECT_TRUE(m.Reap(kStart + absl::Milliseconds(1500)).died.empty());
  Membership::Reaped r = m.Reap(kStart + absl::Milliseconds(1501));
  ASSERT_EQ(r.died.size(), 1u);
  EXPECT_EQ(r.died[0].first, 1);
  EXPECT_NE(r.died[0].second.find("declared dead"), std::string::npos);
  EXPECT_EQ(r.not_alive, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(m.Heartbeat(1, kStart + absl::Seconds(2)).code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(m.FindLive("a").has_value());
  absl::StatusOr<Membership::Admission> again = m.Register("a", 0, 5002, kStart + absl::Seconds(3));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->id, 1);
  EXPECT_TRUE(again->rejoin);
  EXPECT_EQ(m.rejoins(), 1);
  EXPECT_EQ(m.deaths(), 1);
  EXPECT_EQ(m.Snapshot()[1].incarnations, 2);
  EXPECT_EQ(m.FindLive("a")->transport_port, 5002);
}

TEST(MembershipTest, AFullClusterRefusesANewName) {
  Membership m(1, kDeadAfter);
  ASSERT_TRUE(m.Register("a", 0, 5000, kStart).ok());
  EXPECT_EQ(m.Register("b", 0, 5001, kStart).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(m.Register("a", 0, 5001, kStart).ok());  // its own name: a new incarnation
}

// The naive model: the rules of membership.h written as directly as possible, with "ready" as
// "every routable instance was sent the peers after this one's data port was set" (event times
// instead of membership versions).
struct ModelMember {
  std::string name;
  bool registered = false;
  bool alive = false;
  int32_t transport_port = 0;
  int32_t data_port = 0;
  std::string arena_handle;
  std::string transport_error;
  absl::Time last_heartbeat;
  int64_t port_set_at = 0;     // event number of the data port's or arena handle's last change
  int64_t peers_sent_at = -1;  // event number of the last AddPeers to it
  int64_t in_flight = 0;
  int64_t routed = 0;
  int64_t incarnations = 0;
};

struct Model {
  explicit Model(int32_t n) : members(static_cast<size_t>(n)) {}
  bool Routable(int32_t i) const {
    if (i < 0 || i >= static_cast<int32_t>(members.size())) return false;
    const ModelMember& m = members[static_cast<size_t>(i)];
    return m.alive && m.data_port > 0 && m.transport_error.empty();
  }
  bool Ready(int32_t i) const {
    if (!Routable(i)) return false;
    for (size_t j = 0; j < members.size(); ++j) {
      if (Routable(static_cast<int32_t>(j)) &&
          members[j].peers_sent_at < members[static_cast<size_t>(i)].port_set_at) {
        return false;
      }
    }
    return true;
  }
  std::vector<ModelMember> members;
  int64_t event = 0;
  int64_t deaths = 0;
  int64_t rejoins = 0;
};

TEST(MembershipTest, RandomOperationsAgreeWithANaiveModel) {
  uint64_t seed = std::random_device{}();
  if (const char* env = std::getenv("TOKENLAKE_TEST_SEED")) seed = std::strtoull(env, nullptr, 10);
  std::cout << "seed " << seed << " (TOKENLAKE_TEST_SEED to replay)\n";
  std::mt19937_64 rng(seed);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const std::vector<std::string> names = {"a", "b", "c", "d", "e", "f"};
  for (int round = 0; round < 20; ++round) {
    const int32_t n = pick(1, 4);
    Membership real(n, kDeadAfter);
    Model model(n);
    absl::Time now = kStart;
    int64_t begun = 0;
    for (int step = 0; step < 400; ++step) {
      SCOPED_TRACE(absl::StrCat("seed ", seed, " round ", round, " step ", step));
      ++model.event;
      const int op = pick(0, 8);
      if (op == 0) {  // register
        const std::string& name = names[static_cast<size_t>(pick(0, 5))];
        const int32_t preferred = pick(-1, n);
        const int32_t port = pick(1, 65535);
        absl::StatusOr<Membership::Admission> got = real.Register(name, preferred, port, now);
        int32_t id = -1;
        for (int32_t i = 0; i < n; ++i) {
          if (model.members[static_cast<size_t>(i)].registered &&
              model.members[static_cast<size_t>(i)].name == name) {
            id = i;
          }
        }
        const bool rejoin = id >= 0;
        if (id < 0 && preferred >= 0 && preferred < n &&
            !model.members[static_cast<size_t>(preferred)].registered) {
          id = preferred;
        }
        for (int32_t i = 0; i < n && id < 0; ++i) {
          if (!model.members[static_cast<size_t>(i)].registered) id = i;
        }
        if (id < 0) {
          EXPECT_EQ(got.status().code(), absl::StatusCode::kResourceExhausted);
        } else {
          ASSERT_TRUE(got.ok()) << got.status();
          EXPECT_EQ(got->id, id);
          EXPECT_EQ(got->rejoin, rejoin);
          ModelMember& m = model.members[static_cast<size_t>(id)];
          model.rejoins += rejoin ? 1 : 0;
          m.name = name;
          m.registered = m.alive = true;
          m.transport_port = port;
          m.data_port = 0;
          m.arena_handle.clear();
          m.last_heartbeat = now;
          ++m.incarnations;
        }
      } else if (op == 1) {  // heartbeat
        const int32_t id = pick(-1, n);
        const bool known = id >= 0 && id < n && model.members[static_cast<size_t>(id)].alive;
        EXPECT_EQ(real.Heartbeat(id, now).ok(), known);
        if (known) model.members[static_cast<size_t>(id)].last_heartbeat = now;
      } else if (op == 2) {  // report
        const int32_t id = pick(0, n - 1);
        const int32_t ports[] = {0, 7000, 7001, 7002, 70000};
        const int32_t port = ports[pick(0, 4)];
        const std::string error = pick(0, 4) == 0 ? "broken" : "";
        const std::string handles[] = {"", "", "gpu0-arena-a", "gpu0-arena-b",
                                       std::string(Membership::kMaxArenaHandleBytes + 1, 'x')};
        const std::string& handle = handles[pick(0, 4)];
        real.Report(id, State(port, error, handle));
        ModelMember& m = model.members[static_cast<size_t>(id)];
        if (m.alive) {
          if (port > 0 && port <= 65535 && port != m.data_port) {
            m.data_port = port;
            m.port_set_at = model.event;
          }
          if (!handle.empty() && handle.size() <= Membership::kMaxArenaHandleBytes &&
              handle != m.arena_handle) {
            m.arena_handle = handle;
            m.port_set_at = model.event;
          }
          m.transport_error = error;
        }
      } else if (op == 3) {  // time passes
        now += absl::Milliseconds(pick(0, 700));
      } else if (op == 4) {  // reap
        Membership::Reaped r = real.Reap(now);
        std::vector<int32_t> died, not_alive;
        for (int32_t i = 0; i < n; ++i) {
          ModelMember& m = model.members[static_cast<size_t>(i)];
          if (m.alive && now - m.last_heartbeat > kDeadAfter) {
            m.alive = false;
            m.data_port = 0;
            m.arena_handle.clear();
            ++model.deaths;
            died.push_back(i);
          }
          if (!m.alive) not_alive.push_back(i);
        }
        std::vector<int32_t> real_died;
        for (const auto& [id, why] : r.died) real_died.push_back(id);
        EXPECT_EQ(real_died, died);
        EXPECT_EQ(r.not_alive, not_alive);
      } else if (op == 5) {  // peers sent
        const int32_t to = pick(0, n - 1);
        google::protobuf::RepeatedPtrField<v1::Peer> peers;
        real.AddPeers(to, &peers);
        std::vector<int32_t> expected;
        for (int32_t i = 0; i < n; ++i) {
          if (model.Routable(i)) expected.push_back(i);
        }
        EXPECT_EQ(PeerIds(peers), expected);
        for (const v1::Peer& p : peers) {
          EXPECT_EQ(p.data_port(), model.members[static_cast<size_t>(p.instance_id())].data_port);
          EXPECT_EQ(p.arena_handle(),
                    model.members[static_cast<size_t>(p.instance_id())].arena_handle);
        }
        model.members[static_cast<size_t>(to)].peers_sent_at = model.event;
      } else if (op == 6) {  // a request sent
        const int32_t id = pick(0, n - 1);
        real.BeginRequest(id);
        ++model.members[static_cast<size_t>(id)].in_flight;
        ++model.members[static_cast<size_t>(id)].routed;
        ++begun;
      } else if (op == 7) {  // a request finished
        const int32_t id = pick(0, n - 1);
        if (model.members[static_cast<size_t>(id)].in_flight > 0) {
          real.EndRequest(id, RequestId(1));  // no routed work recorded: counts only
          --model.members[static_cast<size_t>(id)].in_flight;
        }
      } else {  // ready loads, some excluded
        absl::flat_hash_set<int32_t> excluded;
        for (int32_t i = 0; i < n; ++i) {
          if (pick(0, 3) == 0) excluded.insert(i);
        }
        std::vector<int32_t> expected, got;
        for (int32_t i = 0; i < n; ++i) {
          if (model.Ready(i) && !excluded.contains(i)) expected.push_back(i);
        }
        for (const Membership::Load& l : real.ReadyLoads(excluded)) {
          got.push_back(l.id);
          EXPECT_EQ(l.in_flight, model.members[static_cast<size_t>(l.id)].in_flight);
          EXPECT_EQ(l.routed, model.members[static_cast<size_t>(l.id)].routed);
        }
        EXPECT_EQ(got, expected);
      }
      // After every step: the whole table, the counters and the conservation of requests.
      const std::vector<MemberView> view = real.Snapshot();
      ASSERT_EQ(view.size(), static_cast<size_t>(n));
      int64_t routed = 0, ready = 0;
      for (int32_t i = 0; i < n; ++i) {
        const MemberView& v = view[static_cast<size_t>(i)];
        const ModelMember& m = model.members[static_cast<size_t>(i)];
        EXPECT_EQ(v.registered, m.registered) << "instance " << i;
        EXPECT_EQ(v.alive, m.alive) << "instance " << i;
        EXPECT_EQ(v.data_port, m.data_port) << "instance " << i;
        EXPECT_EQ(v.arena_handle, m.arena_handle) << "instance " << i;
        EXPECT_EQ(v.routable, model.Routable(i)) << "instance " << i;
        EXPECT_EQ(v.ready, model.Ready(i)) << "instance " << i;
        EXPECT_EQ(real.Routable(i), model.Routable(i)) << "instance " << i;
        EXPECT_EQ(real.Ready(i), model.Ready(i)) << "instance " << i;
        EXPECT_EQ(v.in_flight, m.in_flight) << "instance " << i;
        EXPECT_EQ(v.incarnations, m.incarnations) << "instance " << i;
        if (m.registered) {
          EXPECT_EQ(v.name, m.name) << "instance " << i;
        }
        routed += v.routed;
        ready += model.Ready(i) ? 1 : 0;
      }
      EXPECT_EQ(routed, begun);
      EXPECT_EQ(real.ReadyCount(), ready);
      EXPECT_EQ(real.deaths(), model.deaths);
      EXPECT_EQ(real.rejoins(), model.rejoins);
      for (const std::string& name : names) {
        std::optional<LiveIncarnation> live = real.FindLive(name);
        int32_t id = -1;
        for (int32_t i = 0; i < n; ++i) {
          const ModelMember& m = model.members[static_cast<size_t>(i)];
          if (m.registered && m.alive && m.name == name) id = i;
        }
        ASSERT_EQ(live.has_value(), id >= 0) << name;
        if (live.has_value()) {
          EXPECT_EQ(live->id, id);
          EXPECT_EQ(live->transport_port, model.members[static_cast<size_t>(id)].transport_port);
          EXPECT_EQ(live->last_heartbeat, model.members[static_cast<size_t>(id)].last_heartbeat);
        }
      }
      if (HasFatalFailure() || HasFailure()) return;
    }
  }
}

// The load view (Load's requests / context / prefill tokens, MemberView's unreported count and
// in-flight count) under random routing, ends, load reports (newer, stale, listing some of the
// routed requests) and re-registrations, against a naive model: a request routed to an instance
// counts there until a snapshot of it that is not older than the latest taken lists it, it ends,
// or the instance registers again; the latest snapshot's figures count always.
TEST(MembershipTest, LoadViewAgreesWithANaiveModelUnderRandomRoutingAndReports) {
  uint64_t seed = std::random_device{}();
  if (const char* env = std::getenv("TOKENLAKE_TEST_SEED")) seed = std::strtoull(env, nullptr, 10);
  std::cout << "seed " << seed << " (TOKENLAKE_TEST_SEED to replay)\n";
  std::mt19937_64 rng(seed);
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  constexpr int32_t kInstances = 3;
  Membership m(kInstances, kDeadAfter);
  struct Routed {
    int64_t context = 0, prefill = 0;
    bool seen = false;  // listed by an accepted snapshot since it was routed
  };
  struct Model {
    uint64_t snapshot = 0;
    std::set<uint64_t> listed;
    int64_t requests = 0, context = 0, prefill = 0;
    std::map<uint64_t, Routed> routed;  // not ended
    int64_t in_flight = 0;
  };
  std::vector<Model> model(kInstances);
  for (int32_t i = 0; i < kInstances; ++i) {
    ASSERT_TRUE(m.Register(absl::StrCat("i", i), i, 5000 + i, kStart).ok());
  }
  uint64_t next_request = 1;
  for (int step = 0; step < 4000; ++step) {
    const auto id = static_cast<int32_t>(pick(0, kInstances - 1));
    Model& mm = model[static_cast<size_t>(id)];
    const int op = static_cast<int>(pick(0, 9));
    if (op <= 3) {  // route a new request there
      const uint64_t r = next_request++;
      const Membership::RoutedWork w{.context_tokens = pick(1, 500),
                                     .prefill_tokens = pick(1, 500)};
      m.BeginRequest(id);
      m.AddRouted(id, RequestId(r), w);
      ++mm.in_flight;
      mm.routed[r] = Routed{
          .context = w.context_tokens, .prefill = w.prefill_tokens, .seen = mm.listed.contains(r)};
    } else if (op <= 5 && !mm.routed.empty()) {  // one of its requests ends
      auto it = mm.routed.begin();
      std::advance(it, pick(0, static_cast<int64_t>(mm.routed.size()) - 1));
      m.EndRequest(id, RequestId(it->first));
      --mm.in_flight;
      mm.routed.erase(it);
    } else if (op <= 8) {  // a load report: usually newer, sometimes stale
      v1::InstanceState state = State(6000 + id);
      v1::InstanceLoad* load = state.mutable_load();
      const bool stale = mm.snapshot > 0 && pick(0, 4) == 0;
      const uint64_t number = stale ? pick(1, static_cast<int64_t>(mm.snapshot))
                                    : mm.snapshot + static_cast<uint64_t>(pick(1, 3));
      load->set_snapshot(number);
      std::set<uint64_t> listed;
      for (const auto& [r, routed] : mm.routed) {
        if (pick(0, 2) > 0) listed.insert(r);
      }
      if (pick(0, 3) == 0) listed.insert(next_request + 1000);  // one this model never routed
      for (uint64_t r : listed) load->add_request_ids(r);
      load->set_decode_requests(pick(0, 9));
      load->set_decode_context_tokens(pick(0, 5000));
      load->set_prefill_requests(pick(0, 3));
      load->set_prefill_tokens(pick(0, 2000));
      load->set_prefill_context_tokens(pick(0, 3000));
      m.Report(id, state);
      if (!stale || number > mm.snapshot) {
        mm.snapshot = number;
        mm.listed = listed;
        mm.requests = load->decode_requests() + load->prefill_requests();
        mm.context = load->decode_context_tokens() + load->prefill_context_tokens();
        mm.prefill = load->prefill_tokens();
        for (auto& [r, routed] : mm.routed) routed.seen = routed.seen || listed.contains(r);
      }
    } else {  // it registers again (a new process): nothing of its load is known
      ASSERT_TRUE(m.Register(absl::StrCat("i", id), id, 5000 + id, kStart).ok());
      const int64_t in_flight = mm.in_flight;
      const std::map<uint64_t, Routed> routed = mm.routed;
      mm = Model{};
      mm.in_flight = in_flight;  // in flight counts outlive incarnations (their waiters end them)
      for (const auto& [r, unused] : routed) mm.routed[r] = Routed{.seen = true};
    }
    const std::vector<MemberView> view = m.Snapshot();
    for (int32_t i = 0; i < kInstances; ++i) {
      const Model& e = model[static_cast<size_t>(i)];
      int64_t requests = e.requests, context = e.context, prefill = e.prefill, unreported = 0;
      for (const auto& [r, routed] : e.routed) {
        if (routed.seen) continue;
        ++requests;
        ++unreported;
        context += routed.context;
        prefill += routed.prefill;
      }
      const MemberView& v = view[static_cast<size_t>(i)];
      ASSERT_EQ(v.load_requests, requests) << "step " << step << " instance " << i;
      ASSERT_EQ(v.load_context_tokens, context) << "step " << step << " instance " << i;
      ASSERT_EQ(v.load_prefill_tokens, prefill) << "step " << step << " instance " << i;
      ASSERT_EQ(v.unreported_routed, unreported) << "step " << step << " instance " << i;
      ASSERT_EQ(v.in_flight, e.in_flight) << "step " << step << " instance " << i;
    }
  }
}

}  // namespace
}  // namespace tokenlake::service
