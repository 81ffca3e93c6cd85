// Two ranks of the GPU data plane over NCCL (one process, ranks on GPUs 0 and 1): rank 0 (the
// request's instance) holds the query tokens and, at first, the segments; it migrates the
// segment slots to rank 1 (SendSegment), then sends its queries to rank 1 (the segments' holder
// now), which computes the partial attention over them with attention/cuda's kernel and sends the
// partial (out + lse) back. Rank 0's result is compared with the CPU reference
// (attention_reference.h) on the same bf16 inputs. Needs two GPUs: skips with fewer, saying why.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/attention/attention_reference.h"
#include "tokenlake/attention/bf16.h"
#include "tokenlake/attention/cuda/paged_attention.h"
#include "tokenlake/transport/nccl/nccl_channel.h"

namespace tokenlake::transport::nccl {
namespace {

namespace att = ::tokenlake::attention;
namespace attc = ::tokenlake::attention::cuda;

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(cudaGetLastError())

int GpuCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

class DeviceBuffer {
 public:
  DeviceBuffer(int device, size_t bytes) : device_(device) {
    cudaSetDevice(device);
    if (bytes > 0 && cudaMalloc(&ptr_, bytes) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) {
      cudaSetDevice(device_);
      cudaFree(ptr_);
    }
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  int device_;
  void* ptr_ = nullptr;
};

struct Case {
  int num_q;         // query tokens (decode 1..8, prefill more)
  int num_blocks;    // segments held by rank 1
  int block_tokens;  // S
  int num_heads;
  int num_kv_heads;
  int head_dim;
};

class NcclAttentionTest : public ::testing::TestWithParam<Case> {};

TEST_P(NcclAttentionTest, PartialComputedOnTheHolderMatchesTheCpuReference) {
  if (GpuCount() < 2) {
    GTEST_SKIP() << "needs 2 GPUs (one rank per GPU: queries to the segments' holder, partial "
                    "back); this machine has "
                 << GpuCount();
  }
  const Case& c = GetParam();
  const uint64_t seed = 42 + c.num_q * 7 + c.head_dim;
  SCOPED_TRACE("seed=" + std::to_string(seed));
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);

  absl::StatusOr<std::vector<std::unique_ptr<NcclComm>>> comms = NcclComm::CreateAll({0, 1});
  ASSERT_TRUE(comms.ok()) << comms.status();
  NcclComm& r0 = *(*comms)[0];
  NcclComm& r1 = *(*comms)[1];
  cudaStream_t s0 = nullptr, s1 = nullptr;
  CUDA_OK(cudaSetDevice(0));
  CUDA_OK(cudaStreamCreateWithFlags(&s0, cudaStreamNonBlocking));
  CUDA_OK(cudaSetDevice(1));
  CUDA_OK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));

  // Segments: one layer's K and V per block, [S][kv_heads][D] bf16 each, the last block partial.
  const size_t block_elems = static_cast<size_t>(c.block_tokens) * c.num_kv_heads * c.head_dim;
  const size_t slot_bytes = 2 * block_elems * 2;
  std::vector<int> lens(c.num_blocks, c.block_tokens);
  lens.back() = std::max(1, c.block_tokens / 3);
  std::vector<uint16_t> kv(2 * block_elems * c.num_blocks);
  for (auto& x : kv) x = att::FloatToBf16(normal(rng));
  const size_t q_elems = static_cast<size_t>(c.num_q) * c.num_heads * c.head_dim;
  const size_t rows = static_cast<size_t>(c.num_q) * c.num_heads;
  std::vector<uint16_t> q_bf16(q_elems);
  std::vector<float> q_f32(q_elems);
  for (size_t i = 0; i < q_elems; ++i) {
    q_bf16[i] = att::FloatToBf16(normal(rng) * 1.5f);
    q_f32[i] = att::Bf16ToFloat(q_bf16[i]);
  }

