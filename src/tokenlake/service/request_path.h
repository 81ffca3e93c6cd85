// The request path of the coordinator: one validated completion request from arrival to answer.
//
// The request (with a lake request id unique across instances and coordinator incarnations,
// and a random correlation id, so that nobody can guess which reply a request waits for) goes
// to the computing instance that the Router picks, over the host transport, with a deadline;
// the reply is accepted only from that instance (the transport delivers an instance's replies
// only on the connection the coordinator opened to it). An instance that sends nothing about the
// request for `attempt_timeout` (it reports every running request's progress, tokens or not, at
// least every second: an attempt may take as long as its work, not only attempt_timeout) is
// sent a cancel, excluded, and the request fails over; an instance that answers with an
// error (e.g. a holder of the plan died: unreachable or past its deadline) is retried after
// `retry_backoff` x attempt (by then the dead holder is usually marked dead), up to
// `max_attempts` within `request_timeout`; InvalidArgument from an instance (it judged the
// request itself) is final. A failed attempt's pins in the lake are released. Generation is
// deterministic, so a retried request gets the same answer (a request without a seed gets one
// here, so that a sampled one is too).
//
// Streaming: with request.stream the computing instance reports every iteration's new tokens
// (GenerateProgress, tag kGenerateProgressTag) and the caller's sink gets them as they come.
// A retried attempt's tokens that the sink already got are checked equal and skipped (so the
// client sees every token once; a retry that diverged ends the request with Internal). When
// the sink returns false (the client went away, a stop string matched), the instance is sent
// a CancelGenerate (tag kCancelTag) and drops the request, releasing its pins there.
//
// Thread-safety: thread-safe; Complete blocks its caller until the answer or the deadline. Locks:
// the lake's, then Membership's, then this one's.
#ifndef TOKENLAKE_SERVICE_REQUEST_PATH_H_
#define TOKENLAKE_SERVICE_REQUEST_PATH_H_

#include <cstdint>
#include <functional>
#include <map>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "tokenlake/service/completion_api.h"
#include "tokenlake/service/guarded_lake.h"
#include "tokenlake/service/membership.h"
#include "tokenlake/service/metrics.h"
#include "tokenlake/service/protocol.h"
#include "tokenlake/service/router.h"
#include "tokenlake/transport/transport.h"
#include "tokenlake/v1/tokenlake.pb.h"

namespace tokenlake::service {

class RequestPath {
 public:
  struct Options {
    // Checked before anything is routed.
    CompletionLimits limits;
    // Tokens per segment, and the salt of the segment-id namespace (index::NamespaceSalt).
    int32_t segment_tokens = 16;
    uint64_t salt = 0;
    absl::Duration request_timeout = absl::Seconds(30);
    absl::Duration attempt_timeout = absl::Seconds(10);
    int32_t max_attempts = 4;
    absl::Duration retry_backoff = absl::Milliseconds(250);
    // Lake request ids start at first_request_id (so that they differ across coordinator
    // incarnations: an instance may still finish a request of the previous one).
    uint64_t first_request_id = 1;
  };

  // The pointers are borrowed and outlive this. `transport` carries requests to instance i as
  // endpoint i + 1 from endpoint 0 and delivers the replies (ReceiveLoop). `on_served` runs
  // after every answered request (e.g. Rebalancer::RequestServed); may be empty.
  RequestPath(const Options& options, GuardedLake* lake, Membership* membership, Router* router,
              transport::Transport* transport, std::function<void()> on_served);
  ~RequestPath();
  RequestPath(const RequestPath&) = delete;
  RequestPath& operator=(const RequestPath&) = delete;

  // Starts the thread that reads the instances' replies (until the transport is shut down:
  // Receive answers Cancelled).
  void Start();
  // Fails every waiting request with Unavailable; the caller shuts the transport down after,
  // then calls Join. Idempotent.
  void FailAll(const absl::Status& status);
  void Join();

  // Serves one request. Errors: InvalidArgument (the request does not fit the limits),
  // Unavailable (no live instance, or every attempt lost its instance), DeadlineExceeded
  // (request_timeout passed), or the instance's own error (e.g. ResourceExhausted when its pool
  // is full of pins).
  absl::StatusOr<CompletionResult> Complete(const CompletionRequest& request);
  // Receives new tokens in order, each once; returns false to cancel (see the file comment).
  using TokenSink = std::function<bool(absl::Span<const int32_t> tokens)>;
  // Complete, handing the tokens to `sink` (may be empty) as they come; a cancelled request's
  // result has cancelled = true and the tokens the sink got. Errors: as Complete.
  absl::StatusOr<CompletionResult> Complete(const CompletionRequest& request,
                                            const TokenSink& sink);

  // Fails the requests waiting on instance `id` with `status` (it died or restarted).
  void FailPendingOn(int32_t id, const absl::Status& status);

  // Counts an answer given without routing (a request the front end rejected).
  void CountAnswer(int http_status);

  struct Stats {
    std::map<int, int64_t> requests_by_code;
    Histogram::Snapshot latency;
    int64_t prompt_tokens = 0;
    int64_t cached_tokens = 0;
    int64_t generated_tokens = 0;
    int64_t bytes_sent = 0;
    int64_t bytes_received = 0;
    int64_t failovers = 0;
    // Requests their sink cancelled.
    int64_t cancelled_requests = 0;
    // The instances' data-plane traffic of served requests (from their replies).
    int64_t remote_attend_calls = 0;
    int64_t query_bytes_out = 0;
    int64_t partial_bytes_back = 0;
    int64_t pulled_segments = 0;
    int64_t pulled_bytes = 0;
    int64_t remote_stored_segments = 0;
    int64_t remote_stored_bytes = 0;
  };
  Stats stats() const;

 private:
  struct Pending {
    int32_t instance = -1;
    bool done = false;
    absl::Status status;
    v1::GenerateReply reply;
    // A streamed request's progress reports not yet taken by its waiter.
    std::vector<v1::GenerateProgress> progress;
  };
  struct Delivery;
  absl::StatusOr<CompletionResult> CompleteInner(const CompletionRequest& request, absl::Time start,
                                                 const TokenSink& sink);
  // Waits for attempt `ticket` on instance `id` until it is answered, the instance has sent
  // nothing for attempt_timeout, or `request_deadline`, handing its progress reports to
  // `delivery` without the lock; *ended when the delivery asked to stop.
  Pending AwaitAttempt(uint64_t ticket, int32_t id, absl::Time request_deadline, absl::Time sent_at,
                       Delivery& delivery, const TokenSink& sink, bool* ended);
  // Tells instance `id` to stop serving lake request `request` (no reply comes).
  void SendCancel(int32_t id, RequestId request);
  void ReleaseQuietly(RequestId request);
  // Queues a progress report for its waiter (dropped when nobody waits for it from that
  // instance).
  void TakeProgress(const transport::Message& m);
  void ReceiveLoop();

  const Options options_;
  GuardedLake* const lake_;
  Membership* const membership_;
  Router* const router_;
  transport::Transport* const transport_;
  const std::function<void()> on_served_;
  std::thread receiver_;
  Histogram latency_;

  mutable absl::Mutex mu_;
  // A std::map: a waiter's Pending* stays valid while other requests come and go.
  std::map<uint64_t, Pending> pending_ ABSL_GUARDED_BY(mu_);
  uint64_t next_request_id_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_REQUEST_PATH_H_
