// How a pool over a Llama-architecture model is shaped: the attention shape its lake's planner
// costs, the layout of its KV slots and the lake's options. The CPU engine, the GPU engine, the
// cluster's instances and its coordinator all derive them here, so that a coordinator's lake
// and the instances' slots agree by construction.
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_ENGINE_POOL_SHAPE_H_
#define TOKENLAKE_ENGINE_POOL_SHAPE_H_

#include <cstdint>

#include "tokenlake/attention/attention.h"
#include "tokenlake/engine/llama_config.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/plan/cost_model.h"

namespace tokenlake::engine {

// The model's attention shape with KV elements of `kv_dtype` (plan costs: bytes and FLOPs).
plan::ModelShape PoolModelShape(const LlamaConfig& config, attention::KvDtype kv_dtype);

// The layout of one slot: a segment of `segment_tokens` tokens' K and V over every layer.
// (Validate it: a bad segment_tokens is the caller's input.)
attention::KvSlotLayout PoolSlotLayout(const LlamaConfig& config, int32_t segment_tokens,
                                       attention::KvDtype kv_dtype);

// Tokens per segment where the user names none: 16 on the CPU (the reuse granularity of a host
// pool); 256 on a GPU, where a segment is a unit of the attention kernels' key loop, of the
// plans' segment lists and of the data plane's locate and store messages, and 16-token
// segments make a batched workload about 2.5x slower (docs/results-engine.md). The price: a
// shared prefix is reused in whole segments, so one shorter than 256 tokens is not.
inline constexpr int32_t kDefaultCpuSegmentTokens = 16;
inline constexpr int32_t kDefaultGpuSegmentTokens = 256;
// The default for a pool on a GPU (`gpu`) or on the CPU.
inline constexpr int32_t DefaultSegmentTokens(bool gpu) {
  return gpu ? kDefaultGpuSegmentTokens : kDefaultCpuSegmentTokens;
}

// The size of a pool: instances, tokens per segment, slots per instance.
struct PoolSize {
  int32_t num_instances = 1;
  int32_t segment_tokens = 16;
  int32_t slots_per_instance = 1024;
};

// The lake's options for a pool of `size` over the model with `kv_dtype` KV; the heavy-hitter
// tracker and the balancer keep LakeOptions' defaults (callers may set them).
lake::LakeOptions PoolLakeOptions(const LlamaConfig& config, const PoolSize& size,
                                  attention::KvDtype kv_dtype);

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_POOL_SHAPE_H_
