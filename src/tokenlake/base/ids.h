// The strong id types shared by every TokenLake module.
//
// - SegmentId: the chained hash of a segment and its whole prefix (see index/segment_id.h). Two
//   segments share an id exactly when their full prefixes are identical.
// - InstanceId: a serving instance (one GPU or TP group, or one CPU worker), dense from 0.
// - RequestId: a request, unique within one pool.
// - SlotId: a slot in one instance's segment store, dense from 0.
#ifndef TOKENLAKE_BASE_IDS_H_
#define TOKENLAKE_BASE_IDS_H_

#include <cstdint>

#include "tokenlake/base/strong_id.h"

namespace tokenlake {

struct SegmentIdTag {
  static constexpr const char* kName = "SegmentId";
};
struct InstanceIdTag {
  static constexpr const char* kName = "InstanceId";
};
struct RequestIdTag {
  static constexpr const char* kName = "RequestId";
};
struct SlotIdTag {
  static constexpr const char* kName = "SlotId";
};

using SegmentId = StrongId<SegmentIdTag, uint64_t>;
using InstanceId = StrongId<InstanceIdTag, int32_t>;
using RequestId = StrongId<RequestIdTag, uint64_t>;
using SlotId = StrongId<SlotIdTag, int32_t>;

}  // namespace tokenlake

#endif  // TOKENLAKE_BASE_IDS_H_
