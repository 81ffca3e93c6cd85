#include "tokenlake/engine/data_rpc.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/wire.h"

namespace tokenlake::engine {

transport::Message ErrorReply(const transport::Message& request, const absl::Status& status) {
  WireWriter w;
  w.Put<int32_t>(static_cast<int32_t>(status.code()));
  const std::string text(status.message());
  w.PutArray<char>(absl::MakeConstSpan(text.data(), text.size()));
  return transport::Message{.from = request.to,
                            .to = request.from,
                            .tag = kErrorReplyTag,
                            .correlation_id = request.correlation_id,
                            .payload = w.Take()};
}

absl::Status DecodeError(const transport::Message& reply, int32_t endpoint_base) {
  WireReader r(reply.payload);
  int32_t code = 0;
  std::vector<char> text;
  if (!r.Get(&code, "error code").ok() || !r.GetArray(&text, "error message").ok()) {
    return absl::DataLossError("malformed error reply");
  }
  return {static_cast<absl::StatusCode>(code),
          absl::StrCat("instance ", reply.from.value() - endpoint_base, ": ",
                       std::string(text.begin(), text.end()))};
}

absl::StatusOr<uint64_t> DriverChannel::Send(InstanceId to, uint32_t tag,
                                             std::vector<std::byte> payload) {
  uint64_t ticket = 0;
  {
    absl::MutexLock lock(&mu_);
    ticket = next_ticket_++;
  }
  TOKENLAKE_RETURN_IF_ERROR(transport_->Send(transport::Message{.from = endpoint_,
                                                                .to = to,
                                                                .tag = tag,
                                                                .correlation_id = ticket,
                                                                .payload = std::move(payload)}));
  return ticket;
}

absl::StatusOr<transport::Message> DriverChannel::Await(uint64_t ticket, absl::Duration timeout) {
  {
    absl::MutexLock lock(&mu_);
    auto it = stash_.find(ticket);
    if (it != stash_.end()) {
      transport::Message m = std::move(it->second);
      stash_.erase(it);
      if (m.tag == kErrorReplyTag) return DecodeError(m, endpoint_base_);
      return m;
    }
  }
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    TOKENLAKE_ASSIGN_OR_RETURN(transport::Message m,
                               transport_->Receive(endpoint_, deadline - absl::Now()));
    if (m.correlation_id == ticket) {
      if (m.tag == kErrorReplyTag) return DecodeError(m, endpoint_base_);
      return m;
    }
    absl::MutexLock lock(&mu_);
    stash_.emplace(m.correlation_id, std::move(m));
  }
}

}  // namespace tokenlake::engine
