// Segment ids: the chained hashes that name segments of a token sequence.
//
// A sequence is cut into segments of `segment_tokens` consecutive tokens; the newest tokens may
// form a trailing part-segment (fewer tokens). Each segment's id hashes its parent's id and its
// own tokens:
//
//   id(-1) = salt                       (NamespaceSalt(model or namespace name))
//   id(k)  = XXH3(tokens of segment k, seed = id(k-1))
//
// so two segments share an id exactly when the whole prefix up to and including them is
// identical (up to 64-bit hash collisions), which is exactly when their KV cache is identical.
// Consequences callers rely on:
//   - the same prefix gives the same ids (deduplication: one id, one stored copy);
//   - one differing token changes the id of its segment and of every later segment;
//   - a part-segment's id differs from the id of the full segment that later replaces it
//     (different tokens are hashed), so a part-segment is always a leaf of the prefix tree.
// The invalid SegmentId value (all bits set) is never produced: a hash equal to it is remapped.
//
// Thread-safety: pure functions; safe from any thread.
#ifndef TOKENLAKE_INDEX_SEGMENT_ID_H_
#define TOKENLAKE_INDEX_SEGMENT_ID_H_

#include <cstdint>
#include <ostream>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/base/ids.h"

namespace tokenlake::index {

// One segment of a sequence: its chained id and how many tokens it holds.
// num_tokens == the segment size for a full segment; 1 <= num_tokens < segment size only for a
// trailing part-segment.
struct SegmentKey {
  SegmentId id;
  int32_t num_tokens = 0;

  friend bool operator==(const SegmentKey& a, const SegmentKey& b) = default;
  friend std::ostream& operator<<(std::ostream& os, const SegmentKey& key) {
    return os << "{" << key.id << ", " << key.num_tokens << " tokens}";
  }
};

// The salt that starts every chain of one model or namespace: XXH3 of the name (seed 0).
// Different models must use different salts so that their KV never dedups together.
uint64_t NamespaceSalt(std::string_view model_or_namespace);

// The salt of one tenant's chains within a namespace: `namespace_salt` itself for an empty
// `cache_salt` (everyone shares), otherwise XXH3 of the cache salt seeded with the namespace's
// salt (never equal to namespace_salt, never 0). Two requests share segments exactly when their
// namespace and cache salt are equal, so one tenant's prompts neither hit nor reveal another's.
uint64_t TenantSalt(uint64_t namespace_salt, std::string_view cache_salt);

// The id of one segment given its parent's id (or the salt, for the first segment) and its
// tokens. Used to extend a chain incrementally (e.g. a decoding sequence completing a segment).
// REQUIRES: nothing; an empty span hashes to a (useless but well-defined) id.
SegmentId ChainSegmentId(uint64_t parent_id_or_salt, absl::Span<const int32_t> segment_tokens);

// Cuts `tokens` into full segments of `segment_tokens` plus a trailing part-segment holding the
// remainder (if any), and returns their chained keys in order. Empty `tokens` -> empty vector.
// Errors: InvalidArgument if segment_tokens <= 0.
absl::StatusOr<std::vector<SegmentKey>> ComputeSegmentKeys(uint64_t salt,
                                                           absl::Span<const int32_t> tokens,
                                                           int32_t segment_tokens);

// Keys for a trace that already names each block of `block_tokens` tokens with a hash (the
// Mooncake traces: `hash_ids`, one per 512-token block, and `input_length`). The block hashes are
// chained again (id(k) = HashCombine(id(k-1), block_hashes[k]), id(-1) = salt) so the dedup
// invariant above holds even if the trace's own hashes are not prefix-chained. All blocks are
// full except the last, which gets the remainder total_tokens - block_tokens * (n - 1).
// No blocks and total_tokens == 0 -> empty vector.
// Errors: InvalidArgument (the message names the numbers) if block_tokens <= 0, total_tokens < 0,
//   or total_tokens does not fit n blocks, i.e. total_tokens > n * block_tokens or
//   total_tokens <= (n - 1) * block_tokens.
absl::StatusOr<std::vector<SegmentKey>> KeysFromBlockHashes(uint64_t salt,
                                                            absl::Span<const uint64_t> block_hashes,
                                                            int32_t block_tokens,
                                                            int64_t total_tokens);

// The ids of `keys`, in order (convenience for PrefixTree::Match and pinning).
std::vector<SegmentId> IdsOf(absl::Span<const SegmentKey> keys);

}  // namespace tokenlake::index

#endif  // TOKENLAKE_INDEX_SEGMENT_ID_H_
