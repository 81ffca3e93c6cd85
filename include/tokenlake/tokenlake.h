// TokenLake public API: the unified segment-level prefix cache pool.
//
//   #include "tokenlake/tokenlake.h"
//
//   tokenlake::ManualClock clock;                       // or tokenlake::SystemClock::Default()
//   tokenlake::lake::LakeOptions options;               // instances, slots, model shape, knobs
//   auto lake = tokenlake::lake::Lake::Create(options, &clock);
//   auto keys = tokenlake::index::ComputeSegmentKeys(salt, tokens, options.segment_tokens);
//   auto plans = (*lake)->GenPlans({{.requests = {...}, .dop = 2}});
//   (*lake)->Admit(request); ... (*lake)->Commit(id, placements); (*lake)->Release(id);
//
// Re-exports: the Lake (lake/lake.h), segment keys (index/segment_id.h), the plan data types
// (plan/plan_types.h), the cost formulas (plan/cost_model.h) and the injected clock
// (base/clock.h).
#ifndef TOKENLAKE_TOKENLAKE_H_
#define TOKENLAKE_TOKENLAKE_H_

#include "tokenlake/base/clock.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/plan/cost_model.h"
#include "tokenlake/plan/plan_types.h"

namespace tokenlake {

using lake::Lake;
using lake::LakeOptions;
using lake::LakeRequest;
using lake::LakeStats;

}  // namespace tokenlake

#endif  // TOKENLAKE_TOKENLAKE_H_
