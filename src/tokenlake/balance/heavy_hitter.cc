#include "tokenlake/balance/heavy_hitter.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"

namespace tokenlake::balance {

void DecayingCounter::Add(double delta, int64_t now_us) {
  if (!std::isfinite(delta)) return;
  value_ = std::max(0.0, Value(now_us) + delta);
  updated_us_ = std::max(updated_us_, now_us);
}

double DecayingCounter::Value(int64_t now_us) const {
  if (now_us <= updated_us_ || value_ == 0) return value_;
  return value_ *
         std::exp2(-static_cast<double>(now_us - updated_us_) / static_cast<double>(half_life_us_));
}

absl::StatusOr<std::unique_ptr<HeavyHitterTracker>> HeavyHitterTracker::Create(
    const HeavyHitterOptions& options, const Clock* clock) {
  if (clock == nullptr) return absl::InvalidArgumentError("HeavyHitterTracker: clock is null");
  if (options.half_life_us <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "HeavyHitterOptions.half_life_us must be > 0, got %d", options.half_life_us));
  }
  if (options.num_instances < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "HeavyHitterOptions.num_instances must be >= 1, got %d", options.num_instances));
  }
  if (!(options.heavy_fraction > 0) || !std::isfinite(options.heavy_fraction)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "HeavyHitterOptions.heavy_fraction must be > 0, got %g", options.heavy_fraction));
  }
  if (!(options.replica_target_fraction > 0) || !std::isfinite(options.replica_target_fraction)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("HeavyHitterOptions.replica_target_fraction must be > 0, got %g",
                        options.replica_target_fraction));
  }
  if (!(options.track_fraction > 0) || options.track_fraction > options.heavy_fraction) {
    return absl::InvalidArgumentError(
        absl::StrFormat("HeavyHitterOptions.track_fraction must be in (0, heavy_fraction=%g], "
                        "got %g",
                        options.heavy_fraction, options.track_fraction));
  }
  if (!(options.min_heavy_load >= 0) || !std::isfinite(options.min_heavy_load)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "HeavyHitterOptions.min_heavy_load must be >= 0, got %g", options.min_heavy_load));
  }
  return std::unique_ptr<HeavyHitterTracker>(new HeavyHitterTracker(options, clock));
}

HeavyHitterTracker::HeavyHitterTracker(const HeavyHitterOptions& options, const Clock* clock)
    : options_(options), clock_(clock) {
  total_.updated_us = clock_->NowUs();
}

double HeavyHitterTracker::Decayed(const Counter& c, int64_t now_us) const {
  if (now_us <= c.updated_us || c.value == 0) return c.value;
  const double halves =
      static_cast<double>(now_us - c.updated_us) / static_cast<double>(options_.half_life_us);
  return c.value * std::exp2(-halves);
}

void HeavyHitterTracker::Record(SegmentId segment, double load) {
  if (!(load > 0) || !std::isfinite(load)) return;
  const int64_t now = clock_->NowUs();
  Counter& c = counters_[segment];
  c.value = Decayed(c, now) + load;
  c.updated_us = std::max(c.updated_us, now);
  total_.value = Decayed(total_, now) + load;
  total_.updated_us = std::max(total_.updated_us, now);
  const double fair = total_.value / options_.num_instances;
  if (c.value > options_.track_fraction * fair) warm_.insert(segment);
}

double HeavyHitterTracker::Load(SegmentId segment) const {
  auto it = counters_.find(segment);
  if (it == counters_.end()) return 0;
  return Decayed(it->second, clock_->NowUs());
}

double HeavyHitterTracker::TotalLoad() const { return Decayed(total_, clock_->NowUs()); }

double HeavyHitterTracker::FairShare() const { return TotalLoad() / options_.num_instances; }

bool HeavyHitterTracker::IsHeavyLoad(double load, double fair_share) const {
  return load > 0 && load >= options_.min_heavy_load && load > options_.heavy_fraction * fair_share;
}

bool HeavyHitterTracker::IsHeavy(SegmentId segment) const {
  return IsHeavyLoad(Load(segment), FairShare());
}

int32_t HeavyHitterTracker::DesiredReplicas(SegmentId segment, int32_t max_replicas) const {
  const int32_t cap = std::max<int32_t>(1, max_replicas);
  const double load = Load(segment);
  const double fair = FairShare();
  if (!IsHeavyLoad(load, fair)) return 1;
  const double per_replica = options_.replica_target_fraction * fair;
  const double want = std::ceil(load / per_replica - 1e-9);
  if (!(want < cap)) return cap;
  return std::clamp<int32_t>(static_cast<int32_t>(want), 1, cap);
}

std::vector<SegmentLoad> HeavyHitterTracker::CollectWarm() {
  const int64_t now = clock_->NowUs();
  const double fair = Decayed(total_, now) / options_.num_instances;
  std::vector<SegmentLoad> out;
  std::vector<SegmentId> cooled;
  for (SegmentId s : warm_) {
    auto it = counters_.find(s);
    if (it == counters_.end()) {
      cooled.push_back(s);
      continue;
    }
    const double load = Decayed(it->second, now);
    if (!(load > options_.track_fraction * fair)) {
      cooled.push_back(s);
      continue;
    }
    out.push_back(SegmentLoad{s, load, IsHeavyLoad(load, fair)});
  }
  for (SegmentId s : cooled) warm_.erase(s);
  std::sort(out.begin(), out.end(), [](const SegmentLoad& a, const SegmentLoad& b) {
    if (a.load != b.load) return a.load > b.load;
    return a.segment < b.segment;
  });
  return out;
}

std::vector<SegmentLoad> HeavyHitterTracker::HeavyHitters() {
  std::vector<SegmentLoad> warm = CollectWarm();
  std::erase_if(warm, [](const SegmentLoad& s) { return !s.heavy; });
  return warm;
}

int64_t HeavyHitterTracker::CountHeavy() const {
  const double fair = FairShare();
  int64_t n = 0;
  for (SegmentId s : warm_) {
    if (IsHeavyLoad(Load(s), fair)) ++n;
  }
  return n;
}

void HeavyHitterTracker::Forget(SegmentId segment) {
  counters_.erase(segment);
  warm_.erase(segment);
}

}  // namespace tokenlake::balance
