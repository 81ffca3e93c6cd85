#include "tokenlake/index/segment_id.h"

#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/hash.h"

namespace tokenlake::index {
namespace {

// Never hand out the invalid sentinel as a real id.
SegmentId ToSegmentId(uint64_t hash) {
  if (hash == std::numeric_limits<uint64_t>::max()) hash -= 1;
  return SegmentId(hash);
}

}  // namespace

uint64_t NamespaceSalt(std::string_view model_or_namespace) {
  return HashString(model_or_namespace, /*seed=*/0);
}

uint64_t TenantSalt(uint64_t namespace_salt, std::string_view cache_salt) {
  if (cache_salt.empty()) return namespace_salt;
  uint64_t salt = HashString(cache_salt, namespace_salt);
  if (salt == namespace_salt || salt == 0) salt = ~salt ^ 0x9e3779b97f4a7c15ULL;
  return salt;
}

SegmentId ChainSegmentId(uint64_t parent_id_or_salt, absl::Span<const int32_t> segment_tokens) {
  return ToSegmentId(
      HashBytes(segment_tokens.data(), segment_tokens.size() * sizeof(int32_t), parent_id_or_salt));
}

absl::StatusOr<std::vector<SegmentKey>> ComputeSegmentKeys(uint64_t salt,
                                                           absl::Span<const int32_t> tokens,
                                                           int32_t segment_tokens) {
  if (segment_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("ComputeSegmentKeys: segment_tokens must be > 0, got %d", segment_tokens));
  }
  std::vector<SegmentKey> keys;
  keys.reserve((tokens.size() + segment_tokens - 1) / segment_tokens);
  uint64_t parent = salt;
  for (size_t begin = 0; begin < tokens.size(); begin += segment_tokens) {
    const size_t len = std::min<size_t>(segment_tokens, tokens.size() - begin);
    const SegmentId id = ChainSegmentId(parent, tokens.subspan(begin, len));
    keys.push_back(SegmentKey{id, static_cast<int32_t>(len)});
    parent = id.value();
  }
  return keys;
}

absl::StatusOr<std::vector<SegmentKey>> KeysFromBlockHashes(uint64_t salt,
                                                            absl::Span<const uint64_t> block_hashes,
                                                            int32_t block_tokens,
                                                            int64_t total_tokens) {
  if (block_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KeysFromBlockHashes: block_tokens must be > 0, got %d", block_tokens));
  }
  if (total_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KeysFromBlockHashes: total_tokens must be >= 0, got %d", total_tokens));
  }
  const int64_t n = static_cast<int64_t>(block_hashes.size());
  if (total_tokens > n * block_tokens || (n > 0 && total_tokens <= (n - 1) * block_tokens)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KeysFromBlockHashes: total_tokens %d does not fit %d blocks of %d tokens (needs %d < "
        "total_tokens <= %d)",
        total_tokens, n, block_tokens, n > 0 ? (n - 1) * block_tokens : 0, n * block_tokens));
  }
  std::vector<SegmentKey> keys;
  keys.reserve(block_hashes.size());
  uint64_t parent = salt;
  for (int64_t k = 0; k < n; ++k) {
    const SegmentId id = ToSegmentId(HashCombine(parent, block_hashes[k]));
    const int64_t len = k + 1 < n ? block_tokens : total_tokens - block_tokens * (n - 1);
    keys.push_back(SegmentKey{id, static_cast<int32_t>(len)});
    parent = id.value();
  }
  return keys;
}

std::vector<SegmentId> IdsOf(absl::Span<const SegmentKey> keys) {
  std::vector<SegmentId> ids;
  ids.reserve(keys.size());
  for (const SegmentKey& key : keys) ids.push_back(key.id);
  return ids;
}

}  // namespace tokenlake::index
