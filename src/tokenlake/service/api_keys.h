// API keys of the HTTP front end (`tokenlake coordinator --api-key-file F`): one key per line,
// optionally with its tenant and limits:
//
//   # comment
//   sk-team-a-3f9c1e...  tenant=team-a  max_concurrent=8  max_tokens_in_flight=200000
//   sk-ops-77b0...                                  (no tenant: shares the untenanted cache)
//
// A request must carry `Authorization: Bearer KEY`; a key's tenant salts its requests' segment
// ids (index::TenantSalt), so tenants share no cached prefix; max_concurrent bounds its requests
// in flight and max_tokens_in_flight the prompt tokens + max new tokens (max_tokens) of its
// running requests (429 with Retry-After beyond either; a request that alone exceeds
// max_tokens_in_flight is a 400, since waiting cannot help). Keys are compared in constant time
// and never logged or echoed.
//
// Thread-safety: immutable after Load; the in-flight counters are atomic.
#ifndef TOKENLAKE_SERVICE_API_KEYS_H_
#define TOKENLAKE_SERVICE_API_KEYS_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "tokenlake/service/http_front_end.h"

namespace tokenlake::service {

struct ApiKey {
  std::string key;
  std::string tenant;          // empty: none
  int32_t max_concurrent = 0;  // 0: no limit
  // Prompt tokens + max_tokens of the key's running requests, at most (0: no limit).
  int64_t max_tokens_in_flight = 0;
};

class ApiKeys {
 public:
  // Parses the file. Errors: NotFound (unreadable), InvalidArgument naming file and line (a key
  // shorter than 8 characters, an unknown or malformed attribute, a duplicate key, no key at
  // all) — never the key itself.
  static absl::StatusOr<std::shared_ptr<const ApiKeys>> Load(const std::string& path);
  static absl::StatusOr<std::shared_ptr<const ApiKeys>> Parse(absl::string_view text,
                                                              const std::string& name);

  // The index of the key an `Authorization` header value carries ("Bearer KEY"), or -1.
  int Find(absl::string_view authorization) const;
  const ApiKey& key(int i) const { return keys_[static_cast<size_t>(i)]; }
  int size() const { return static_cast<int>(keys_.size()); }
  // Requests in flight per key (the front end counts them).
  std::atomic<int32_t>& in_flight(int i) const { return in_flight_[static_cast<size_t>(i)]; }

  // Takes `tokens` (>= 0) of key i's tokens in flight, to give back with ReturnTokens when its
  // request ends. Errors (nothing taken): ResourceExhausted when its running requests hold too
  // many to add them now; InvalidArgument when `tokens` alone exceed max_tokens_in_flight.
  // Always OK for a key without the limit.
  absl::Status TakeTokens(int i, int64_t tokens) const;
  void ReturnTokens(int i, int64_t tokens) const;
  int64_t tokens_in_flight(int i) const { return tokens_in_flight_[static_cast<size_t>(i)].load(); }

 private:
  std::vector<ApiKey> keys_;
  std::unique_ptr<std::atomic<int32_t>[]> in_flight_;
  std::unique_ptr<std::atomic<int64_t>[]> tokens_in_flight_;
};

// `routes` behind API keys (the coordinator's front end): every route but /healthz (and
// /metrics when `metrics_public`) needs `Authorization: Bearer KEY` of a key in `keys` (401
// otherwise); a key at its max_concurrent gets 429 with Retry-After; a request reaches its
// handler with the key's tenant (HttpRequest::tenant) and the key's budget of tokens in flight
// (HttpRequest::reserve_tokens, which the OpenAI routes take from). A streamed answer counts as
// in flight until its stream ends.
std::vector<HttpRoute> WithApiKeys(std::vector<HttpRoute> routes,
                                   std::shared_ptr<const ApiKeys> keys, bool metrics_public);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_API_KEYS_H_
