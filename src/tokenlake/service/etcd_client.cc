#include "tokenlake/service/etcd_client.h"

#include <httplib.h>

#include <algorithm>
#include <cmath>
#include <thread>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"

namespace tokenlake::service {
namespace {

using Json = nlohmann::json;

std::string B64(absl::string_view s) { return absl::Base64Escape(s); }

absl::StatusOr<std::string> UnB64(const Json& j, const char* field) {
  if (!j.contains(field)) return std::string();
  if (!j[field].is_string())
    return absl::InternalError(absl::StrCat("etcd: ", field, " not a string"));
  std::string out;
  if (!absl::Base64Unescape(j[field].get<std::string>(), &out)) {
    return absl::InternalError(absl::StrCat("etcd: ", field, " is not base64"));
  }
  return out;
}

// etcd's gateway writes 64-bit integers as JSON strings (and omits zeros).
int64_t Int(const Json& j, const char* field) {
  if (!j.is_object() || !j.contains(field)) return 0;
  const Json& v = j[field];
  if (v.is_number_integer()) return v.get<int64_t>();
  int64_t out = 0;
  if (v.is_string() && absl::SimpleAtoi(v.get<std::string>(), &out)) return out;
  return 0;
}

absl::StatusOr<EtcdKeyValue> ParseKv(const Json& j) {
  EtcdKeyValue kv;
  absl::StatusOr<std::string> key = UnB64(j, "key");
  if (!key.ok()) return key.status();
  absl::StatusOr<std::string> value = UnB64(j, "value");
  if (!value.ok()) return value.status();
  kv.key = *std::move(key);
  kv.value = *std::move(value);
  kv.create_revision = Int(j, "create_revision");
  kv.mod_revision = Int(j, "mod_revision");
  kv.version = Int(j, "version");
  kv.lease = Int(j, "lease");
  return kv;
}

// etcd reports errors as {"error": ..., "message": ..., "code": <gRPC code>}.
absl::Status EtcdError(const Json& j) {
  const int code = j.contains("code") && j["code"].is_number_integer() ? j["code"].get<int>() : 2;
  std::string message = j.contains("message") && j["message"].is_string()
                            ? j["message"].get<std::string>()
                            : j.dump();
  if (code == 5 || message.find("lease not found") != std::string::npos) {
    return absl::NotFoundError(absl::StrCat("etcd: ", message));
  }
  return absl::Status(static_cast<absl::StatusCode>(code >= 1 && code <= 16 ? code : 2),
                      absl::StrCat("etcd: ", message));
}

absl::StatusOr<Json> ParseReply(const std::string& body) {
  Json j = Json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InternalError(
        absl::StrCat("etcd: reply is not a JSON object: ", body.substr(0, 200)));
  }
  if (j.contains("error")) return EtcdError(j);
  return j;
}

}  // namespace

struct EtcdClient::Endpoint {
  std::string host;
  int port = 0;
};

