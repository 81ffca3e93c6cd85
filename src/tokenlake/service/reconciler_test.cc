// Reconciliation of instance reports with the lake (reconciler.h), on a real lake: restore at
// registration, orphans retried inside the restore window and freed after it, unlisted copies
// freed, missing replicas dropped after kMissesToDrop heartbeats, unconfirmed rebalance copies
// read from their source until the receiver reports them; reports of changes applied in order,
// duplicates and late ones harmless, gaps answered with a request for a full report; and a
// randomised run against the instance's truth with reports lost, duplicated and reordered.
#include "tokenlake/service/reconciler.h"

#include <algorithm>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <vector>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/base/random.h"
#include "tokenlake/base/random_testing.h"
#include "tokenlake/service/guarded_lake.h"
#include "tokenlake/service/holdings_report.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;

const absl::Time kStart = absl::FromUnixSeconds(1'000'000);

// A lake of `n` instances under its lock, with `reconciler` as its replica observer.
std::unique_ptr<GuardedLake> MakeLake(int32_t n, int32_t slots) {
  auto g = std::make_unique<GuardedLake>();
  lake::LakeOptions o;
  o.num_instances = n;
  o.segment_tokens = 4;
  o.slots_per_instance = slots;
  o.model = {.num_layers = 1, .num_heads = 1, .num_kv_heads = 1, .head_dim = 1, .dtype_bytes = 4};
  o.heavy_hitter.num_instances = n;
  auto lk = lake::Lake::Create(o, &g->clock);
  EXPECT_TRUE(lk.ok()) << lk.status();
  absl::MutexLock lock(&g->mu);
  g->lake = std::move(*lk);
  return g;
}

void Wire(GuardedLake& g, Reconciler& r) {
  absl::MutexLock lock(&g.mu);
  g.lake->SetReplicaObserver(
      [&r](SegmentId s, InstanceId i, bool added) { r.OnLakeChange(s, i, added); });
}

class ReconcilerTest : public ::testing::Test {
 protected:
  void SetUp() override { lake_ = MakeLake(2, 64); }
  std::unique_ptr<Reconciler> Make(absl::Time started) {
    auto r = std::make_unique<Reconciler>(lake_.get(),
                                          Reconciler::Options{.num_instances = 2,
                                                              .started = started,
                                                              .restore_window = absl::Seconds(5),
                                                              .batch = 2});
    Wire(*lake_, *r);
    return r;
  }
  // A full report of the chain `ids` (each the parent of the next), 4 tokens each, as an
  // instance that reports only full lists sends it.
  static v1::InstanceState Report(const std::vector<uint64_t>& ids) {
    v1::InstanceState s;
    uint64_t parent = SegmentId().value();
    for (uint64_t id : ids) {
      v1::Segment* seg = s.add_segments();
      seg->set_id(id);
      seg->set_parent(parent);
      seg->set_num_tokens(4);
      parent = id;
    }
    return s;
  }
  std::vector<int32_t> ReplicasOf(uint64_t id) const {
    absl::MutexLock lock(&lake_->mu);
    std::vector<int32_t> out;
    const index::PrefixTree::Node* node = lake_->lake->prefix_tree().Find(SegmentId(id));
    if (node != nullptr) {
      for (InstanceId r : node->replicas) out.push_back(r.value());
    }
    std::sort(out.begin(), out.end());
    return out;
  }
  std::vector<uint64_t> Free(Reconciler& r, int32_t id, const v1::InstanceState& s,
                             bool registration, absl::Time now) {
    absl::StatusOr<Reconciler::Outcome> o = r.Report(id, s, registration, now);
    EXPECT_TRUE(o.ok()) << o.status();
    if (!o.ok()) return {};
    std::vector<uint64_t> f = o->to_free;
    std::sort(f.begin(), f.end());
    return f;
  }
  std::unique_ptr<GuardedLake> lake_;
};

