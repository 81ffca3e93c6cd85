// Test support for the GPU tests of paged_attention.h (paged_attention_test.cc,
// paged_attention_plan_test.cc): device buffers, workspace preparation, uploads of random K/V
// blocks and the comparison with the float64 CPU reference (attention_reference.h).
#ifndef TOKENLAKE_ATTENTION_CUDA_PAGED_ATTENTION_TESTING_H_
#define TOKENLAKE_ATTENTION_CUDA_PAGED_ATTENTION_TESTING_H_

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/attention/attention_reference.h"
#include "tokenlake/attention/bf16.h"
#include "tokenlake/attention/cuda/paged_attention.h"

namespace tokenlake::attention::cuda {

inline constexpr float kInf = std::numeric_limits<float>::infinity();

inline bool HaveGpu() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return count > 0;
}

#define TOKENLAKE_SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device"

#define TOKENLAKE_CUDA_OK(expr) \
  ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(cudaGetLastError())

// A device buffer freed at scope exit.
struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) {
    if (bytes > 0 && cudaMalloc(&ptr, bytes) != cudaSuccess) ptr = nullptr;
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

struct Shape {
  int num_heads;
  int num_kv_heads;
  int head_dim;
  int block_tokens;
};

inline std::string ShapeName(const ::testing::TestParamInfo<Shape>& info) {
  const Shape& s = info.param;
  return absl::StrFormat("H%d_KV%d_D%d_S%d", s.num_heads, s.num_kv_heads, s.head_dim,
                         s.block_tokens);
}

// A workspace as the header asks for: counter bytes zero, the rest poisoned with NaN (so a
// partial read before it is written shows).
inline void PrepareWorkspace(void* ws, size_t bytes) {
  if (bytes == 0) return;
  ASSERT_GE(bytes, kPagedAttentionCounterBytes);
  TOKENLAKE_CUDA_OK(cudaMemset(ws, 0, kPagedAttentionCounterBytes));
  TOKENLAKE_CUDA_OK(cudaMemset(static_cast<char*>(ws) + kPagedAttentionCounterBytes, 0xff,
                               bytes - kPagedAttentionCounterBytes));
}

// Expects the workspace's counter bytes to be zero again after a call.
inline void ExpectCountersZero(const void* ws, size_t bytes) {
  if (bytes == 0) return;
  std::vector<uint32_t> counters(kPagedAttentionCounterBytes / 4);
  TOKENLAKE_CUDA_OK(
      cudaMemcpy(counters.data(), ws, kPagedAttentionCounterBytes, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < counters.size(); ++i) ASSERT_EQ(counters[i], 0u) << "counter " << i;
}

// The CPU reference's parameters for a shape's bf16 K/V (defaults for everything else).
inline AttentionParams ReferenceParams(const Shape& s) {
  AttentionParams ap;
  ap.num_heads = s.num_heads;
  ap.num_kv_heads = s.num_kv_heads;
  ap.head_dim = s.head_dim;
  ap.kv_dtype = KvDtype::kBFloat16;
  return ap;
}

// Copies host K/V (`[block][k, v][block_elems]` bf16 bits) to d_kv and the blocks' descriptors
// (block b over d_kv, lens[b] valid rows) to d_blocks; both buffers are large enough.
inline void UploadBlocks(const std::vector<uint16_t>& kv, const std::vector<int>& lens,
                         size_t block_elems, const DeviceBuffer& d_kv,
                         const DeviceBuffer& d_blocks) {
  ASSERT_NE(d_kv.ptr, nullptr);
  TOKENLAKE_CUDA_OK(cudaMemcpy(d_kv.ptr, kv.data(), kv.size() * 2, cudaMemcpyHostToDevice));
  std::vector<DeviceKvBlock> dev_blocks(lens.size());
  for (size_t b = 0; b < lens.size(); ++b) {
    dev_blocks[b].k = d_kv.as<uint16_t>() + (2 * b) * block_elems;
    dev_blocks[b].v = d_kv.as<uint16_t>() + (2 * b + 1) * block_elems;
    dev_blocks[b].num_tokens = lens[b];
  }
  if (!lens.empty()) {
    TOKENLAKE_CUDA_OK(cudaMemcpy(d_blocks.ptr, dev_blocks.data(),
                                 sizeof(DeviceKvBlock) * lens.size(), cudaMemcpyHostToDevice));
  }
}

// Checks a partial (out [rows][head_dim], lse [rows]) against the float64 reference: every element
// written (no NaN poison left), rows without keys exactly out 0 and lse -inf, the others' LSE
// within 2e-3 (relative) and out within a relative L2 error of 1e-2.
inline void ExpectMatchesReference(absl::Span<const float> out, absl::Span<const float> lse,
                                   absl::Span<const float> ref_out, absl::Span<const float> ref_lse,
                                   int head_dim) {
  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    ASSERT_FALSE(std::isnan(out[i])) << "out[" << i << "] not written or NaN";
    const double d = static_cast<double>(out[i]) - ref_out[i];
    err2 += d * d;
    ref2 += static_cast<double>(ref_out[i]) * ref_out[i];
  }
  for (size_t r = 0; r < lse.size(); ++r) {
    ASSERT_FALSE(std::isnan(lse[r])) << "lse[" << r << "] not written or NaN";
    if (ref_lse[r] == -kInf) {
      ASSERT_EQ(lse[r], -kInf) << "row " << r;
      for (int d = 0; d < head_dim; ++d) ASSERT_EQ(out[r * head_dim + d], 0.f) << "row " << r;
    } else {
      ASSERT_NEAR(lse[r], ref_lse[r], 2e-3 * std::max(1.0f, std::fabs(ref_lse[r]))) << "row " << r;
    }
  }
  if (ref2 > 0) {
    EXPECT_LT(std::sqrt(err2 / ref2), 1e-2) << "relative L2 error of out";
  } else {
    EXPECT_EQ(err2, 0.0);
  }
}

// Draws `num_extra` extra partials for `rows` rows of head_dim (PagedAttentionParams::
// num_extra layout: extra_out [e][row][d], extra_lse [e][row]): random outputs, LSEs near the
// reference's (so both weigh in) or -inf (a third of them; a row may have every partial -inf),
// and replaces (ref_out, ref_lse) by the LSE merge of the reference partial and the extras,
// computed in float64 from the merge's definition.
inline void AddRandomExtras(int num_extra, size_t rows, int head_dim, std::mt19937_64& rng,
                            std::vector<float>& extra_out, std::vector<float>& extra_lse,
                            std::vector<float>& ref_out, std::vector<float>& ref_lse) {
  const size_t ne = static_cast<size_t>(num_extra);
  std::normal_distribution<float> normal(0.f, 1.f);
  extra_out.assign(ne * rows * head_dim, 0.f);
  extra_lse.assign(ne * rows, 0.f);
  if (ne == 0) return;
  for (float& v : extra_out) v = normal(rng);
  for (size_t e = 0; e < ne; ++e) {
    for (size_t r = 0; r < rows; ++r) {
      const bool neg_inf = rng() % 3 == 0;
      const float base = ref_lse[r] == -kInf ? 2.f : ref_lse[r];
      extra_lse[e * rows + r] = neg_inf ? -kInf : base + 2.f * normal(rng);
    }
  }
  std::vector<double> acc(head_dim);
  for (size_t r = 0; r < rows; ++r) {
    double m = ref_lse[r];
    for (size_t e = 0; e < ne; ++e) m = std::max(m, static_cast<double>(extra_lse[e * rows + r]));
    if (std::isinf(m)) {  // every partial -inf: out 0, lse -inf
      for (int d = 0; d < head_dim; ++d) ref_out[r * head_dim + d] = 0.f;
      ref_lse[r] = -kInf;
      continue;
    }
    double sum = 0;
    std::fill(acc.begin(), acc.end(), 0.0);
    auto fold = [&](double l, const float* o) {
      const double w = std::exp(l - m);  // exp(-inf) = 0: a -inf partial adds nothing
      sum += w;
      for (int d = 0; d < head_dim; ++d) acc[d] += w * o[d];
    };
    fold(ref_lse[r], ref_out.data() + r * head_dim);
    for (size_t e = 0; e < ne; ++e) {
      fold(extra_lse[e * rows + r], extra_out.data() + (e * rows + r) * head_dim);
    }
    for (int d = 0; d < head_dim; ++d) ref_out[r * head_dim + d] = static_cast<float>(acc[d] / sum);
    ref_lse[r] = static_cast<float>(m + std::log(sum));
  }
}

}  // namespace tokenlake::attention::cuda

#endif  // TOKENLAKE_ATTENTION_CUDA_PAGED_ATTENTION_TESTING_H_