std::string EtcdPrefixEnd(absl::string_view prefix) {
  std::string end(prefix);
  while (!end.empty()) {
    unsigned char& last = reinterpret_cast<unsigned char&>(end.back());
    if (last < 0xff) {
      ++last;
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');
}

absl::StatusOr<std::unique_ptr<EtcdClient>> EtcdClient::Create(const EtcdClientOptions& options) {
  absl::string_view rest = options.endpoint;
  if (absl::StartsWith(rest, "https://")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "etcd endpoint '", options.endpoint, "': https is not supported; use http://HOST:PORT"));
  }
  absl::ConsumePrefix(&rest, "http://");
  absl::ConsumeSuffix(&rest, "/");
  auto endpoint = std::make_unique<Endpoint>();
  absl::string_view port_text;
  if (absl::StartsWith(rest, "[")) {
    const size_t close = rest.find(']');
    if (close == absl::string_view::npos || close + 1 >= rest.size() || rest[close + 1] != ':') {
      return absl::InvalidArgumentError(
          absl::StrCat("etcd endpoint '", options.endpoint, "': want http://[IPV6]:PORT"));
    }
    endpoint->host = std::string(rest.substr(1, close - 1));
    port_text = rest.substr(close + 2);
  } else {
    const size_t colon = rest.rfind(':');
    if (colon == absl::string_view::npos || colon == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("etcd endpoint '", options.endpoint, "': want http://HOST:PORT"));
    }
    endpoint->host = std::string(rest.substr(0, colon));
    port_text = rest.substr(colon + 1);
  }
  if (!absl::SimpleAtoi(port_text, &endpoint->port) || endpoint->port < 1 ||
      endpoint->port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("etcd endpoint '", options.endpoint, "': port '",
                                                   port_text, "' is not in [1, 65535]"));
  }
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("etcd client: timeout must be positive");
  }
  std::string text = absl::StrFormat("http://%s:%d", endpoint->host, endpoint->port);
  if (endpoint->host.find(':') != std::string::npos) {
    text = absl::StrFormat("http://[%s]:%d", endpoint->host, endpoint->port);
  }
  return std::unique_ptr<EtcdClient>(
      new EtcdClient(std::move(endpoint), std::move(text), options.timeout));
}

EtcdClient::EtcdClient(std::unique_ptr<Endpoint> endpoint, std::string text, absl::Duration timeout)
    : where_(std::move(endpoint)), endpoint_(std::move(text)), timeout_(timeout) {}

EtcdClient::~EtcdClient() = default;

namespace {

void SetTimeouts(httplib::Client& client, absl::Duration timeout) {
  const int64_t us = absl::ToInt64Microseconds(timeout);
  client.set_connection_timeout(static_cast<time_t>(us / 1'000'000),
                                static_cast<time_t>(us % 1'000'000));
  client.set_read_timeout(static_cast<time_t>(us / 1'000'000), static_cast<time_t>(us % 1'000'000));
  client.set_write_timeout(static_cast<time_t>(us / 1'000'000),
                           static_cast<time_t>(us % 1'000'000));
}

}  // namespace

absl::StatusOr<std::string> EtcdClient::Call(absl::string_view path, const std::string& body) {
  httplib::Client client(where_->host, where_->port);
  SetTimeouts(client, timeout_);
  httplib::Request req;
  req.method = "POST";
  req.path = std::string(path);
  req.body = body;
  req.set_header("Content-Type", "application/json");
  // The body is collected as it arrives: etcd's gateway ends error replies with chunked-encoding
  // trailers (the gRPC status), which this HTTP library's reader reports as a read error after
  // the body itself has arrived whole.
  std::string reply;
  req.content_receiver = [&](const char* data, size_t length, uint64_t, uint64_t) {
    reply.append(data, length);
    return true;
  };
  httplib::Response res;
  httplib::Error error = httplib::Error::Success;
  const bool sent = client.send(req, res, error);
  if (!sent && (res.status <= 0 || (error != httplib::Error::Read))) {
    return absl::UnavailableError(
        absl::StrCat("etcd at ", endpoint_, ": ", path, ": ", httplib::to_string(error)));
  }
  // etcd's errors come as JSON with an HTTP status (404 for NotFound); a 404 without JSON is a
  // path this etcd does not serve.
  const bool json = !reply.empty() && reply[0] == '{';
  if (res.status == 404 && !json) {
    return absl::UnimplementedError(absl::StrCat("etcd at ", endpoint_, ": no ", path));
  }
  if ((res.status >= 400 || !sent) && !json) {
    return absl::UnavailableError(absl::StrCat("etcd at ", endpoint_, ": ", path, ": HTTP ",
                                               res.status, " ", httplib::to_string(error)));
  }
  return reply;
}

