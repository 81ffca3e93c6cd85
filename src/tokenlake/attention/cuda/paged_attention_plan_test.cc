// Tests of PagedAttentionPlan (paged_attention.h): a plan made once runs every layer of a forward
// pass exactly as PagedAttention would (bit-identical outputs, the same workspace), and refuses
// calls of another shape. The shape checks run without a GPU; the rest skips cleanly without one.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/attention/attention_reference.h"
#include "tokenlake/attention/bf16.h"
#include "tokenlake/attention/cuda/paged_attention.h"
#include "tokenlake/attention/cuda/paged_attention_testing.h"

namespace tokenlake::attention::cuda {
namespace {

// A head_dim 32 shape: its plan needs no device (the small-head kernel has no splits), so these
// checks run anywhere.
PagedAttentionParams SmallHeadShape() {
  PagedAttentionParams p;
  p.num_q_tokens = 3;
  p.num_blocks = 2;
  p.max_block_tokens = 16;
  p.num_heads = 4;
  p.num_kv_heads = 2;
  p.head_dim = 32;
  return p;
}

TEST(PagedAttentionPlanTest, CreateChecksTheShapeOnly) {
  PagedAttentionParams shape = SmallHeadShape();  // every pointer null
  absl::StatusOr<PagedAttentionPlan> plan = PagedAttentionPlan::Create(shape);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->workspace_bytes(), 0u);
  shape.head_dim = 96;
  plan = PagedAttentionPlan::Create(shape);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(plan.status().message().find("head_dim"), std::string::npos) << plan.status();
  shape = SmallHeadShape();
  shape.causal = true;
  shape.q_block_offsets = reinterpret_cast<const int32_t*>(&shape);
  plan = PagedAttentionPlan::Create(shape);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(plan.status().message().find("q_block_offsets"), std::string::npos) << plan.status();
}

// Every field that makes a shape: a call that differs in any one of them is InvalidArgument
// naming it, before any device work; a call of the planned shape with a missing pointer is
// InvalidArgument as for PagedAttention.
TEST(PagedAttentionPlanTest, RunRefusesAnotherShapeAndMissingPointers) {
  const PagedAttentionParams shape = SmallHeadShape();
  absl::StatusOr<PagedAttentionPlan> plan = PagedAttentionPlan::Create(shape);
  ASSERT_TRUE(plan.ok()) << plan.status();
  float dummy[4] = {};
  PagedAttentionParams call = shape;
  call.q = dummy;
  call.blocks = reinterpret_cast<const DeviceKvBlock*>(dummy);
  call.out = dummy;
  call.lse = dummy;
  const std::vector<std::pair<std::string, std::function<void(PagedAttentionParams&)>>> changes = {
      {"num_q_tokens", [](PagedAttentionParams& p) { p.num_q_tokens = 4; }},
      {"num_blocks", [](PagedAttentionParams& p) { p.num_blocks = 3; }},
      {"max_block_tokens", [](PagedAttentionParams& p) { p.max_block_tokens = 32; }},
      {"num_heads", [](PagedAttentionParams& p) { p.num_heads = 8; }},
      {"num_kv_heads", [](PagedAttentionParams& p) { p.num_kv_heads = 4; }},
      {"head_dim", [](PagedAttentionParams& p) { p.head_dim = 16; }},
      {"softmax_scale", [](PagedAttentionParams& p) { p.softmax_scale = 0.5f; }},
      {"causal", [](PagedAttentionParams& p) { p.causal = true; }},
      {"q_start_pos", [](PagedAttentionParams& p) { p.q_start_pos = 1; }},
      {"num_splits", [](PagedAttentionParams& p) { p.num_splits = 2; }},
      {"prefill_warps", [](PagedAttentionParams& p) { p.prefill_warps = 8; }},
      {"prefill_rows_per_warp", [](PagedAttentionParams& p) { p.prefill_rows_per_warp = 32; }},
      {"prefill_kernel", [](PagedAttentionParams& p) { p.prefill_kernel = 1; }},
      {"decode_unroll", [](PagedAttentionParams& p) { p.decode_unroll = 2; }},
      {"decode_pipeline", [](PagedAttentionParams& p) { p.decode_pipeline = 1; }},
      {"decode_merge", [](PagedAttentionParams& p) { p.decode_merge = 1; }},
      {"decode_kernel", [](PagedAttentionParams& p) { p.decode_kernel = 1; }},
      {"decode_mma_stages", [](PagedAttentionParams& p) { p.decode_mma_stages = 2; }},
      {"decode_mma_descriptors", [](PagedAttentionParams& p) { p.decode_mma_descriptors = 2; }},
      {"pdl", [](PagedAttentionParams& p) { p.pdl = 1; }},
      {"num_extra",
       [&dummy](PagedAttentionParams& p) {
         p.num_extra = 1;
         p.extra_out = dummy;
         p.extra_lse = dummy;
       }},
      {"q_block_offsets",
       [&dummy](PagedAttentionParams& p) {
         p.q_block_offsets = reinterpret_cast<const int32_t*>(dummy);
       }},
  };
  for (const auto& [field, change] : changes) {
    PagedAttentionParams other = call;
    change(other);
    const absl::Status s = plan->Run(other);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field << ": " << s;
    EXPECT_NE(s.message().find(field), std::string::npos) << field << ": " << s;
  }
  PagedAttentionParams missing = call;
  missing.out = nullptr;
  absl::Status s = plan->Run(missing);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("out"), std::string::npos) << s;
  missing = call;
  missing.q = nullptr;
  s = plan->Run(missing);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("q and blocks"), std::string::npos) << s;
}