TEST_F(ReconcilerTest, RegistrationRestoresAndHeartbeatsFreeWhatTheLakeDoesNotList) {
  auto r = Make(kStart);
  EXPECT_TRUE(Free(*r, 0, Report({11, 12, 13}), /*registration=*/true, kStart).empty());
  EXPECT_EQ(ReplicasOf(11), std::vector<int32_t>{0});
  EXPECT_EQ(ReplicasOf(13), std::vector<int32_t>{0});  // parents first, across batches of 2
  EXPECT_EQ(r->stats().restored, 3);
  // A heartbeat that reports a segment the lake never listed: freed, not restored.
  EXPECT_EQ(Free(*r, 0, Report({11, 12, 13, 14}), false, kStart + absl::Seconds(1)),
            std::vector<uint64_t>{14});
  EXPECT_TRUE(ReplicasOf(14).empty());
  EXPECT_EQ(r->stats().frees, 1);
  // A copy the lake drops is freed on the next heartbeat.
  {
    absl::MutexLock lock(&lake_->mu);
    ASSERT_TRUE(lake_->lake->DropReplica(SegmentId(13), InstanceId(0)).ok());
  }
  EXPECT_EQ(Free(*r, 0, Report({11, 12, 13}), false, kStart + absl::Seconds(2)),
            std::vector<uint64_t>{13});
}

TEST_F(ReconcilerTest, AListedReplicaMissingFromTwoHeartbeatsLeavesTheLake) {
  auto r = Make(kStart);
  Free(*r, 1, Report({21, 22}), true, kStart);
  Free(*r, 1, Report({21}), false, kStart + absl::Seconds(1));
  EXPECT_EQ(ReplicasOf(22), std::vector<int32_t>{1});  // one miss: kept
  Free(*r, 1, Report({21}), false, kStart + absl::Seconds(2));
  EXPECT_TRUE(ReplicasOf(22).empty());
  EXPECT_EQ(r->stats().drops, 1);
  EXPECT_EQ(ReplicasOf(21), std::vector<int32_t>{1});
  // Reported again in between resets the count.
  Free(*r, 1, Report({}), false, kStart + absl::Seconds(3));
  Free(*r, 1, Report({21}), false, kStart + absl::Seconds(4));
  EXPECT_TRUE(Free(*r, 1, Report({}), false, kStart + absl::Seconds(5)).empty());
  EXPECT_EQ(ReplicasOf(21), std::vector<int32_t>{1});
}

TEST_F(ReconcilerTest, OrphansAreRetriedInsideTheRestoreWindowAndFreedAfterIt) {
  auto r = Make(kStart);
  // Instance 1 holds 32 whose parent 31 is on instance 0, which has not re-registered yet.
  v1::InstanceState orphan;
  v1::Segment* seg = orphan.add_segments();
  seg->set_id(32);
  seg->set_parent(31);
  seg->set_num_tokens(4);
  EXPECT_TRUE(Free(*r, 1, orphan, true, kStart).empty());  // kept for a retry
  EXPECT_TRUE(ReplicasOf(32).empty());
  Free(*r, 0, Report({31}), true, kStart + absl::Seconds(1));
  EXPECT_TRUE(Free(*r, 1, orphan, false, kStart + absl::Seconds(2)).empty());
  EXPECT_EQ(ReplicasOf(32), std::vector<int32_t>{1});

  // After the window an orphan is freed at once.
  lake_ = MakeLake(2, 64);
  auto late = Make(kStart);
  v1::InstanceState other;
  seg = other.add_segments();
  seg->set_id(42);
  seg->set_parent(41);
  seg->set_num_tokens(4);
  EXPECT_EQ(Free(*late, 0, other, true, kStart + absl::Seconds(6)), std::vector<uint64_t>{42});
}

