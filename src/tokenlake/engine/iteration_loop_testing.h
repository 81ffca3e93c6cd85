// Test support for IterationLoop (test-only header): a naive model of generation and a fake
// executor that runs it over the KV context the loop hands it, so that any bookkeeping error of
// the loop or of its control plane (wrong cached prefix, wrong tail rows, a segment stored
// wrong or not where the plan says) changes the generated tokens.
#ifndef TOKENLAKE_ENGINE_ITERATION_LOOP_TESTING_H_
#define TOKENLAKE_ENGINE_ITERATION_LOOP_TESTING_H_

#include <cstdint>
#include <set>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/iteration_loop.h"

namespace tokenlake::engine::testing_loop {

inline constexpr int32_t kVocab = 37;

// The next token after `context` in the naive model.
inline int32_t NextToken(const std::vector<int32_t>& context) {
  uint64_t h = 1469598103934665603ull;
  for (int32_t t : context) h = (h ^ static_cast<uint64_t>(t + 1)) * 1099511628211ull;
  return static_cast<int32_t>(h % kVocab);
}

// Generated tokens of one request, without any pool or batching.
inline std::vector<int32_t> Naive(std::vector<int32_t> seq, int32_t max_new) {
  std::vector<int32_t> out;
  for (int32_t i = 0; i < max_new; ++i) {
    out.push_back(NextToken(seq));
    seq.push_back(out.back());
  }
  return out;
}

// With `slots` > 0 the executor keeps tails in the pool (IterationLoopOptions::tails_in_pool)
// as a device executor does: each instance has `slots` slots, held by stored segments and by
// tail blocks (one per S rows of a tail, on the instances the plan names), and any slot taken
// beyond the capacity (the data plane out of step with the lake's accounting) is an error.
class FakeExecutor final : public IterationExecutor {
 public:
  FakeExecutor(int32_t segment_tokens, int32_t num_instances, int32_t slots = 0)
      : s_(segment_tokens),
        slots_(slots),
        stores_(static_cast<size_t>(num_instances)),
        tail_slots_(static_cast<size_t>(num_instances), 0) {}