absl::StatusOr<int64_t> EtcdClient::Put(absl::string_view key, absl::string_view value,
                                        int64_t lease) {
  Json req = {{"key", B64(key)}, {"value", B64(value)}};
  if (lease != 0) req["lease"] = std::to_string(lease);
  absl::StatusOr<std::string> body = Call("/v3/kv/put", req.dump());
  if (!body.ok()) return body.status();
  absl::StatusOr<Json> j = ParseReply(*body);
  if (!j.ok()) return j.status();
  return Int((*j)["header"], "revision");
}

absl::StatusOr<std::optional<EtcdKeyValue>> EtcdClient::Get(absl::string_view key) {
  Json req = {{"key", B64(key)}};
  absl::StatusOr<std::string> body = Call("/v3/kv/range", req.dump());
  if (!body.ok()) return body.status();
  absl::StatusOr<Json> j = ParseReply(*body);
  if (!j.ok()) return j.status();
  if (!j->contains("kvs") || (*j)["kvs"].empty()) return std::optional<EtcdKeyValue>();
  absl::StatusOr<EtcdKeyValue> kv = ParseKv((*j)["kvs"][0]);
  if (!kv.ok()) return kv.status();
  return std::optional<EtcdKeyValue>(*std::move(kv));
}

absl::StatusOr<EtcdClient::Range> EtcdClient::GetPrefix(absl::string_view prefix) {
  if (prefix.empty()) return absl::InvalidArgumentError("etcd GetPrefix: empty prefix");
  Json req = {{"key", B64(prefix)}, {"range_end", B64(EtcdPrefixEnd(prefix))}};
  absl::StatusOr<std::string> body = Call("/v3/kv/range", req.dump());
  if (!body.ok()) return body.status();
  absl::StatusOr<Json> j = ParseReply(*body);
  if (!j.ok()) return j.status();
  Range range;
  range.revision = Int((*j)["header"], "revision");
  if (j->contains("kvs")) {
    for (const Json& item : (*j)["kvs"]) {
      absl::StatusOr<EtcdKeyValue> kv = ParseKv(item);
      if (!kv.ok()) return kv.status();
      range.kvs.push_back(*std::move(kv));
    }
  }
  return range;
}

absl::StatusOr<int64_t> EtcdClient::Delete(absl::string_view key) {
  Json req = {{"key", B64(key)}};
  absl::StatusOr<std::string> body = Call("/v3/kv/deleterange", req.dump());
  if (!body.ok()) return body.status();
  absl::StatusOr<Json> j = ParseReply(*body);
  if (!j.ok()) return j.status();
  return Int(*j, "deleted");
}

absl::StatusOr<int64_t> EtcdClient::DeletePrefix(absl::string_view prefix) {
  if (prefix.empty()) return absl::InvalidArgumentError("etcd DeletePrefix: empty prefix");
  Json req = {{"key", B64(prefix)}, {"range_end", B64(EtcdPrefixEnd(prefix))}};
  absl::StatusOr<std::string> body = Call("/v3/kv/deleterange", req.dump());
  if (!body.ok()) return body.status();
  absl::StatusOr<Json> j = ParseReply(*body);
  if (!j.ok()) return j.status();
  return Int(*j, "deleted");
}