TEST_F(ReconcilerTest, AnUnconfirmedRebalanceCopyIsReadFromItsSourceUntilReported) {
  auto r = Make(kStart);
  lake::IterationPlan plan;
  plan.segments.push_back({.segment = SegmentId(51),
                           .num_tokens = 4,
                           .holder = InstanceId(1),
                           .action = plan::HolderAction::kLocal});
  r->AddFresh(51, /*to=*/1, /*from=*/0, kStart);
  // The source is not routable: the plan stays.
  EXPECT_EQ(r->RedirectUnconfirmed(&plan, {false, true}), 0);
  EXPECT_EQ(plan.segments[0].holder, InstanceId(1));
  EXPECT_EQ(r->RedirectUnconfirmed(&plan, {true, true}), 1);
  EXPECT_EQ(plan.segments[0].holder, InstanceId(0));
  EXPECT_EQ(plan.segments[0].action, plan::HolderAction::kMoveQueries);
  // The source's own copy is protected from being freed meanwhile (the lake does not list it).
  Free(*r, 0, Report({}), true, kStart);
  EXPECT_TRUE(Free(*r, 0, Report({51}), false, kStart + absl::Seconds(1)).empty());
  // The receiver reports it (the lake lists it there): confirmed, plans read it where they say.
  Free(*r, 1, Report({51}), true, kStart + absl::Seconds(1));
  Free(*r, 1, Report({51}), false, kStart + absl::Seconds(2));
  plan.segments[0].holder = InstanceId(1);
  EXPECT_EQ(r->RedirectUnconfirmed(&plan, {true, true}), 0);
  EXPECT_EQ(plan.segments[0].holder, InstanceId(1));
  EXPECT_EQ(r->stats().redirects, 1);
  // Confirmed: the source's copy is freed now.
  EXPECT_EQ(Free(*r, 0, Report({51}), false, kStart + absl::Seconds(3)), std::vector<uint64_t>{51});
}

// Reports of changes: (from, to] with the segments stored or freed.
v1::InstanceState Changes(uint64_t incarnation, uint64_t from,
                          const std::vector<std::pair<uint64_t, bool>>& changes) {
  v1::InstanceState s;
  s.set_holdings_incarnation(incarnation);
  v1::HoldingsChanges* c = s.mutable_holdings_changes();
  c->set_from_seq(from);
  c->set_to_seq(from + changes.size());
  s.set_holdings_seq(c->to_seq());
  for (const auto& [id, stored] : changes) {
    v1::SegmentChange* sc = c->add_changes();
    sc->mutable_segment()->set_id(id);
    if (stored) {
      sc->mutable_segment()->set_parent(SegmentId().value());
      sc->mutable_segment()->set_num_tokens(4);
    } else {
      sc->set_freed(true);
    }
  }
  return s;
}

std::vector<uint64_t> HeldIds(const Reconciler::View& v) {
  std::vector<uint64_t> out;
  for (const lake::HeldSegment& h : v.held) out.push_back(h.id.value());
  return out;
}

TEST_F(ReconcilerTest, ChangesApplyInOrderSkippingWhatTheViewHasAndAGapAsksForAFullReport) {
  auto r = Make(kStart);
  const absl::Time t = kStart + absl::Seconds(10);
  v1::InstanceState full = Report({61});
  full.set_holdings_incarnation(7);
  full.set_holdings_seq(1);
  ASSERT_TRUE(r->Report(0, full, true, t).ok());
  // (1, 3]: store 62 and 63.
  absl::StatusOr<Reconciler::Outcome> o =
      r->Report(0, Changes(7, 1, {{62, true}, {63, true}}), false, t);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->acked_seq, 3u);
  EXPECT_FALSE(o->full_wanted);
  EXPECT_EQ(HeldIds(r->ViewOf(0)), (std::vector<uint64_t>{61, 62, 63}));
  // The same changes again with one more (the reply was lost): only the new one applies.
  o = r->Report(0, Changes(7, 1, {{62, true}, {63, true}, {62, false}}), false, t);
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->acked_seq, 4u);
  EXPECT_EQ(HeldIds(r->ViewOf(0)), (std::vector<uint64_t>{61, 63}));
  // A late report (the view is past it): ignored.
  o = r->Report(0, Changes(7, 1, {{62, true}, {64, true}}), false, t);
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->acked_seq, 4u);
  EXPECT_EQ(HeldIds(r->ViewOf(0)), (std::vector<uint64_t>{61, 63}));
  // A gap (changes 5..6 never arrived), another incarnation: a full report is asked for.
  for (const v1::InstanceState& s : {Changes(7, 6, {{65, true}}), Changes(8, 4, {{65, true}})}) {
    o = r->Report(0, s, false, t);
    ASSERT_TRUE(o.ok());
    EXPECT_TRUE(o->full_wanted);
    EXPECT_TRUE(o->to_free.empty());
    EXPECT_EQ(HeldIds(r->ViewOf(0)), (std::vector<uint64_t>{61, 63}));
  }
  // The full report replaces the view.
  v1::InstanceState again = Report({61, 66});
  again.set_holdings_incarnation(8);
  again.set_holdings_seq(2);
  o = r->Report(0, again, false, t);
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->acked_seq, 2u);
  EXPECT_EQ(HeldIds(r->ViewOf(0)), (std::vector<uint64_t>{61, 66}));
  EXPECT_EQ(r->stats().gaps, 2);
  EXPECT_EQ(r->stats().late_reports, 1);
}

