#include "tokenlake/service/api_keys.h"

#include <openssl/crypto.h>

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace tokenlake::service {

absl::StatusOr<std::shared_ptr<const ApiKeys>> ApiKeys::Load(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("API key file ", path, " cannot be read"));
  std::stringstream text;
  text << in.rdbuf();
  return Parse(text.str(), path);
}

absl::StatusOr<std::shared_ptr<const ApiKeys>> ApiKeys::Parse(absl::string_view text,
                                                              const std::string& name) {
  auto keys = std::shared_ptr<ApiKeys>(new ApiKeys());
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    const std::string where = absl::StrCat(name, ":", line_no);
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    ApiKey k;
    k.key = std::string(fields[0]);
    if (k.key.size() < 8) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": the key is shorter than 8 characters"));
    }
    for (size_t i = 1; i < fields.size(); ++i) {
      std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(fields[i], '=');
      if (kv.first == "tenant" && !kv.second.empty()) {
        k.tenant = std::string(kv.second);
      } else if (kv.first == "max_concurrent" && absl::SimpleAtoi(kv.second, &k.max_concurrent) &&
                 k.max_concurrent >= 0) {
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": '", kv.first,
                         "' is not tenant=NAME or max_concurrent=N (N >= 0) after the key"));
      }
    }
    for (const ApiKey& other : keys->keys_) {
      if (other.key == k.key) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": the key is listed twice"));
      }
    }
    keys->keys_.push_back(std::move(k));
  }
  if (keys->keys_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": no API key in the file"));
  }
  keys->in_flight_ = std::make_unique<std::atomic<int32_t>[]>(keys->keys_.size());
  return std::shared_ptr<const ApiKeys>(std::move(keys));
}

int ApiKeys::Find(absl::string_view authorization) const {
  absl::string_view given = absl::StripAsciiWhitespace(authorization);
  if (!absl::ConsumePrefix(&given, "Bearer ") && !absl::ConsumePrefix(&given, "bearer ")) {
    return -1;
  }
  given = absl::StripAsciiWhitespace(given);
  int found = -1;
  // Every key is compared, each in constant time, so timing says nothing about the keys.
  for (size_t i = 0; i < keys_.size(); ++i) {
    const std::string& key = keys_[i].key;
    if (key.size() == given.size() && CRYPTO_memcmp(key.data(), given.data(), key.size()) == 0) {
      found = static_cast<int>(i);
    }
  }
  return found;
}

}  // namespace tokenlake::service