absl::StatusOr<bool> EtcdClient::PutIfAbsent(absl::string_view key, absl::string_view value,
                                             int64_t lease, EtcdKeyValue* current) {
  Json put = {{"key", B64(key)}, {"value", B64(value)}};
  if (lease != 0) put["lease"] = std::to_string(lease);
  // create_revision == 0 holds exactly when the key does not exist.
  Json req = {{"compare",
               Json::array({{{"key", B64(key)}, {"target", "CREATE"}, {"create_revision", "0"}}})},
              {"success", Json::array({{{"requestPut", put}}})},
              {"failure", Json::array({{{"requestRange", {{"key", B64(key)}}}}})}};
  absl::StatusOr<std::string> body = Call("/v3/kv/txn", req.dump());
  if (!body.ok()) return body.status();
  absl::StatusOr<Json> j = ParseReply(*body);
  if (!j.ok()) return j.status();
  const bool succeeded =
      j->contains("succeeded") && (*j)["succeeded"].is_boolean() && (*j)["succeeded"].get<bool>();
  if (succeeded && current != nullptr) {
    *current = EtcdKeyValue{.key = std::string(key),
                            .value = std::string(value),
                            .create_revision = Int((*j)["header"], "revision"),
                            .mod_revision = Int((*j)["header"], "revision"),
                            .version = 1,
                            .lease = lease};
  }
  if (!succeeded && current != nullptr) {
    *current = EtcdKeyValue();
    const Json& responses = j->value("responses", Json::array());
    if (!responses.empty() && responses[0].contains("response_range")) {
      const Json& range = responses[0]["response_range"];
      if (range.contains("kvs") && !range["kvs"].empty()) {
        absl::StatusOr<EtcdKeyValue> kv = ParseKv(range["kvs"][0]);
        if (!kv.ok()) return kv.status();
        *current = *std::move(kv);
      }
    }
  }
  return succeeded;
}

absl::StatusOr<bool> EtcdClient::DeleteIfCreatedAt(absl::string_view key, int64_t create_revision) {
  Json req = {{"compare", Json::array({{{"key", B64(key)},
                                        {"target", "CREATE"},
                                        {"create_revision", std::to_string(create_revision)}}})},
              {"success", Json::array({{{"requestDeleteRange", {{"key", B64(key)}}}}})}};
  absl::StatusOr<std::string> body = Call("/v3/kv/txn", req.dump());
  if (!body.ok()) return body.status();
  absl::StatusOr<Json> j = ParseReply(*body);
  if (!j.ok()) return j.status();
  return j->contains("succeeded") && (*j)["succeeded"].is_boolean() &&
         (*j)["succeeded"].get<bool>();
}

absl::StatusOr<EtcdLease> EtcdClient::GrantLease(absl::Duration ttl) {
  const int64_t seconds =
      std::max<int64_t>(1, static_cast<int64_t>(std::ceil(absl::ToDoubleSeconds(ttl))));
  Json req = {{"TTL", std::to_string(seconds)}};
  absl::StatusOr<std::string> body = Call("/v3/lease/grant", req.dump());
  if (!body.ok()) return body.status();
  absl::StatusOr<Json> j = ParseReply(*body);
  if (!j.ok()) return j.status();
  EtcdLease lease;
  lease.id = Int(*j, "ID");
  lease.ttl = absl::Seconds(Int(*j, "TTL"));
  if (lease.id == 0)
    return absl::InternalError(absl::StrCat("etcd: lease grant without ID: ", *body));
  return lease;
}

absl::StatusOr<absl::Duration> EtcdClient::KeepAliveOnce(int64_t lease) {
  Json req = {{"ID", std::to_string(lease)}};
  absl::StatusOr<std::string> body = Call("/v3/lease/keepalive", req.dump());
  if (!body.ok()) return body.status();
  // The gateway streams; a single request gives one newline-terminated message.
  std::string first = body->substr(0, body->find('\n'));
  absl::StatusOr<Json> j = ParseReply(first);
  if (!j.ok()) return j.status();
  const Json& result = j->contains("result") ? (*j)["result"] : *j;
  if (result.contains("error")) return EtcdError(result);
  const int64_t ttl = Int(result, "TTL");
  if (ttl <= 0) {
    return absl::NotFoundError(absl::StrFormat("etcd: lease %d has expired or was revoked", lease));
  }
  return absl::Seconds(ttl);
}

absl::Status EtcdClient::RevokeLease(int64_t lease) {
  Json req = {{"ID", std::to_string(lease)}};
  // etcd 3.5 and later serve /v3/lease/revoke; 3.4 serves it under /v3/kv/.
  absl::StatusOr<std::string> body = Call("/v3/lease/revoke", req.dump());
  if (body.ok() && body->empty()) body = absl::UnimplementedError("empty");
  if (!body.ok() && absl::IsUnimplemented(body.status())) {
    body = Call("/v3/kv/lease/revoke", req.dump());
  }
  if (!body.ok()) return body.status();
  absl::StatusOr<Json> j = ParseReply(*body);
  if (absl::IsNotFound(j.status())) return absl::OkStatus();
  return j.status();
}