TEST_F(ReconcilerTest, MalformedReportsAreRefusedNamingTheInstance) {
  auto r = Make(kStart);
  v1::InstanceState wrong_count = Changes(7, 0, {{1, true}});
  wrong_count.mutable_holdings_changes()->set_to_seq(5);
  absl::StatusOr<Reconciler::Outcome> o = r->Report(1, wrong_count, false, kStart);
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(o.status().message(), HasSubstr("instance 1: holdings changes (0, 5] carry 1"));
  v1::InstanceState both = Changes(7, 0, {});
  both.add_segments()->set_id(3);
  EXPECT_THAT(r->Report(1, both, false, kStart).status().message(),
              HasSubstr("instance 1 reported both"));
  EXPECT_EQ(r->Report(1, Changes(7, 0, {}), true, kStart).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r->Report(2, Report({}), false, kStart).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The instance's side for the randomised test: what it holds (its truth), its numbered changes.
class FakeHoldings final : public HoldingsSource {
 public:
  explicit FakeHoldings(int64_t log_entries) : log_(log_entries) {}
  uint64_t Snapshot(std::vector<lake::HeldSegment>* held) const override {
    for (const auto& [id, h] : truth_) held->push_back(h);
    return log_.last();
  }
  std::optional<std::vector<store::SegmentChange>> ChangesSince(uint64_t from) const override {
    return log_.Since(from);
  }
  void Forget(uint64_t through) override { log_.Trim(through); }

  void Store(const lake::HeldSegment& h) {
    truth_[h.id.value()] = h;
    generation_[h.id.value()] =
        log_.Record({.id = h.id, .stored = true, .parent = h.parent, .num_tokens = h.num_tokens});
  }
  void Free(uint64_t id) {
    if (truth_.erase(id) > 0) log_.Record({.id = SegmentId(id), .stored = false});
  }
  // engine::InstancePool::FreeIfUnchangedSince.
  void FreeIfUnchangedSince(uint64_t id, uint64_t generation) {
    auto it = generation_.find(id);
    if (truth_.contains(id) && it != generation_.end() && it->second <= generation) Free(id);
  }
  const std::map<uint64_t, lake::HeldSegment>& truth() const { return truth_; }

 private:
  std::map<uint64_t, lake::HeldSegment> truth_;
  std::map<uint64_t, uint64_t> generation_;
  store::SegmentChangeLog log_;
};

// A random stream of stores and frees on instance 0, its reports lost, duplicated, delayed and
// reordered, replies lost, the lake changing on its own, the instance restarting (a new store
// incarnation) and the coordinator restarting (a new lake: the instance registers again). After
// every report the coordinator takes, its view equals what the instance held when it made the
// report; after every step the view's disagreement with the lake is exactly the symmetric
// difference of the view and the lake's listing.
TEST(ReconcilerModelTest, TheViewEqualsTheInstanceAfterEveryReportTakenDespiteAnUnreliableNet) {
  const uint64_t seed = TestSeed(4242);
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  Rng rng(seed);
  // Chains c = 0..7 of 4 segments: id c * 100 + k + 1, each the parent of the next.
  auto segment = [](int64_t c, int64_t k) {
    return lake::HeldSegment{
        .id = SegmentId(static_cast<uint64_t>(c * 100 + k + 1)),
        .parent = k == 0 ? SegmentId() : SegmentId(static_cast<uint64_t>(c * 100 + k)),
        .num_tokens = 4};
  };
  std::unique_ptr<GuardedLake> lake;
  std::unique_ptr<Reconciler> r;
  Reconciler::Stats total;
  auto restart_coordinator = [&] {
    if (r != nullptr) {
      total.drops += r->stats().drops;
      total.restored += r->stats().restored;
      total.changes_applied += r->stats().changes_applied;
    }
    r.reset();
    lake = MakeLake(2, 16);
    r = std::make_unique<Reconciler>(lake.get(),
                                     Reconciler::Options{.num_instances = 2,
                                                         .started = kStart,
                                                         .restore_window = absl::ZeroDuration(),
                                                         .batch = 3});
    Wire(*lake, *r);
  };
  std::unique_ptr<FakeHoldings> instance;
  std::unique_ptr<HoldingsReporter> reporter;
  uint64_t incarnation = 0;
  auto restart_instance = [&] {
    instance = std::make_unique<FakeHoldings>(rng.UniformInt(0, 40));
    reporter = std::make_unique<HoldingsReporter>(instance.get(), ++incarnation);
  };
  struct InFlight {
    v1::InstanceState state;
    std::map<uint64_t, lake::HeldSegment> truth;  // when it was made
    uint64_t incarnation = 0;                     // replies go to its reporter, if alive
  };
  std::vector<InFlight> net;
  std::map<std::string, int64_t> seen;
  absl::Time now = kStart + absl::Seconds(100);
  // Registration (synchronous): a full report; the reports on their way are lost with the old
  // connections, or (`keep_net`) arrive late.
  auto register_instance = [&](bool keep_net) {
    if (!keep_net) net.clear();
    v1::InstanceState s;
    reporter->Fill(/*full=*/true, true, &s);
    absl::StatusOr<Reconciler::Outcome> o = r->Report(0, s, /*registration=*/true, now);
    ASSERT_TRUE(o.ok()) << o.status();
    ASSERT_FALSE(o->full_wanted);
    const uint64_t at = reporter->OnReply(true, o->acked_seq, o->full_wanted);
    for (uint64_t f : o->to_free) instance->FreeIfUnchangedSince(f, at);
    ASSERT_EQ(r->ViewOf(0).seq, s.holdings_seq());
  };
  auto check_disagreement = [&](int step) {
    const Reconciler::View v = r->ViewOf(0);
    std::set<uint64_t> held, listed;
    for (const lake::HeldSegment& h : v.held) held.insert(h.id.value());
    {
      absl::MutexLock lock(&lake->mu);
      ASSERT_TRUE(lake->lake->CheckIntegrity().ok());
      lake->lake->prefix_tree().ForEachNode([&](const index::PrefixTree::Node& n) {
        if (n.HasReplicaOn(InstanceId(0))) listed.insert(n.id.value());
      });
    }
    std::vector<SegmentId> unlisted, missing;
    for (uint64_t s : held) {
      if (!listed.contains(s)) unlisted.push_back(SegmentId(s));
    }
    for (uint64_t s : listed) {
      if (!held.contains(s)) missing.push_back(SegmentId(s));
    }
    std::vector<SegmentId> got_missing;
    for (const auto& [s, misses] : v.missing) got_missing.push_back(s);
    ASSERT_EQ(v.unlisted, unlisted) << "step " << step;
    ASSERT_EQ(got_missing, missing) << "step " << step;
  };
  restart_coordinator();
  restart_instance();
  register_instance(false);
  for (int step = 0; step < 6000; ++step) {
    now += absl::Milliseconds(10);
    const double dice = rng.UniformDouble();
    const lake::HeldSegment h = segment(rng.UniformInt(0, 7), rng.UniformInt(0, 3));
    if (dice < 0.25) {
      instance->Store(h);  // a store (any chain position: orphans happen)
    } else if (dice < 0.4) {
      instance->Free(h.id.value());
    } else if (dice < 0.5) {
      // The lake changes on its own: a copy placed (on either instance) or dropped.
      absl::MutexLock lock(&lake->mu);
      const InstanceId on(static_cast<int32_t>(rng.UniformInt(0, 1)));
      if (rng.Bernoulli(0.6)) {
        lake->lake->RestoreReplicas(on, {h}).IgnoreError();
      } else if (rng.Bernoulli(0.5)) {
        lake->lake->DropReplica(h.id, on).IgnoreError();
      } else {
        lake->lake->LoseReplica(h.id, on).IgnoreError();
      }
    } else if (dice < 0.7) {
      InFlight f;
      reporter->Fill(/*full=*/false, true, &f.state);
      f.truth = instance->truth();
      f.incarnation = reporter->incarnation();
      ++seen[f.state.has_holdings_changes() ? "sent_changes" : "sent_full"];
      net.push_back(std::move(f));
    } else if (dice < 0.98) {
      if (net.empty()) continue;
      // Delivery: usually the oldest, sometimes another (reordered); some are lost.
      const size_t k =
          rng.Bernoulli(0.7) ? 0 : static_cast<size_t>(rng.UniformInt(0, net.size() - 1));
      InFlight f = net[k];
      if (!rng.Bernoulli(0.15)) net.erase(net.begin() + static_cast<int64_t>(k));  // else again
      if (rng.Bernoulli(0.1)) {
        ++seen["lost"];
        continue;
      }
      absl::StatusOr<Reconciler::Outcome> o = r->Report(0, f.state, false, now);
      ASSERT_TRUE(o.ok()) << "step " << step << ": " << o.status();
      if (o->full_wanted) {
        ++seen["gap"];
      } else if (o->acked_seq == f.state.holdings_seq()) {
        // Taken: the view is the instance as it was when it made the report.
        ++seen["taken"];
        std::vector<lake::HeldSegment> want;
        for (const auto& [id, held] : f.truth) want.push_back(held);
        const Reconciler::View v = r->ViewOf(0);
        ASSERT_EQ(v.held.size(), want.size()) << "step " << step;
        for (size_t i = 0; i < want.size(); ++i) {
          ASSERT_EQ(v.held[i].id, want[i].id) << "step " << step;
          ASSERT_EQ(v.held[i].parent, want[i].parent) << "step " << step;
          ASSERT_EQ(v.held[i].num_tokens, want[i].num_tokens) << "step " << step;
        }
      } else {
        ++seen["late"];
      }
      if (f.incarnation == reporter->incarnation() && !rng.Bernoulli(0.1)) {
        const uint64_t at = reporter->OnReply(true, o->acked_seq, o->full_wanted);
        for (uint64_t id : o->to_free) instance->FreeIfUnchangedSince(id, at);
        seen["freed"] += static_cast<int64_t>(o->to_free.size());
      }
    } else if (dice < 0.985) {
      restart_instance();  // a new store incarnation
      register_instance(rng.Bernoulli(0.5));
      ++seen["instance_restart"];
    } else if (dice < 0.99) {
      restart_coordinator();
      register_instance(false);
      ++seen["coordinator_restart"];
    } else {
      // The coordinator loses its view without a registration: the next changes find a gap.
      restart_coordinator();
      ++seen["view_lost"];
    }
    check_disagreement(step);
    if (HasFatalFailure()) return;
  }
  for (const auto& [what, n] : seen) std::cout << what << "=" << n << " ";
  std::cout << "\n";
  restart_coordinator();
  std::cout << "changes_applied=" << total.changes_applied << " drops=" << total.drops
            << " restored=" << total.restored << "\n";
  EXPECT_GT(total.drops, 0);
  EXPECT_GT(total.restored, 0);
  EXPECT_GT(seen["taken"], 500);
  EXPECT_GT(seen["gap"], 10);
  EXPECT_GT(seen["late"], 10);
  EXPECT_GT(seen["sent_full"], 10);
  EXPECT_GT(seen["freed"], 0);
}

}  // namespace
}  // namespace tokenlake::service
