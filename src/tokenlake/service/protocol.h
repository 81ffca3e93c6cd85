// Constants of the protocol between the coordinator and its instances over the host transport.
#ifndef TOKENLAKE_SERVICE_PROTOCOL_H_
#define TOKENLAKE_SERVICE_PROTOCOL_H_

#include <google/protobuf/message_lite.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#include "tokenlake/transport/transport.h"

namespace tokenlake::service {

// Instance ids are [0, kMaxInstances); instance i hosts host-transport endpoint i + 1 and the
// coordinator hosts endpoint 0.
inline constexpr int32_t kMaxInstances = 64;
// Host-transport message tags.
inline constexpr uint32_t kGenerateRequestTag = 1;
inline constexpr uint32_t kGenerateReplyTag = 2;
inline constexpr uint32_t kRebalanceTag = 3;
// Instance -> coordinator: a streamed request's new tokens (v1::GenerateProgress).
inline constexpr uint32_t kGenerateProgressTag = 4;
// Coordinator -> instance: stop serving a request (v1::CancelGenerate).
inline constexpr uint32_t kCancelTag = 5;

// A host-transport message whose payload is `payload` serialized (the one way every message of
// this protocol is built).
inline transport::Message ProtocolMessage(InstanceId from, InstanceId to, uint32_t tag,
                                          uint64_t correlation_id,
                                          const google::protobuf::MessageLite& payload) {
  const std::string bytes = payload.SerializeAsString();
  transport::Message m;
  m.from = from;
  m.to = to;
  m.tag = tag;
  m.correlation_id = correlation_id;
  m.payload.resize(bytes.size());
  // An empty payload (a message of defaults) has no buffer to copy into.
  if (!bytes.empty()) std::memcpy(m.payload.data(), bytes.data(), bytes.size());
  return m;
}

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_PROTOCOL_H_
