// The coordinator's one lake::Lake under one mutex, shared by the coordinator's parts
// (membership_service.h, lake_service.h, router.h, rebalancer.h, request_path.h).
//
// Thread-safety: the lake is used only with `mu` held. That lock orders before every other lock
// of the coordinator's parts (Membership's, the Reconciler's, the request path's): it serialises
// every use of the lake (its methods are thread-safe, but reading its prefix tree is not while
// another thread mutates it).
#ifndef TOKENLAKE_SERVICE_GUARDED_LAKE_H_
#define TOKENLAKE_SERVICE_GUARDED_LAKE_H_

#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/lake/lake.h"

namespace tokenlake::service {

struct GuardedLake {
  mutable absl::Mutex mu;
  // The lake's clock, advanced 1 ms per planned iteration (lake/control_plane.h); used with mu
  // held.
  ManualClock clock{1};
  // Set once before any other thread runs.
  std::unique_ptr<lake::Lake> lake ABSL_PT_GUARDED_BY(mu);
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_GUARDED_LAKE_H_