  // CPU reference.
  std::vector<att::KvBlock> host_blocks(c.num_blocks);
  for (int b = 0; b < c.num_blocks; ++b) {
    host_blocks[b] = {kv.data() + 2 * b * block_elems, kv.data() + (2 * b + 1) * block_elems,
                      lens[b]};
  }
  att::AttentionParams ap;
  ap.num_heads = c.num_heads;
  ap.num_kv_heads = c.num_kv_heads;
  ap.head_dim = c.head_dim;
  ap.kv_dtype = att::KvDtype::kBFloat16;
  std::vector<float> ref_out(q_elems), ref_lse(rows);
  ASSERT_TRUE(att::ReferencePartialAttention(ap, c.num_q, q_f32, host_blocks,
                                             absl::MakeSpan(ref_out), absl::MakeSpan(ref_lse))
                  .ok());

  // Rank 0: queries and the segments (to migrate); partial destination poisoned with NaN.
  DeviceBuffer q0(0, q_elems * 2), kv0(0, kv.size() * 2), out0(0, q_elems * 4), lse0(0, rows * 4);
  CUDA_OK(cudaMemcpy(q0.get(), q_bf16.data(), q_elems * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(kv0.get(), kv.data(), kv.size() * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(out0.get(), 0xff, q_elems * 4));
  CUDA_OK(cudaMemset(lse0.get(), 0xff, rows * 4));
  // Rank 1: its arena (slots in shuffled order), query buffer, partial.
  DeviceBuffer kv1(1, kv.size() * 2), q1(1, q_elems * 2), out1(1, q_elems * 4), lse1(1, rows * 4),
      blocks1(1, sizeof(attc::DeviceKvBlock) * c.num_blocks);
  CUDA_OK(cudaMemset(q1.get(), 0xff, q_elems * 2));
  std::vector<int> slot_of(c.num_blocks);
  for (int b = 0; b < c.num_blocks; ++b) slot_of[b] = b;
  std::shuffle(slot_of.begin(), slot_of.end(), rng);

  // 1. Segment migration: every slot 0 -> 1, in one group (both ranks' batches).
  {
    Batch b0(&r0, s0), b1(&r1, s1);
    for (int b = 0; b < c.num_blocks; ++b) {
      ASSERT_TRUE(
          b0.AddSendSegment(1, {kv0.as<char>() + b * slot_bytes, static_cast<int64_t>(slot_bytes)})
              .ok());
      ASSERT_TRUE(b1.AddRecvSegment(0, {kv1.as<char>() + slot_of[b] * slot_bytes,
                                        static_cast<int64_t>(slot_bytes)})
                      .ok());
    }
    // 2. The queries, in the same group after the segments (per-pair order).
    ASSERT_TRUE(
        b0.AddSendQueries(1, {q0.get(), QueryDtype::kBFloat16, c.num_q, c.num_heads, c.head_dim})
            .ok());
    ASSERT_TRUE(
        b1.AddRecvQueries(0, {q1.get(), QueryDtype::kBFloat16, c.num_q, c.num_heads, c.head_dim})
            .ok());
    Batch* all[] = {&b0, &b1};
    absl::Status st = Batch::SubmitAll(all);
    ASSERT_TRUE(st.ok()) << st;
  }
  // 3. Rank 1 computes the partial over its slots, on s1 after the receives (stream order).
  std::vector<attc::DeviceKvBlock> dev_blocks(c.num_blocks);
  for (int b = 0; b < c.num_blocks; ++b) {
    const char* slot = kv1.as<char>() + slot_of[b] * slot_bytes;
    dev_blocks[b].k = slot;
    dev_blocks[b].v = slot + block_elems * 2;
    dev_blocks[b].num_tokens = lens[b];
  }
  CUDA_OK(cudaSetDevice(1));
  CUDA_OK(cudaMemcpy(blocks1.get(), dev_blocks.data(), sizeof(attc::DeviceKvBlock) * c.num_blocks,
                     cudaMemcpyHostToDevice));
  attc::PagedAttentionParams p;
  p.q = q1.get();
  p.num_q_tokens = c.num_q;
  p.blocks = blocks1.as<attc::DeviceKvBlock>();
  p.num_blocks = c.num_blocks;
  p.max_block_tokens = c.block_tokens;
  p.num_heads = c.num_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.out = out1.as<float>();
  p.lse = lse1.as<float>();
  absl::StatusOr<size_t> ws_bytes = attc::PagedAttentionWorkspaceBytes(p);
  ASSERT_TRUE(ws_bytes.ok()) << ws_bytes.status();
  DeviceBuffer ws(1, *ws_bytes);
  if (*ws_bytes > 0) {
    CUDA_OK(cudaMemset(ws.get(), 0, *ws_bytes));
  }
  p.workspace = ws.get();
  p.workspace_bytes = *ws_bytes;
  absl::Status st = attc::PagedAttention(p, attc::AttentionKernel::kAuto, s1);
  ASSERT_TRUE(st.ok()) << st;
  // 4. The partial back to rank 0.
  {
    Batch b0(&r0, s0), b1(&r1, s1);
    ASSERT_TRUE(
        b1.AddSendPartial(0, {out1.as<float>(), lse1.as<float>(), c.num_q, c.num_heads, c.head_dim})
            .ok());
    ASSERT_TRUE(
        b0.AddRecvPartial(1, {out0.as<float>(), lse0.as<float>(), c.num_q, c.num_heads, c.head_dim})
            .ok());
    Batch* all[] = {&b0, &b1};
    absl::Status submitted = Batch::SubmitAll(all);
    ASSERT_TRUE(submitted.ok()) << submitted;
  }
  CUDA_OK(cudaSetDevice(1));
  CUDA_OK(cudaStreamSynchronize(s1));
  CUDA_OK(cudaSetDevice(0));
  CUDA_OK(cudaStreamSynchronize(s0));
  ASSERT_TRUE(r0.AsyncError().ok());
  ASSERT_TRUE(r1.AsyncError().ok());

  std::vector<float> out(q_elems), lse(rows);
  CUDA_OK(cudaMemcpy(out.data(), out0.get(), q_elems * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(lse.data(), lse0.get(), rows * 4, cudaMemcpyDeviceToHost));
  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < q_elems; ++i) {
    ASSERT_FALSE(std::isnan(out[i])) << "out[" << i << "] did not arrive";
    const double d = static_cast<double>(out[i]) - ref_out[i];
    err2 += d * d;
    ref2 += static_cast<double>(ref_out[i]) * ref_out[i];
  }
  for (size_t r = 0; r < rows; ++r) {
    ASSERT_FALSE(std::isnan(lse[r])) << "lse[" << r << "] did not arrive";
    ASSERT_NEAR(lse[r], ref_lse[r], 2e-3 * std::max(1.0f, std::fabs(ref_lse[r]))) << "row " << r;
  }
  EXPECT_LT(std::sqrt(err2 / ref2), 1e-2) << "relative L2 error of out";
  cudaSetDevice(0);
  cudaStreamDestroy(s0);
  cudaSetDevice(1);
  cudaStreamDestroy(s1);
}

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return absl::StrFormat("Q%d_B%d_S%d_H%d_KV%d_D%d", c.num_q, c.num_blocks, c.block_tokens,
                         c.num_heads, c.num_kv_heads, c.head_dim);
}

INSTANTIATE_TEST_SUITE_P(Shapes, NcclAttentionTest,
                         ::testing::Values(Case{1, 6, 64, 32, 8, 128}, Case{3, 5, 32, 8, 8, 64},
                                           Case{40, 4, 64, 32, 8, 128}),
                         CaseName);

}  // namespace
}  // namespace tokenlake::transport::nccl