absl::Status EtcdClient::Watch(absl::string_view prefix, int64_t start_revision,
                               const std::function<bool(const std::vector<EtcdEvent>&)>& on_events,
                               const std::atomic<bool>& stop, absl::Duration poll) {
  if (prefix.empty()) return absl::InvalidArgumentError("etcd Watch: empty prefix");
  Json create = {{"key", B64(prefix)}, {"range_end", B64(EtcdPrefixEnd(prefix))}};
  if (start_revision > 0) create["start_revision"] = std::to_string(start_revision);
  httplib::Client client(where_->host, where_->port);
  SetTimeouts(client, timeout_);
  // The stream is idle between events: no read deadline; `stop` ends it through client.stop().
  client.set_read_timeout(24 * 3600, 0);

  std::string buffer;
  absl::Status result = absl::OkStatus();
  bool ended_by_caller = false;
  httplib::Request req;
  req.method = "POST";
  req.path = "/v3/watch";
  req.body = Json{{"create_request", create}}.dump();
  req.set_header("Content-Type", "application/json");
  req.content_receiver = [&](const char* data, size_t length, uint64_t, uint64_t) {
    buffer.append(data, length);
    size_t newline;
    while ((newline = buffer.find('\n')) != std::string::npos) {
      std::string line = buffer.substr(0, newline);
      buffer.erase(0, newline + 1);
      absl::StatusOr<Json> j = ParseReply(line);
      if (!j.ok()) {
        result = j.status();
        return false;
      }
      const Json& r = j->contains("result") ? (*j)["result"] : *j;
      if (r.contains("error")) {
        result = EtcdError(r);
        return false;
      }
      if (Int(r, "compact_revision") > 0) {
        result = absl::OutOfRangeError(
            absl::StrFormat("etcd watch: revision %d was compacted (oldest kept: %d)",
                            start_revision, Int(r, "compact_revision")));
        return false;
      }
      if (r.value("canceled", false)) {
        result = absl::UnavailableError("etcd watch: canceled by the server");
        return false;
      }
      if (!r.contains("events")) continue;
      std::vector<EtcdEvent> events;
      for (const Json& e : r["events"]) {
        EtcdEvent event;
        event.type =
            e.value("type", "") == "DELETE" ? EtcdEvent::Type::kDelete : EtcdEvent::Type::kPut;
        absl::StatusOr<EtcdKeyValue> kv = ParseKv(e.value("kv", Json::object()));
        if (!kv.ok()) {
          result = kv.status();
          return false;
        }
        event.kv = *std::move(kv);
        events.push_back(std::move(event));
      }
      if (!events.empty() && !on_events(events)) {
        ended_by_caller = true;
        return false;
      }
    }
    return !stop.load();
  };

  std::atomic<bool> done{false};
  std::thread stopper([&] {
    while (!done.load()) {
      if (stop.load()) {
        client.stop();
        return;
      }
      std::this_thread::sleep_for(absl::ToChronoMilliseconds(poll));
    }
  });
  httplib::Response res;
  httplib::Error error = httplib::Error::Success;
  const bool sent = client.send(req, res, error);
  done.store(true);
  stopper.join();
  if (ended_by_caller || stop.load()) return absl::OkStatus();
  if (!result.ok()) return result;
  if (!sent) {
    return absl::UnavailableError(
        absl::StrCat("etcd watch at ", endpoint_, ": ", httplib::to_string(error)));
  }
  return absl::UnavailableError(absl::StrCat("etcd watch at ", endpoint_, ": stream ended"));
}

}  // namespace tokenlake::service
