// A small etcd v3 client over etcd's JSON gateway (HTTP/1.1, keys and values base64 in JSON),
// enough for cluster membership and leader election: put, get, range by prefix, delete,
// transactions of the "create if absent" / "delete if still mine" kind, leases and watches.
//
// Why the JSON gateway and not etcd's gRPC API: the gateway is part of every etcd since 3.3,
// needs no copy of etcd's .proto files in this tree, and goes through the HTTP library the
// project already links. Every call is one short request; the cost is base64 and JSON, which is
// nothing at membership rates.
//
// Errors: Unavailable when etcd cannot be reached or times out (the endpoint named);
// NotFound for a lease etcd does not know (expired or revoked); the gRPC code etcd reports
// otherwise (e.g. InvalidArgument), with etcd's message.
//
// Thread-safety: thread-safe; every call opens its own connection (calls are rare), so a slow
// call never holds up another. Watch blocks its caller until stopped.
#ifndef TOKENLAKE_SERVICE_ETCD_CLIENT_H_
#define TOKENLAKE_SERVICE_ETCD_CLIENT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace tokenlake::service {

struct EtcdKeyValue {
  std::string key;
  std::string value;
  int64_t create_revision = 0;
  int64_t mod_revision = 0;
  int64_t version = 0;
  // The lease the key is attached to (0 = none).
  int64_t lease = 0;
};

struct EtcdLease {
  int64_t id = 0;
  // The TTL etcd granted.
  absl::Duration ttl;
};

struct EtcdEvent {
  enum class Type { kPut, kDelete };
  Type type = Type::kPut;
  // For a delete, only key and mod_revision are set.
  EtcdKeyValue kv;
};

struct EtcdClientOptions {
  // "http://host:port" (IPv6 hosts in brackets); "host:port" means http://. https is not
  // supported by this client (TLS comes with the cluster's own identities).
  std::string endpoint;
  // Deadline of one call (connect + request + reply); a watch's connect only.
  absl::Duration timeout = absl::Seconds(2);
};

class EtcdClient {
 public:
  // Checks the endpoint's form; does not contact etcd.
  // Errors: InvalidArgument naming a malformed endpoint.
  static absl::StatusOr<std::unique_ptr<EtcdClient>> Create(const EtcdClientOptions& options);
  ~EtcdClient();
  EtcdClient(const EtcdClient&) = delete;
  EtcdClient& operator=(const EtcdClient&) = delete;

  const std::string& endpoint() const { return endpoint_; }

  // Sets key = value, attached to `lease` (0 = none). Returns the revision of the write.
  absl::StatusOr<int64_t> Put(absl::string_view key, absl::string_view value, int64_t lease = 0);
  // The key's current value, or nullopt when absent.
  absl::StatusOr<std::optional<EtcdKeyValue>> Get(absl::string_view key);
  // Every key starting with `prefix` (non-empty), in key order, and the store's revision at the
  // time of the read (for a watch that continues from it).
  struct Range {
    std::vector<EtcdKeyValue> kvs;
    int64_t revision = 0;
  };
  absl::StatusOr<Range> GetPrefix(absl::string_view prefix);
  // Deletes the key; returns how many keys were deleted (0 or 1).
  absl::StatusOr<int64_t> Delete(absl::string_view key);
  // Deletes every key starting with `prefix` (non-empty); returns how many.
  absl::StatusOr<int64_t> DeletePrefix(absl::string_view prefix);

  // Creates key = value (attached to `lease`) only if the key does not exist. Returns true when
  // it was created (and `current`, when given, set to the new pair with its create_revision);
  // false (and `current` set to the existing pair) when it exists.
  absl::StatusOr<bool> PutIfAbsent(absl::string_view key, absl::string_view value, int64_t lease,
                                   EtcdKeyValue* current = nullptr);
  // Deletes the key only if it still has create_revision `create_revision` (i.e. it is the
  // same incarnation of the key that this caller created). Returns whether it was deleted.
  absl::StatusOr<bool> DeleteIfCreatedAt(absl::string_view key, int64_t create_revision);

  // A lease of `ttl` (rounded up to whole seconds, at least 1 s).
  absl::StatusOr<EtcdLease> GrantLease(absl::Duration ttl);
  // Renews the lease once; returns the TTL it has again. Errors: NotFound when the lease has
  // expired or was revoked (its keys are gone).
  absl::StatusOr<absl::Duration> KeepAliveOnce(int64_t lease);
  // Revokes the lease (its keys are deleted). Revoking an unknown lease is OK.
  absl::Status RevokeLease(int64_t lease);

  // Watches every key starting with `prefix` from `start_revision` (0 = from now), calling
  // `on_events` with each batch of events in order, until `stop` becomes true (checked at least
  // every `poll`), `on_events` returns false, or the connection fails. Returns OK when stopped
  // by `stop` or by `on_events`; Unavailable when the stream broke (re-read with GetPrefix and
  // watch again from its revision + 1); OutOfRange when `start_revision` was compacted away.
  absl::Status Watch(absl::string_view prefix, int64_t start_revision,
                     const std::function<bool(const std::vector<EtcdEvent>&)>& on_events,
                     const std::atomic<bool>& stop, absl::Duration poll = absl::Milliseconds(200));

 private:
  struct Endpoint;
  EtcdClient(std::unique_ptr<Endpoint> endpoint, std::string text, absl::Duration timeout);
  // POSTs `body` to `path` and returns the parsed JSON reply's text.
  absl::StatusOr<std::string> Call(absl::string_view path, const std::string& body);

  std::unique_ptr<Endpoint> where_;
  std::string endpoint_;
  absl::Duration timeout_;
};

// The end of the key range that holds every key starting with `prefix`: the prefix with its
// last byte that is not 0xff incremented (etcd's convention); "\0" when there is none.
std::string EtcdPrefixEnd(absl::string_view prefix);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_ETCD_CLIENT_H_