  absl::Status BeginSequence(RequestId r, int64_t) override {
    tails_[r].clear();
    blocks_[r].clear();
    return absl::OkStatus();
  }
  DataPlaneCounters EndSequence(RequestId r) override {
    for (const Block& b : blocks_[r]) {
      if (b.live) --tail_slots_[static_cast<size_t>(b.instance.value())];
    }
    blocks_.erase(r);
    tails_.erase(r);
    decoding_.erase(r);
    return {};
  }
  absl::Status DropTailRows(RequestId r, int64_t rows) override {
    auto& t = tails_.at(r);
    if (rows < 0 || rows > static_cast<int64_t>(t.size())) {
      return absl::InternalError("drop beyond the tail");
    }
    t.erase(t.begin(), t.begin() + rows);
    if (slots_ > 0) {
      if (rows % s_ != 0) return absl::InternalError("a tail drop of part of a block");
      auto& blocks = blocks_[r];
      for (int64_t i = 0; i < rows / s_ && !blocks.empty(); ++i) {
        if (blocks.front().live) {
          --tail_slots_[static_cast<size_t>(blocks.front().instance.value())];
        }
        blocks.erase(blocks.begin());
      }
    }
    return absl::OkStatus();
  }
  absl::StatusOr<std::vector<WorkOutput>> Run(absl::Span<const IterationWork> batch) override {
    Batch b;
    std::set<RequestId> in_batch;
    for (const IterationWork& w : batch) {
      b.tokens += static_cast<int64_t>(w.tokens.size());
      in_batch.insert(w.request);
      b.all_decodes = b.all_decodes && decoding_.contains(w.request);
    }
    // Decodes first: a batch with other work holds every request waiting for a decode.
    b.left_out_decodes = 0;
    for (RequestId r : decoding_) b.left_out_decodes += in_batch.contains(r) ? 0 : 1;
    b.requests = static_cast<int32_t>(batch.size());
    batches.push_back(b);
    std::vector<WorkOutput> out;
    for (const IterationWork& w : batch) {
      if (slots_ > 0) {
        // The tail's blocks: those it has are the plan's first ones, the rest are taken now.
        auto& blocks = blocks_[w.request];
        const auto& want = w.plan->tail_slots;
        const auto rows = static_cast<int64_t>(tails_.at(w.request).size() + w.tokens.size());
        if (static_cast<int64_t>(want.size()) != (rows + s_ - 1) / s_ ||
            blocks.size() > want.size()) {
          return absl::InternalError(absl::StrFormat(
              "request %d: the plan names %d tail blocks for %d rows; the tail has %d",
              w.request.value(), want.size(), rows, blocks.size()));
        }
        for (size_t i = 0; i < want.size(); ++i) {
          if (i < blocks.size()) {
            if (blocks[i].instance != want[i]) return absl::InternalError("tail block moved");
            continue;
          }
          blocks.push_back({want[i], true});
          TOKENLAKE_RETURN_IF_ERROR(Take(want[i], "tail block"));
          ++tail_slots_[static_cast<size_t>(want[i].value())];
        }
      }
      std::vector<int32_t> context;
      for (const plan::SegmentAssignment& a : w.plan->segments) {
        const auto& st = stores_[static_cast<size_t>(a.holder.value())];
        auto it = st.find(a.segment);
        if (it == st.end()) return absl::NotFoundError("cached segment not on its holder");
        context.insert(context.end(), it->second.begin(), it->second.end());
      }
      auto& tail = tails_.at(w.request);
      if (static_cast<int64_t>(context.size() + tail.size()) != w.start_pos) {
        return absl::InternalError(
            absl::StrFormat("request %d: context of %d + %d tokens before position %d",
                            w.request.value(), context.size(), tail.size(), w.start_pos));
      }
      tail.insert(tail.end(), w.tokens.begin(), w.tokens.end());
      context.insert(context.end(), tail.begin(), tail.end());
      // Like a device executor: the full logits only where the loop asks for them.
      WorkOutput o;
      if (w.want_logits) {
        o.next_token = NextToken(context);
        if (w.want_full_logits) {
          o.logits.assign(kVocab, 0.0f);
          o.logits[static_cast<size_t>(o.next_token)] = 1.0f;
          ++full_logits;
        }
        decoding_.insert(w.request);
      } else {
        decoding_.erase(w.request);
      }
      out.push_back(std::move(o));
    }
    return out;
  }
  absl::StatusOr<int64_t> StoreSegment(RequestId r, InstanceId, int64_t first_row,
                                       InstanceId target, SegmentId segment,
                                       const StoredMeta&) override {
    const auto& t = tails_.at(r);
    if (first_row < 0 || first_row + s_ > static_cast<int64_t>(t.size())) {
      return absl::InternalError("segment rows outside the tail");
    }
    if (slots_ > 0) {
      Block& b = blocks_[r].at(static_cast<size_t>(first_row / s_));
      if (!b.live) return absl::InternalError("a tail block stored twice");
      b.live = false;
      --tail_slots_[static_cast<size_t>(b.instance.value())];
      if (b.instance == target) {
        ++in_place;  // the block is the segment's slot now
      } else {
        TOKENLAKE_RETURN_IF_ERROR(Take(target, "copy of a tail block"));
        ++copied;
      }
    }
    stores_[static_cast<size_t>(target.value())][segment] =
        std::vector<int32_t>(t.begin() + first_row, t.begin() + first_row + s_);
    return int64_t{s_};
  }
  absl::Status FreeSegment(InstanceId, InstanceId target, SegmentId segment, uint64_t) override {
    return stores_[static_cast<size_t>(target.value())].erase(segment) == 1
               ? absl::OkStatus()
               : absl::NotFoundError("free of a segment not stored");
  }

  struct Batch {
    int64_t tokens = 0;
    int32_t requests = 0;
    bool all_decodes = true;
    int32_t left_out_decodes = 0;
  };
  std::vector<Batch> batches;
  // Sequences begun and not ended (their KV tails).
  int64_t open_sequences() const { return static_cast<int64_t>(tails_.size()); }
  // Outputs returned with full logits (the first and last of each request).
  int64_t full_logits = 0;
  // Tails in the pool: tail blocks committed in place and copied elsewhere; blocks held now.
  int64_t in_place = 0;
  int64_t copied = 0;
  int64_t tail_blocks() const {
    int64_t n = 0;
    for (int64_t t : tail_slots_) n += t;
    return n;
  }

 private:
  struct Block {
    InstanceId instance;
    bool live = true;  // still the tail's (not the segment's slot, not given back)
  };
  // A slot of `instance` for `what`: an error beyond its capacity.
  absl::Status Take(InstanceId instance, const char* what) {
    const auto i = static_cast<size_t>(instance.value());
    if (static_cast<int64_t>(stores_[i].size()) + tail_slots_[i] + 1 > slots_) {
      return absl::InternalError(
          absl::StrFormat("instance %d: no slot for a %s (%d segments, %d tail blocks, %d slots)",
                          instance.value(), what, stores_[i].size(), tail_slots_[i], slots_));
    }
    return absl::OkStatus();
  }
  int32_t s_;
  int32_t slots_;
  absl::flat_hash_map<RequestId, std::vector<int32_t>> tails_;
  std::set<RequestId> decoding_;  // last ran to the end of its sequence, not finished
  std::vector<absl::flat_hash_map<SegmentId, std::vector<int32_t>>> stores_;
  std::vector<int64_t> tail_slots_;
  absl::flat_hash_map<RequestId, std::vector<Block>> blocks_;
};

}  // namespace tokenlake::engine::testing_loop

#endif  // TOKENLAKE_ENGINE_ITERATION_LOOP_TESTING_H_
