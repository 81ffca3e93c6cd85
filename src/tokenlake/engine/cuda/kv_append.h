// AppendKvRows: scatters a batch's new K and V rows into each sequence's own KV tail, one
// launch per layer for the whole batch (instead of two copies per sequence).
//
// Thread-safety: enqueues on the given stream; pointers are device pointers, borrowed until the
// enqueued work has run.
#ifndef TOKENLAKE_ENGINE_CUDA_KV_APPEND_H_
#define TOKENLAKE_ENGINE_CUDA_KV_APPEND_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace tokenlake::engine::cuda {

// Where token row t of a batch goes: its K row of layer l at k0 + l * layer_stride, its V row
// at that address + v_offset (bytes; a tail laid out [layer][kv][capacity][row]: k0 = tail +
// position * row_bytes, layer_stride = 2 * capacity * row_bytes, v_offset = capacity *
// row_bytes). 24 bytes, trivially copyable.
struct KvRowDestination {
  uint64_t k0 = 0;  // device address
  int64_t layer_stride = 0;
  int64_t v_offset = 0;
};
static_assert(sizeof(KvRowDestination) == 24);

// Copies rows k[t] and v[t] (each `row_bytes` bytes: num_kv_heads * head_dim bf16) of the
// `num_rows` rows to their destinations at `layer`. row_bytes must be a positive multiple of
// 16, and every address 16-byte aligned. pdl: launched with programmatic dependent launch
// (attention/cuda/pdl.cuh; the kernel waits for the one before it before touching anything).
// Errors: InvalidArgument (num_rows < 0, row_bytes not a positive multiple of 16, a null
//   pointer with num_rows > 0), Internal (launch failure).
absl::Status AppendKvRows(const KvRowDestination* destinations, int32_t num_rows, int32_t layer,
                          const void* k, const void* v, int64_t row_bytes, cudaStream_t stream,
                          bool pdl = false);

}  // namespace tokenlake::engine::cuda

#endif  // TOKENLAKE_ENGINE_CUDA_KV_APPEND_H_
