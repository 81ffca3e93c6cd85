// API keys of the HTTP front end (`tokenlake coordinator --api-key-file F`): one key per line,
// optionally with its tenant and limit:
//
//   # comment
//   sk-team-a-3f9c1e...  tenant=team-a  max_concurrent=8
//   sk-ops-77b0...                                  (no tenant: shares the untenanted cache)
//
// A request must carry `Authorization: Bearer KEY`; a key's tenant salts its requests' segment
// ids (index::TenantSalt), so tenants share no cached prefix; max_concurrent bounds its requests
// in flight (429 beyond). Keys are compared in constant time and never logged or echoed.
//
// Thread-safety: immutable after Load; InFlight counters are atomic.
#ifndef TOKENLAKE_SERVICE_API_KEYS_H_
#define TOKENLAKE_SERVICE_API_KEYS_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tokenlake::service {

struct ApiKey {
  std::string key;
  std::string tenant;          // empty: none
  int32_t max_concurrent = 0;  // 0: no limit
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

 private:
  std::vector<ApiKey> keys_;
  std::unique_ptr<std::atomic<int32_t>[]> in_flight_;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_API_KEYS_H_