// One layer's random inputs on the device and its float64 reference (per request for a batched
// decode).
struct Layer {
  std::vector<float> ref_out, ref_lse;
  DeviceBuffer kv, q, blocks, extra_out, extra_lse;
  Layer(size_t kv_bytes, size_t q_bytes, size_t blocks_bytes, size_t xo_bytes, size_t xl_bytes)
      : kv(kv_bytes), q(q_bytes), blocks(blocks_bytes), extra_out(xo_bytes), extra_lse(xl_bytes) {}
};

// Expects the two float arrays to hold the same bits (NaN-safe).
void ExpectSameBits(const std::vector<float>& a, const std::vector<float>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    uint32_t x, y;
    std::memcpy(&x, &a[i], 4);
    std::memcpy(&y, &b[i], 4);
    ASSERT_EQ(x, y) << what << "[" << i << "]: " << a[i] << " vs " << b[i];
  }
}

class PagedAttentionPlanGpuTest : public ::testing::TestWithParam<Shape> {};

// Plan once, run per layer: for decodes (automatic kernel), batched decodes and prefills (causal
// or not), with extra partials or without, one plan made from the shape alone (null pointers)
// runs three layers, each with its own K/V blocks, queries and extras; every layer's output and
// LSE must have the same bits as PagedAttention's on the same inputs and match the reference,
// and the plan's workspace (reused by every layer) must have its counters back at zero.
TEST_P(PagedAttentionPlanGpuTest, RunsEveryLayerLikePagedAttention) {
  TOKENLAKE_SKIP_WITHOUT_GPU();
  const Shape s = GetParam();
  const uint64_t seed = 8080 + s.num_heads * 19 + s.head_dim + s.block_tokens;
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  constexpr int kLayers = 3;
  const size_t block_elems = static_cast<size_t>(s.block_tokens) * s.num_kv_heads * s.head_dim;
  for (int trial = 0; trial < 9; ++trial) {
    const int kind = trial % 3;  // 0 decode, 1 batched decode, 2 prefill
    // Blocks: one list, or one per request (offsets) for a batched decode.
    std::vector<int> lens;
    std::vector<int32_t> offsets = {0};
    const int num_req = kind == 1 ? 1 + static_cast<int>(rng() % 8) : 1;
    for (int r = 0; r < num_req; ++r) {
      const int nb = (kind == 1 ? 0 : 1) + static_cast<int>(rng() % 12);
      for (int b = 0; b < nb; ++b) {
        const int k = static_cast<int>(rng() % 4);
        lens.push_back(k == 0   ? static_cast<int>(rng() % (s.block_tokens + 1))
                       : k == 1 ? 0
                                : s.block_tokens);
      }
      offsets.push_back(static_cast<int32_t>(lens.size()));
    }
    const int nb = static_cast<int>(lens.size());
    int total = 0;
    for (int l : lens) total += l;
    static constexpr int kDecodeQ[] = {1, 2, 8};
    static constexpr int kPrefillQ[] = {9, 40, 130};
    const int num_q = kind == 0 ? kDecodeQ[rng() % 3] : kind == 1 ? num_req : kPrefillQ[rng() % 3];
    const bool causal = kind == 2 && rng() % 2 == 0;
    const int q_start_pos = causal ? static_cast<int>(rng() % (total + 2)) : 0;
    const int num_extra = static_cast<int>(rng() % 3);
    DeviceBuffer d_off(offsets.size() * 4);
    if (kind == 1) {
      TOKENLAKE_CUDA_OK(
          cudaMemcpy(d_off.ptr, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));
    }
    PagedAttentionParams shape;
    shape.num_q_tokens = num_q;
    shape.num_blocks = nb;
    shape.max_block_tokens = s.block_tokens;
    shape.num_heads = s.num_heads;
    shape.num_kv_heads = s.num_kv_heads;
    shape.head_dim = s.head_dim;
    shape.causal = causal;
    shape.q_start_pos = q_start_pos;
    shape.num_extra = num_extra;
    shape.q_block_offsets = kind == 1 ? d_off.as<int32_t>() : nullptr;
    SCOPED_TRACE(absl::StrFormat("trial %d kind %d q %d blocks %d causal %d extras %d", trial, kind,
                                 num_q, nb, causal, num_extra));
    absl::StatusOr<PagedAttentionPlan> plan = PagedAttentionPlan::Create(shape);
    ASSERT_TRUE(plan.ok()) << plan.status();
    absl::StatusOr<size_t> direct_ws = PagedAttentionWorkspaceBytes(shape);
    ASSERT_FALSE(direct_ws.ok());  // (its pointers are null: the one-call API checks them)
    const size_t ws_bytes = plan->workspace_bytes();
    DeviceBuffer ws_plan(ws_bytes), ws_direct(ws_bytes);
    PrepareWorkspace(ws_plan.ptr, ws_bytes);
    PrepareWorkspace(ws_direct.ptr, ws_bytes);
    if (HasFatalFailure()) return;
    const size_t q_elems = static_cast<size_t>(num_q) * s.num_heads * s.head_dim;
    const size_t rows = static_cast<size_t>(num_q) * s.num_heads;
    DeviceBuffer d_out(q_elems * 4), d_lse(rows * 4), d_out2(q_elems * 4), d_lse2(rows * 4);
    for (int layer = 0; layer < kLayers; ++layer) {
      SCOPED_TRACE(::testing::Message() << "layer " << layer);
      // This layer's K/V (rows past a block's tokens huge, so reading them would show), queries.
      std::vector<uint16_t> kv(2 * block_elems * std::max(nb, 1));
      const size_t row_elems = static_cast<size_t>(s.num_kv_heads) * s.head_dim;
      for (int b = 0; b < nb; ++b) {
        for (size_t i = 0; i < 2 * block_elems; ++i) {
          const bool used = (i % block_elems) / row_elems < static_cast<size_t>(lens[b]);
          kv[2 * b * block_elems + i] = FloatToBf16(used ? normal(rng) : 3.0e4f);
        }
      }
      std::vector<uint16_t> q(q_elems);
      std::vector<float> qf(q_elems);
      for (size_t i = 0; i < q_elems; ++i) {
        q[i] = FloatToBf16(1.5f * normal(rng));
        qf[i] = Bf16ToFloat(q[i]);
      }
      // Reference: one call over all blocks, or per request over its own.
      AttentionParams ap = ReferenceParams(s);
      ap.causal = causal;
      ap.q_start_pos = q_start_pos;
      std::vector<float> ref_out(q_elems), ref_lse(rows);
      const size_t req_q = q_elems / num_req;
      const size_t req_rows = rows / num_req;
      for (int r = 0; r < num_req; ++r) {
        std::vector<KvBlock> hb;
        for (int b = offsets[r]; b < offsets[r + 1]; ++b) {
          hb.push_back(KvBlock{kv.data() + 2 * b * block_elems,
                               kv.data() + (2 * b + 1) * block_elems, lens[b]});
        }
        ASSERT_TRUE(ReferencePartialAttention(
                        ap, num_q / num_req, absl::MakeConstSpan(qf).subspan(r * req_q, req_q), hb,
                        absl::MakeSpan(ref_out).subspan(r * req_q, req_q),
                        absl::MakeSpan(ref_lse).subspan(r * req_rows, req_rows))
                        .ok());
      }
      std::vector<float> extra_out, extra_lse;
      AddRandomExtras(num_extra, rows, s.head_dim, rng, extra_out, extra_lse, ref_out, ref_lse);
      Layer in(kv.size() * 2 + 16, q_elems * 2 + 16, sizeof(DeviceKvBlock) * std::max(nb, 1) + 16,
               extra_out.size() * 4 + 16, extra_lse.size() * 4 + 16);
      UploadBlocks(kv, lens, block_elems, in.kv, in.blocks);
      if (HasFatalFailure()) return;
      TOKENLAKE_CUDA_OK(cudaMemcpy(in.q.ptr, q.data(), q_elems * 2, cudaMemcpyHostToDevice));
      if (num_extra > 0) {
        TOKENLAKE_CUDA_OK(cudaMemcpy(in.extra_out.ptr, extra_out.data(), extra_out.size() * 4,
                                     cudaMemcpyHostToDevice));
        TOKENLAKE_CUDA_OK(cudaMemcpy(in.extra_lse.ptr, extra_lse.data(), extra_lse.size() * 4,
                                     cudaMemcpyHostToDevice));
      }
      TOKENLAKE_CUDA_OK(cudaMemset(d_out.ptr, 0xff, q_elems * 4));  // NaN poison
      TOKENLAKE_CUDA_OK(cudaMemset(d_out2.ptr, 0xff, q_elems * 4));
      TOKENLAKE_CUDA_OK(cudaMemset(d_lse.ptr, 0xff, rows * 4));
      TOKENLAKE_CUDA_OK(cudaMemset(d_lse2.ptr, 0xff, rows * 4));
      PagedAttentionParams p = shape;
      p.q = in.q.ptr;
      p.blocks = in.blocks.as<DeviceKvBlock>();
      p.extra_out = in.extra_out.as<float>();
      p.extra_lse = in.extra_lse.as<float>();
      p.out = d_out.as<float>();
      p.lse = d_lse.as<float>();
      p.workspace = ws_plan.ptr;
      p.workspace_bytes = ws_bytes;
      absl::Status st = plan->Run(p);
      ASSERT_TRUE(st.ok()) << st;
      p.out = d_out2.as<float>();
      p.lse = d_lse2.as<float>();
      p.workspace = ws_direct.ptr;
      st = PagedAttention(p);
      ASSERT_TRUE(st.ok()) << st;
      TOKENLAKE_CUDA_OK(cudaDeviceSynchronize());
      ExpectCountersZero(ws_plan.ptr, ws_bytes);
      if (HasFatalFailure()) return;
      std::vector<float> out(q_elems), lse(rows), out2(q_elems), lse2(rows);
      TOKENLAKE_CUDA_OK(cudaMemcpy(out.data(), d_out.ptr, q_elems * 4, cudaMemcpyDeviceToHost));
      TOKENLAKE_CUDA_OK(cudaMemcpy(lse.data(), d_lse.ptr, rows * 4, cudaMemcpyDeviceToHost));
      TOKENLAKE_CUDA_OK(cudaMemcpy(out2.data(), d_out2.ptr, q_elems * 4, cudaMemcpyDeviceToHost));
      TOKENLAKE_CUDA_OK(cudaMemcpy(lse2.data(), d_lse2.ptr, rows * 4, cudaMemcpyDeviceToHost));
      ExpectSameBits(out, out2, "out");
      ExpectSameBits(lse, lse2, "lse");
      if (HasFatalFailure()) return;
      ExpectMatchesReference(out, lse, ref_out, ref_lse, s.head_dim);
      if (HasFatalFailure()) return;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, PagedAttentionPlanGpuTest,
                         ::testing::Values(Shape{4, 4, 64, 16}, Shape{8, 2, 128, 64},
                                           Shape{32, 8, 128, 100}, Shape{8, 1, 64, 256},
                                           Shape{12, 4, 128, 64}, Shape{4, 2, 16, 16},
                                           Shape{8, 2, 32, 16}),
                         ShapeName);

}  // namespace
}  // namespace tokenlake::attention::cuda
