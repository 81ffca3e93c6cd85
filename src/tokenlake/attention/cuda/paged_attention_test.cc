// GPU tests of paged_attention.h against the naive CPU reference (attention_reference.h).
// Every check draws fresh random inputs, poisons the outputs with NaN before the run, and
// requires every output element to be written. Skips cleanly when no GPU is present.
#include "tokenlake/attention/cuda/paged_attention.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
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
#include "tokenlake/attention/cuda/paged_attention_testing.h"
#include "tokenlake/attention/cuda/pdl_testing.h"

namespace tokenlake::attention::cuda {
namespace {

struct Case {
  Shape shape;
  std::vector<int> block_lens;
  int num_q = 1;
  bool causal = false;
  int q_start_pos = 0;
  AttentionKernel kernel = AttentionKernel::kAuto;
  int num_splits = 0;
  int decode_unroll = 0;
  int decode_pipeline = 0;
  int prefill_rows_per_warp = 0;
  int prefill_kernel = 0;  // 0 auto, 1 mma.sync, 2 sm90 wgmma
  int decode_merge = 0;
  int decode_kernel = 0;  // 0 auto, 1 CUDA cores, 2 tensor cores
  int decode_mma_stages = 0;
  int decode_mma_descriptors = 0;  // 0 auto, 1 shared-memory cache, 2 global
  float softmax_scale = 0.f;
  int num_extra = 0;  // extra partials merged into the result (PagedAttentionParams::num_extra)
  // PagedAttentionParams::pdl; with pdl > 0 the inputs the kernel may not read before its wait
  // arrive from a delayed producer (RunAndCompare).
  int pdl = 0;
};

std::string Describe(const Case& c) {
  std::string lens;
  for (int l : c.block_lens) lens += absl::StrFormat("%d,", l);
  return absl::StrFormat(
      "q=%d causal=%d q_start=%d kernel=%d prefill_kernel=%d splits=%d unroll=%d pipeline=%d "
      "rows_per_warp=%d merge=%d decode_kernel=%d mma_stages=%d mma_desc=%d extras=%d pdl=%d "
      "blocks=[%s]",
      c.num_q, c.causal, c.q_start_pos, static_cast<int>(c.kernel), c.prefill_kernel, c.num_splits,
      c.decode_unroll, c.decode_pipeline, c.prefill_rows_per_warp, c.decode_merge, c.decode_kernel,
      c.decode_mma_stages, c.decode_mma_descriptors, c.num_extra, c.pdl, lens);
}

// How long the PDL tests' producer holds back the inputs after letting the kernel start.
constexpr int64_t kPdlDelayNs = 100'000;

// Runs one case on the GPU and on the reference; checks every element. With `ws` (a prepared
// workspace of ws_bytes, reused across calls) the call uses it instead of a fresh one. With
// c.pdl > 0 the call runs on its own stream after a producer (EnqueueDelayedCopy) that lets a
// PDL-launched kernel start at once and writes q (pdl 1: then the K/V, by a second producer) only
// after kPdlDelayNs, the buffers holding NaN until then: a read before the kernel's wait shows.
void RunAndCompare(const Case& c, std::mt19937_64& rng, void* ws = nullptr, size_t ws_bytes = 0) {
  SCOPED_TRACE(Describe(c));
  const Shape& s = c.shape;
  const int nb = static_cast<int>(c.block_lens.size());
  const size_t block_elems = static_cast<size_t>(s.block_tokens) * s.num_kv_heads * s.head_dim;
  const size_t row_elems = static_cast<size_t>(s.num_kv_heads) * s.head_dim;
  std::normal_distribution<float> normal(0.f, 1.f);

  // K and V of all blocks in one host array [block][kv][S][kv_head][D]; rows past num_tokens are
  // filled with huge values so that reading them would show.
  std::vector<uint16_t> kv(2 * block_elems * nb);
  for (int b = 0; b < nb; ++b) {
    for (int kvi = 0; kvi < 2; ++kvi) {
      uint16_t* blk = kv.data() + (2 * b + kvi) * block_elems;
      for (size_t i = 0; i < block_elems; ++i) {
        const bool used = i / row_elems < static_cast<size_t>(c.block_lens[b]);
        blk[i] = FloatToBf16(used ? normal(rng) : 3.0e4f);
      }
    }
  }
  const size_t q_elems = static_cast<size_t>(c.num_q) * s.num_heads * s.head_dim;
  std::vector<uint16_t> q_bf16(q_elems);
  std::vector<float> q_f32(q_elems);
  for (size_t i = 0; i < q_elems; ++i) {
    q_bf16[i] = FloatToBf16(normal(rng) * 1.5f);
    q_f32[i] = Bf16ToFloat(q_bf16[i]);
  }

  // Reference (float64 inside).
  std::vector<KvBlock> host_blocks(nb);
  for (int b = 0; b < nb; ++b) {
    host_blocks[b].k = kv.data() + (2 * b) * block_elems;
    host_blocks[b].v = kv.data() + (2 * b + 1) * block_elems;
    host_blocks[b].num_tokens = c.block_lens[b];
  }
  AttentionParams ap = ReferenceParams(s);
  ap.softmax_scale = c.softmax_scale;
  ap.causal = c.causal;
  ap.q_start_pos = c.q_start_pos;
  const size_t rows = static_cast<size_t>(c.num_q) * s.num_heads;
  std::vector<float> ref_out(q_elems), ref_lse(rows);
  ASSERT_TRUE(ReferencePartialAttention(ap, c.num_q, q_f32, host_blocks, absl::MakeSpan(ref_out),
                                        absl::MakeSpan(ref_lse))
                  .ok());
  const size_t ne = static_cast<size_t>(c.num_extra);
  std::vector<float> extra_out, extra_lse;
  AddRandomExtras(c.num_extra, rows, s.head_dim, rng, extra_out, extra_lse, ref_out, ref_lse);
  DeviceBuffer d_extra_out(extra_out.size() * 4), d_extra_lse(extra_lse.size() * 4);
  if (ne > 0) {
    TOKENLAKE_CUDA_OK(cudaMemcpy(d_extra_out.ptr, extra_out.data(), extra_out.size() * 4,
                                 cudaMemcpyHostToDevice));
    TOKENLAKE_CUDA_OK(cudaMemcpy(d_extra_lse.ptr, extra_lse.data(), extra_lse.size() * 4,
                                 cudaMemcpyHostToDevice));
  }

  // Device.
  DeviceBuffer d_kv(kv.size() * 2 + 16), d_q(q_elems * 2 + 16),
      d_blocks(sizeof(DeviceKvBlock) * nb + 16), d_out(q_elems * 4 + 16), d_lse(rows * 4 + 16);
  UploadBlocks(kv, c.block_lens, block_elems, d_kv, d_blocks);
  if (::testing::Test::HasFatalFailure()) return;
  TOKENLAKE_CUDA_OK(cudaMemcpy(d_q.ptr, q_bf16.data(), q_elems * 2, cudaMemcpyHostToDevice));
  TOKENLAKE_CUDA_OK(cudaMemset(d_out.ptr, 0xff, q_elems * 4));  // NaN poison
  TOKENLAKE_CUDA_OK(cudaMemset(d_lse.ptr, 0xff, rows * 4));

  PagedAttentionParams p;
  p.q = d_q.ptr;
  p.num_q_tokens = c.num_q;
  p.blocks = d_blocks.as<DeviceKvBlock>();
  p.num_blocks = nb;
  p.max_block_tokens = s.block_tokens;
  p.num_heads = s.num_heads;
  p.num_kv_heads = s.num_kv_heads;
  p.head_dim = s.head_dim;
  p.softmax_scale = c.softmax_scale;
  p.causal = c.causal;
  p.q_start_pos = c.q_start_pos;
  p.out = d_out.as<float>();
  p.lse = d_lse.as<float>();
  p.num_splits = c.num_splits;
  p.decode_unroll = c.decode_unroll;
  p.decode_pipeline = c.decode_pipeline;
  p.prefill_rows_per_warp = c.prefill_rows_per_warp;
  p.prefill_kernel = c.prefill_kernel;
  p.decode_merge = c.decode_merge;
  p.decode_kernel = c.decode_kernel;
  p.decode_mma_stages = c.decode_mma_stages;
  p.decode_mma_descriptors = c.decode_mma_descriptors;
  p.num_extra = c.num_extra;
  p.extra_out = d_extra_out.as<float>();
  p.extra_lse = d_extra_lse.as<float>();
  p.pdl = c.pdl;
  absl::StatusOr<size_t> need = PagedAttentionWorkspaceBytes(p, c.kernel);
  ASSERT_TRUE(need.ok()) << need.status();
  DeviceBuffer d_ws(ws == nullptr ? *need : 0);
  if (ws == nullptr) {
    ws = d_ws.ptr;
    ws_bytes = *need;
    PrepareWorkspace(ws, ws_bytes);
    if (::testing::Test::HasFatalFailure()) return;
  }
  ASSERT_GE(ws_bytes, *need);
  p.workspace = ws;
  p.workspace_bytes = ws_bytes;
  cudaStream_t stream = nullptr;
  DeviceBuffer d_q_src(c.pdl > 0 ? q_elems * 2 : 0), d_kv_src(c.pdl == 1 ? kv.size() * 2 : 0);
  if (c.pdl > 0) {
    TOKENLAKE_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    auto delay = [&](void* dst, void* staging, size_t bytes) {
      TOKENLAKE_CUDA_OK(cudaMemcpy(staging, dst, bytes, cudaMemcpyDeviceToDevice));
      TOKENLAKE_CUDA_OK(cudaMemset(dst, 0xff, bytes));  // bf16 NaN until the producer writes
      const absl::Status st = EnqueueDelayedCopy(dst, staging, bytes, kPdlDelayNs, stream);
      ASSERT_TRUE(st.ok()) << st;
    };
    delay(d_q.ptr, d_q_src.ptr, q_elems * 2);
    if (c.pdl == 1) delay(d_kv.ptr, d_kv_src.ptr, kv.size() * 2);
    if (::testing::Test::HasFatalFailure()) return;
  }
  const absl::Status st = PagedAttention(p, c.kernel, stream);
  ASSERT_TRUE(st.ok()) << st;
  TOKENLAKE_CUDA_OK(cudaDeviceSynchronize());
  if (stream != nullptr) {
    TOKENLAKE_CUDA_OK(cudaStreamDestroy(stream));
  }
  ExpectCountersZero(ws, ws_bytes);
  if (::testing::Test::HasFatalFailure()) return;
  std::vector<float> out(q_elems), lse(rows);
  TOKENLAKE_CUDA_OK(cudaMemcpy(out.data(), d_out.ptr, q_elems * 4, cudaMemcpyDeviceToHost));
  TOKENLAKE_CUDA_OK(cudaMemcpy(lse.data(), d_lse.ptr, rows * 4, cudaMemcpyDeviceToHost));
  ExpectMatchesReference(out, lse, ref_out, ref_lse, s.head_dim);
}

class PagedAttentionGpuTest : public ::testing::TestWithParam<Shape> {};

// Random block lists (part-segments and empty segments anywhere), random query counts, causal
// and not, both kernels, several split counts.
TEST_P(PagedAttentionGpuTest, MatchesReferenceOnRandomInputs) {
  TOKENLAKE_SKIP_WITHOUT_GPU();
  const Shape shape = GetParam();
  const uint64_t seed = 1234567 + shape.num_heads * 1000 + shape.head_dim * 10 + shape.block_tokens;
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 10; ++trial) {
    Case c;
    c.shape = shape;
    const int nb = 1 + static_cast<int>(rng() % 6);
    for (int b = 0; b < nb; ++b) {
      const int r = static_cast<int>(rng() % 4);
      c.block_lens.push_back(r == 0   ? static_cast<int>(rng() % (shape.block_tokens + 1))
                             : r == 1 ? 0
                                      : shape.block_tokens);
    }
    static constexpr int kQ[] = {1, 2, 5, 8, 17, 64, 130};
    c.num_q = kQ[rng() % 7];
    c.causal = rng() % 2 == 0;
    int total = 0;
    for (int l : c.block_lens) total += l;
    c.q_start_pos = c.causal ? static_cast<int>(rng() % (total + 2)) : 0;
    c.softmax_scale = rng() % 3 == 0 ? 0.05f : 0.f;
    static constexpr int kSplits[] = {0, 1, 2, 5};
    for (AttentionKernel k :
         {AttentionKernel::kAuto, AttentionKernel::kPrefill, AttentionKernel::kDecode}) {
      c.kernel = k;
      // kPrefill here forces the mma.sync prefill kernel (kAuto takes the Hopper one where it
      // applies; it also runs on its own below).
      c.prefill_kernel = k == AttentionKernel::kPrefill ? 1 : 0;
      c.num_splits = k == AttentionKernel::kAuto ? 0 : kSplits[rng() % 4];
      c.decode_unroll = static_cast<int>(rng() % 3) * 2;           // 0 (default), 2, 4
      c.decode_pipeline = static_cast<int>(rng() % 3);             // 0 (default), 1, 2
      c.prefill_rows_per_warp = static_cast<int>(rng() % 3) * 16;  // 0 (default), 16, 32
      c.decode_merge = static_cast<int>(rng() % 2);                // fused, separate kernel
      // kDecode: the CUDA-core decode kernels with the random tuning above; kAuto: the default
      // decode kernel (tensor cores where they apply). The tensor-core kernel also runs below.
      c.decode_kernel = k == AttentionKernel::kDecode ? 1 : 0;
      RunAndCompare(c, rng);  // fresh random inputs each time
      if (HasFatalFailure()) return;
    }
    // The same case on the Hopper wgmma prefill kernel (head_dim 128; other shapes fall back to
    // the mma.sync kernel), with a random forced split count.
    c.kernel = AttentionKernel::kPrefill;
    c.prefill_kernel = 2;
    c.num_splits = kSplits[rng() % 4];
    RunAndCompare(c, rng);
    if (HasFatalFailure()) return;
    c.prefill_kernel = 0;
    // The same case on the tensor-core decode kernel (head_dim 64/128 and groups of 1, 2, 4 or 8;
    // other shapes fall back to the CUDA-core kernels), random splits, stages and merge.
    c.kernel = AttentionKernel::kDecode;
    c.decode_kernel = 2;
    c.num_splits = kSplits[rng() % 4];
    static constexpr int kStages[] = {0, 2, 3, 4};  // default, 2, 3, 4
    c.decode_mma_stages = kStages[rng() % 4];
    c.decode_mma_descriptors = static_cast<int>(rng() % 3);  // default, cached, global
    c.decode_merge = static_cast<int>(rng() % 2);
    RunAndCompare(c, rng);
    if (HasFatalFailure()) return;
    c.decode_kernel = 0;
    c.decode_mma_stages = 0;
    c.decode_mma_descriptors = 0;
  }
}

// The Hopper wgmma prefill kernel on the shapes it is for: several 128-row M tiles (a partial
// last one), tiles of 128 keys with part-segments and empty segments anywhere, causal with
// q_start_pos and not, automatic and forced splits (merged partials).
TEST_P(PagedAttentionGpuTest, Sm90PrefillMatchesReferenceOnRandomInputs) {
  TOKENLAKE_SKIP_WITHOUT_GPU();
  const Shape shape = GetParam();
  const uint64_t seed = 777 + shape.num_heads * 1000 + shape.head_dim * 10 + shape.block_tokens;
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 6; ++trial) {
    Case c;
    c.shape = shape;
    const int nb = 1 + static_cast<int>(rng() % 8);
    for (int b = 0; b < nb; ++b) {
      const int r = static_cast<int>(rng() % 4);
      c.block_lens.push_back(r == 0   ? static_cast<int>(rng() % (shape.block_tokens + 1))
                             : r == 1 ? 0
                                      : shape.block_tokens);
    }
    static constexpr int kQ[] = {9, 33, 100, 257};
    c.num_q = kQ[rng() % 4];
    c.causal = rng() % 2 == 0;
    int total = 0;
    for (int l : c.block_lens) total += l;
    c.q_start_pos = c.causal ? static_cast<int>(rng() % (total + 2)) : 0;
    c.softmax_scale = rng() % 3 == 0 ? 0.05f : 0.f;
    c.kernel = rng() % 2 == 0 ? AttentionKernel::kPrefill : AttentionKernel::kAuto;
    c.prefill_kernel = 2;
    static constexpr int kSplits[] = {0, 1, 2, 3, 7};
    c.num_splits = kSplits[rng() % 5];
    RunAndCompare(c, rng);
    if (HasFatalFailure()) return;
  }
}

// The two shapes the engine uses: cached prefix (not causal) and the new tokens' own KV (causal
// from 0), over many full segments.
TEST_P(PagedAttentionGpuTest, CachedAndNewTokenPartialsMatchReference) {
  TOKENLAKE_SKIP_WITHOUT_GPU();
  const Shape shape = GetParam();
  const uint64_t seed = 99 + shape.num_heads + shape.head_dim + shape.block_tokens;
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::mt19937_64 rng(seed);
  Case cached;
  cached.shape = shape;
  cached.block_lens.assign(std::max(1, 512 / shape.block_tokens), shape.block_tokens);
  cached.num_q = 96;
  RunAndCompare(cached, rng);  // default prefill kernel (Hopper's where it applies)
  cached.prefill_kernel = 1;   // the mma.sync kernel, 16 and 32 rows per warp
  RunAndCompare(cached, rng);
  cached.prefill_rows_per_warp = 32;
  RunAndCompare(cached, rng);
  cached.prefill_rows_per_warp = 0;
  cached.prefill_kernel = 0;
  Case fresh = cached;
  fresh.block_lens.assign((96 + shape.block_tokens - 1) / shape.block_tokens, shape.block_tokens);
  fresh.block_lens.back() =
      96 - shape.block_tokens * (static_cast<int>(fresh.block_lens.size()) - 1);
  fresh.causal = true;
  fresh.q_start_pos = 0;
  RunAndCompare(fresh, rng);
  fresh.prefill_kernel = 1;
  RunAndCompare(fresh, rng);
  fresh.prefill_rows_per_warp = 32;
  fresh.prefill_kernel = 1;
  fresh.num_q = 300;  // more than one 128-row tile, a partial last tile
  fresh.block_lens.assign((300 + shape.block_tokens - 1) / shape.block_tokens, shape.block_tokens);
  fresh.block_lens.back() =
      300 - shape.block_tokens * (static_cast<int>(fresh.block_lens.size()) - 1);
  RunAndCompare(fresh, rng);
  fresh.prefill_rows_per_warp = 0;
  fresh.prefill_kernel = 0;
  RunAndCompare(fresh, rng);
  Case decode = cached;
  decode.num_q = 1;
  RunAndCompare(decode, rng);
}

// Decode with many splits, the split merge fused into the kernel and as a separate kernel, one
// workspace reused by every call (its counters must come back to zero and its partials must be
// rewritten each time), random part-segments and empty segments, causal and not.
TEST_P(PagedAttentionGpuTest, FusedSplitMergeMatchesReferenceWithReusedWorkspace) {
  TOKENLAKE_SKIP_WITHOUT_GPU();
  const Shape shape = GetParam();
  const uint64_t seed = 777 + shape.num_heads * 31 + shape.head_dim + shape.block_tokens;
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  constexpr size_t kWsBytes = 8 << 20;
  DeviceBuffer ws(kWsBytes);
  ASSERT_NE(ws.ptr, nullptr);
  PrepareWorkspace(ws.ptr, kWsBytes);
  for (int trial = 0; trial < 8; ++trial) {
    Case c;
    c.shape = shape;
    const int nb = 1 + static_cast<int>(rng() % 24);
    for (int b = 0; b < nb; ++b) {
      const int r = static_cast<int>(rng() % 5);
      c.block_lens.push_back(r == 0   ? static_cast<int>(rng() % (shape.block_tokens + 1))
                             : r == 1 ? 0
                                      : shape.block_tokens);
    }
    c.num_q = 1 + static_cast<int>(rng() % 4);
    c.causal = rng() % 3 == 0;
    int total = 0;
    for (int l : c.block_lens) total += l;
    c.q_start_pos = c.causal ? static_cast<int>(rng() % (total + 2)) : 0;
    c.kernel = AttentionKernel::kDecode;
    static constexpr int kSplits[] = {0, 3, 16, 40, 100};
    c.num_splits = kSplits[rng() % 5];
    c.decode_pipeline = static_cast<int>(rng() % 3);
    for (int merge : {0, 1}) {
      c.decode_merge = merge;
      for (int dk : {1, 2}) {  // CUDA cores, tensor cores (random pipeline depth 2, 3, 4)
        c.decode_kernel = dk;
        c.decode_mma_stages = dk == 2 ? 2 + static_cast<int>(rng() % 3) : 0;
        c.decode_mma_descriptors = dk == 2 ? static_cast<int>(rng() % 3) : 0;
        c.pdl = dk == 2 ? (trial + merge) % 3 : 0;
        RunAndCompare(c, rng, ws.ptr, kWsBytes);  // fresh random inputs each time
        if (HasFatalFailure()) return;
      }
    }
  }
}

// Beyond 64 splits (or 512 merge counters) the default decode merges its splits with the separate
// merge kernel, not in the kernel: 65-120 segments (a few short) and at least as many forced
// splits, decode_merge left at its default, on both decode kernels, with and without extra
// partials.
TEST_P(PagedAttentionGpuTest, DefaultDecodeMergesManySplitsWithTheSeparateKernel) {
  TOKENLAKE_SKIP_WITHOUT_GPU();
  const Shape shape = GetParam();
  if (shape.head_dim < 64) GTEST_SKIP() << "the small-head kernel does not split";
  const uint64_t seed = 6464 + shape.num_heads * 11 + shape.head_dim + shape.block_tokens;
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 4; ++trial) {
    Case c;
    c.shape = shape;
    const int nb = 65 + static_cast<int>(rng() % 56);
    for (int b = 0; b < nb; ++b) {
      c.block_lens.push_back(rng() % 8 == 0 ? static_cast<int>(rng() % (shape.block_tokens + 1))
                                            : shape.block_tokens);
    }
    c.num_q = 1 + static_cast<int>(rng() % 2);
    c.kernel = AttentionKernel::kDecode;
    c.num_splits = nb + static_cast<int>(rng() % 16);  // one or more splits per segment
    c.num_extra = static_cast<int>(rng() % 3);
    for (int dk : {1, 2}) {  // CUDA cores, tensor cores (where the shape allows)
      c.decode_kernel = dk;
      RunAndCompare(c, rng);  // fresh random inputs and workspace each time
      if (HasFatalFailure()) return;
    }
  }
}

// Batched decode: many requests, each one query token over its own random block list (empty
// lists, part-segments and empty segments included), in one launch through q_block_offsets;
// every request compared with the reference run on its blocks alone.
// The tensor-core decode kernel's work splits (runs of whole segments, or chunks of one segment
// when there are more splits than segments), with the descriptor cache and without, at every
// pipeline depth, on every shape the kernel takes: many segments with part-segments and empty
// ones anywhere (a run may start or end in a short or empty segment, or hold no keys at all),
// splits from 1 to 40, causal or not, one reused workspace (counters back to zero after every
// call).
TEST_P(PagedAttentionGpuTest, DecodeMmaSplitsMatchReference) {
  TOKENLAKE_SKIP_WITHOUT_GPU();
  const Shape shape = GetParam();
  const int group = shape.num_heads / shape.num_kv_heads;
  if ((shape.head_dim != 64 && shape.head_dim != 128) ||
      (group != 1 && group != 2 && group != 4 && group != 8)) {
    GTEST_SKIP() << "not a shape of the tensor-core decode kernel";
  }
  const uint64_t seed = 4242 + shape.num_heads * 7 + shape.head_dim + shape.block_tokens;
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  constexpr size_t kWsBytes = 8 << 20;
  DeviceBuffer ws(kWsBytes);
  ASSERT_NE(ws.ptr, nullptr);
  PrepareWorkspace(ws.ptr, kWsBytes);
  for (int repeat = 0; repeat < 2; ++repeat) {
    for (int desc : {0, 1, 2}) {  // default, cached, global
      for (int stages = 2; stages <= 4; ++stages) {
        Case c;
        c.shape = shape;
        const int nb = 1 + static_cast<int>(rng() % 40);
        for (int b = 0; b < nb; ++b) {
          const int r = static_cast<int>(rng() % 5);
          c.block_lens.push_back(r == 0   ? static_cast<int>(rng() % (shape.block_tokens + 1))
                                 : r == 1 ? 0
                                          : shape.block_tokens);
        }
        c.num_q = 1 + static_cast<int>(rng() % 3);
        c.causal = rng() % 2 == 0;
        int total = 0;
        for (int l : c.block_lens) total += l;
        c.q_start_pos = c.causal ? static_cast<int>(rng() % (total + 2)) : 0;
        c.kernel = AttentionKernel::kDecode;
        static constexpr int kSplits[] = {0, 1, 3, 16, 33, 40};  // (also above the segments)
        c.num_splits = kSplits[rng() % 6];
        c.decode_merge = static_cast<int>(rng() % 2);
        c.decode_kernel = 2;
        c.decode_mma_stages = stages;
        c.decode_mma_descriptors = desc;
        c.pdl = (stages + desc + repeat) % 3;  // off, wait first, prefetch then wait
        RunAndCompare(c, rng, ws.ptr, kWsBytes);
        if (HasFatalFailure()) return;
      }
    }
  }
}

// PDL chains: decode calls back to back on one stream, each launched with pdl 1 or 2 and one
// workspace shared by all, so a call's thread blocks start (and with pdl 2 stream their first
// K/V) while the previous call still merges its splits out of that workspace; the first call's
// query comes from a delayed producer. Every call's output must equal the reference of its own
// query (a call that wrote its partials or read its query before its wait would corrupt its
// own or its predecessor's result), and the counters must be zero at the end.
TEST_P(PagedAttentionGpuTest, PdlChainedDecodesMatchReference) {
  TOKENLAKE_SKIP_WITHOUT_GPU();
  const Shape s = GetParam();
  const uint64_t seed = 5150 + s.num_heads * 17 + s.head_dim + s.block_tokens;
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  constexpr size_t kWsBytes = 8 << 20;
  DeviceBuffer ws(kWsBytes);
  ASSERT_NE(ws.ptr, nullptr);
  PrepareWorkspace(ws.ptr, kWsBytes);
  cudaStream_t stream;
  TOKENLAKE_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  constexpr int kCalls = 6;
  for (int trial = 0; trial < 3; ++trial) {
    const int nb = 4 + static_cast<int>(rng() % 30);
    const int num_q = 1 + static_cast<int>(rng() % 3);
    const size_t block_elems = static_cast<size_t>(s.block_tokens) * s.num_kv_heads * s.head_dim;
    std::vector<uint16_t> kv(2 * block_elems * nb);
    for (uint16_t& x : kv) x = FloatToBf16(normal(rng));
    std::vector<int> lens(nb);
    for (int& l : lens) {
      l = rng() % 4 == 0 ? 1 + static_cast<int>(rng() % s.block_tokens) : s.block_tokens;
    }
    std::vector<KvBlock> host_blocks(nb);
    for (int b = 0; b < nb; ++b) {
      host_blocks[b] = {kv.data() + 2 * b * block_elems, kv.data() + (2 * b + 1) * block_elems,
                        lens[b]};
    }
    DeviceBuffer d_kv(kv.size() * 2), d_blocks(sizeof(DeviceKvBlock) * nb);
    UploadBlocks(kv, lens, block_elems, d_kv, d_blocks);
    if (HasFatalFailure()) return;
    const AttentionParams ap = ReferenceParams(s);
    const size_t q_elems = static_cast<size_t>(num_q) * s.num_heads * s.head_dim;
    const size_t rows = static_cast<size_t>(num_q) * s.num_heads;
    // Per call: its own query, output and reference.
    std::vector<std::vector<float>> ref_out(kCalls, std::vector<float>(q_elems));
    std::vector<std::vector<float>> ref_lse(kCalls, std::vector<float>(rows));
    DeviceBuffer d_q(kCalls * q_elems * 2), d_q_src(q_elems * 2), d_out(kCalls * q_elems * 4),
        d_lse(kCalls * rows * 4);
    for (int k = 0; k < kCalls; ++k) {
      std::vector<uint16_t> q(q_elems);
      std::vector<float> qf(q_elems);
      for (size_t i = 0; i < q_elems; ++i) {
        q[i] = FloatToBf16(1.5f * normal(rng));
        qf[i] = Bf16ToFloat(q[i]);
      }
      ASSERT_TRUE(ReferencePartialAttention(ap, num_q, qf, host_blocks, absl::MakeSpan(ref_out[k]),
                                            absl::MakeSpan(ref_lse[k]))
                      .ok());
      // Call 0's query arrives from the delayed producer; the others' are in place.
      void* dst = k == 0 ? d_q_src.ptr : d_q.as<uint16_t>() + k * q_elems;
      TOKENLAKE_CUDA_OK(cudaMemcpy(dst, q.data(), q_elems * 2, cudaMemcpyHostToDevice));
    }
    TOKENLAKE_CUDA_OK(cudaMemset(d_q.ptr, 0xff, q_elems * 2));
    TOKENLAKE_CUDA_OK(cudaMemset(d_out.ptr, 0xff, kCalls * q_elems * 4));
    TOKENLAKE_CUDA_OK(cudaMemset(d_lse.ptr, 0xff, kCalls * rows * 4));
    const absl::Status delayed =
        EnqueueDelayedCopy(d_q.ptr, d_q_src.ptr, q_elems * 2, kPdlDelayNs, stream);
    ASSERT_TRUE(delayed.ok()) << delayed;
    static constexpr int kSplits[] = {0, 16, 40};
    const int splits = kSplits[trial];
    for (int k = 0; k < kCalls; ++k) {
      PagedAttentionParams p;
      p.q = d_q.as<uint16_t>() + k * q_elems;
      p.num_q_tokens = num_q;
      p.blocks = d_blocks.as<DeviceKvBlock>();
      p.num_blocks = nb;
      p.max_block_tokens = s.block_tokens;
      p.num_heads = s.num_heads;
      p.num_kv_heads = s.num_kv_heads;
      p.head_dim = s.head_dim;
      p.out = d_out.as<float>() + k * q_elems;
      p.lse = d_lse.as<float>() + k * rows;
      p.num_splits = splits;
      p.pdl = 1 + (k + trial) % 2;
      p.workspace = ws.ptr;
      p.workspace_bytes = kWsBytes;
      const absl::Status st = PagedAttention(p, AttentionKernel::kDecode, stream);
      ASSERT_TRUE(st.ok()) << st;
    }
    TOKENLAKE_CUDA_OK(cudaStreamSynchronize(stream));
    ExpectCountersZero(ws.ptr, kWsBytes);
    if (HasFatalFailure()) return;
    std::vector<float> out(kCalls * q_elems), lse(kCalls * rows);
    TOKENLAKE_CUDA_OK(cudaMemcpy(out.data(), d_out.ptr, out.size() * 4, cudaMemcpyDeviceToHost));
    TOKENLAKE_CUDA_OK(cudaMemcpy(lse.data(), d_lse.ptr, lse.size() * 4, cudaMemcpyDeviceToHost));
    for (int k = 0; k < kCalls; ++k) {
      SCOPED_TRACE(absl::StrFormat("trial %d call %d splits %d blocks %d q %d", trial, k, splits,
                                   nb, num_q));
      ExpectMatchesReference(absl::MakeConstSpan(out).subspan(k * q_elems, q_elems),
                             absl::MakeConstSpan(lse).subspan(k * rows, rows), ref_out[k],
                             ref_lse[k], s.head_dim);
      if (HasFatalFailure()) return;
    }
  }
  TOKENLAKE_CUDA_OK(cudaStreamDestroy(stream));
}

// Extra partials (other instances' partials, num_extra 0..4, random finite or -inf LSEs, rows
// where every partial is -inf) merged into the result on every path: the decode kernels' fused
// split merge (CUDA cores and tensor cores), their single-split epilogue, the separate split-merge
// kernel, prefill (mma.sync and Hopper, with and without splits), the small-head kernel (head_dim
// 16/32 shapes) and no keys at all; the decode calls share one reused workspace (counters back
// to zero after every call).
TEST_P(PagedAttentionGpuTest, ExtraPartialsMergeIntoTheResultOnEveryPath) {
  TOKENLAKE_SKIP_WITHOUT_GPU();
  const Shape shape = GetParam();
  const uint64_t seed = 9090 + shape.num_heads * 13 + shape.head_dim + shape.block_tokens;
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  constexpr size_t kWsBytes = 8 << 20;
  DeviceBuffer ws(kWsBytes);
  ASSERT_NE(ws.ptr, nullptr);
  PrepareWorkspace(ws.ptr, kWsBytes);
  for (int trial = 0; trial < 6; ++trial) {
    Case c;
    c.shape = shape;
    const int nb = static_cast<int>(rng() % 12);  // 0 blocks too
    for (int b = 0; b < nb; ++b) {
      const int r = static_cast<int>(rng() % 4);
      c.block_lens.push_back(r == 0   ? static_cast<int>(rng() % (shape.block_tokens + 1))
                             : r == 1 ? 0
                                      : shape.block_tokens);
    }
    int total = 0;
    for (int l : c.block_lens) total += l;
    c.causal = rng() % 3 == 0;
    c.softmax_scale = rng() % 3 == 0 ? 0.05f : 0.f;
    struct Path {
      AttentionKernel kernel;
      int decode_kernel;
      int prefill_kernel;
      bool decode;
    };
    static constexpr Path kPaths[] = {
        {AttentionKernel::kAuto, 0, 0, true},     {AttentionKernel::kDecode, 1, 0, true},
        {AttentionKernel::kDecode, 2, 0, true},   {AttentionKernel::kAuto, 0, 0, false},
        {AttentionKernel::kPrefill, 0, 1, false}, {AttentionKernel::kPrefill, 0, 2, false}};
    for (const Path& path : kPaths) {
      static constexpr int kDecodeQ[] = {1, 2, 4, 8};
      static constexpr int kPrefillQ[] = {9, 33, 130};
      c.num_q = path.decode ? kDecodeQ[rng() % 4] : kPrefillQ[rng() % 3];
      c.q_start_pos = c.causal ? static_cast<int>(rng() % (total + 2)) : 0;
      c.kernel = path.kernel;
      c.decode_kernel = path.decode_kernel;
      c.prefill_kernel = path.prefill_kernel;
      static constexpr int kSplits[] = {0, 1, 3, 16};
      c.num_splits = path.kernel == AttentionKernel::kAuto ? 0 : kSplits[rng() % 4];
      c.decode_merge = static_cast<int>(rng() % 2);  // fused, separate kernel
      c.num_extra = static_cast<int>(rng() % 5);     // 0..4
      // Decode reuses one workspace; prefill (partials of up to 130 tokens x 16 splits: more
      // than kWsBytes for 32 heads) gets a fresh one of the size it needs.
      if (path.decode) {
        RunAndCompare(c, rng, ws.ptr, kWsBytes);  // fresh random inputs each time
      } else {
        RunAndCompare(c, rng);
      }
      if (HasFatalFailure()) return;
    }
  }
}

TEST_P(PagedAttentionGpuTest, BatchedDecodeMatchesPerRequestReference) {
  TOKENLAKE_SKIP_WITHOUT_GPU();
  const Shape s = GetParam();
  const uint64_t seed = 4321 + s.num_heads * 7 + s.head_dim + s.block_tokens;
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const size_t block_elems = static_cast<size_t>(s.block_tokens) * s.num_kv_heads * s.head_dim;
  const size_t row_elems = static_cast<size_t>(s.num_kv_heads) * s.head_dim;
  for (int trial = 0; trial < 6; ++trial) {
    const int num_req = 1 + static_cast<int>(rng() % 12);
    std::vector<int> lens;  // all requests' blocks, concatenated
    std::vector<int32_t> offsets = {0};
    for (int r = 0; r < num_req; ++r) {
      const int nb = static_cast<int>(rng() % 7);
      for (int b = 0; b < nb; ++b) {
        const int k = static_cast<int>(rng() % 4);
        lens.push_back(k == 0   ? static_cast<int>(rng() % (s.block_tokens + 1))
                       : k == 1 ? 0
                                : s.block_tokens);
      }
      offsets.push_back(static_cast<int32_t>(lens.size()));
    }
    const int nb = static_cast<int>(lens.size());
    std::vector<uint16_t> kv(2 * block_elems * std::max(nb, 1));
    for (int b = 0; b < nb; ++b) {
      for (int kvi = 0; kvi < 2; ++kvi) {
        uint16_t* blk = kv.data() + (2 * b + kvi) * block_elems;
        for (size_t i = 0; i < block_elems; ++i) {
          const bool used = i / row_elems < static_cast<size_t>(lens[b]);
          blk[i] = FloatToBf16(used ? normal(rng) : 3.0e4f);
        }
      }
    }
    const size_t q_elems = static_cast<size_t>(num_req) * s.num_heads * s.head_dim;
    std::vector<uint16_t> q_bf16(q_elems);
    std::vector<float> q_f32(q_elems);
    for (size_t i = 0; i < q_elems; ++i) {
      q_bf16[i] = FloatToBf16(normal(rng) * 1.5f);
      q_f32[i] = Bf16ToFloat(q_bf16[i]);
    }
    const AttentionParams ap = ReferenceParams(s);
    const size_t req_q = static_cast<size_t>(s.num_heads) * s.head_dim;
    std::vector<float> ref_out(q_elems), ref_lse(static_cast<size_t>(num_req) * s.num_heads);
    for (int r = 0; r < num_req; ++r) {
      std::vector<KvBlock> hb;
      for (int b = offsets[r]; b < offsets[r + 1]; ++b) {
        hb.push_back(KvBlock{kv.data() + (2 * b) * block_elems,
                             kv.data() + (2 * b + 1) * block_elems, lens[b]});
      }
      ASSERT_TRUE(
          ReferencePartialAttention(ap, 1, absl::MakeConstSpan(q_f32).subspan(r * req_q, req_q), hb,
                                    absl::MakeSpan(ref_out).subspan(r * req_q, req_q),
                                    absl::MakeSpan(ref_lse).subspan(r * s.num_heads, s.num_heads))
              .ok());
    }
    // Extra partials (0..4) merged into the result; drawn from their own generator so that the
    // cases above are the same with or without them.
    std::mt19937_64 xrng(seed * 31 + trial);
    const int num_extra = static_cast<int>(xrng() % 5);
    std::vector<float> extra_out, extra_lse;
    AddRandomExtras(num_extra, ref_lse.size(), s.head_dim, xrng, extra_out, extra_lse, ref_out,
                    ref_lse);
    DeviceBuffer d_extra_out(extra_out.size() * 4), d_extra_lse(extra_lse.size() * 4);
    if (num_extra > 0) {
      TOKENLAKE_CUDA_OK(cudaMemcpy(d_extra_out.ptr, extra_out.data(), extra_out.size() * 4,
                                   cudaMemcpyHostToDevice));
      TOKENLAKE_CUDA_OK(cudaMemcpy(d_extra_lse.ptr, extra_lse.data(), extra_lse.size() * 4,
                                   cudaMemcpyHostToDevice));
    }
    DeviceBuffer d_kv(kv.size() * 2 + 16), d_q(q_elems * 2 + 16),
        d_blocks(sizeof(DeviceKvBlock) * std::max(nb, 1) + 16), d_off(offsets.size() * 4 + 16),
        d_out(q_elems * 4 + 16), d_lse(ref_lse.size() * 4 + 16);
    UploadBlocks(kv, lens, block_elems, d_kv, d_blocks);
    if (HasFatalFailure()) return;
    TOKENLAKE_CUDA_OK(cudaMemcpy(d_q.ptr, q_bf16.data(), q_elems * 2, cudaMemcpyHostToDevice));
    TOKENLAKE_CUDA_OK(
        cudaMemcpy(d_off.ptr, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));
    TOKENLAKE_CUDA_OK(cudaMemset(d_out.ptr, 0xff, q_elems * 4));  // NaN poison
    TOKENLAKE_CUDA_OK(cudaMemset(d_lse.ptr, 0xff, ref_lse.size() * 4));
    PagedAttentionParams p;
    p.q = d_q.ptr;
    p.num_q_tokens = num_req;
    p.blocks = d_blocks.as<DeviceKvBlock>();
    p.num_blocks = nb;
    p.max_block_tokens = s.block_tokens;
    p.num_heads = s.num_heads;
    p.num_kv_heads = s.num_kv_heads;
    p.head_dim = s.head_dim;
    p.out = d_out.as<float>();
    p.lse = d_lse.as<float>();
    p.q_block_offsets = d_off.as<int32_t>();
    p.num_extra = num_extra;
    p.extra_out = d_extra_out.as<float>();
    p.extra_lse = d_extra_lse.as<float>();
    static constexpr int kSplits[] = {0, 1, 2, 5, 64};
    p.num_splits = kSplits[rng() % 5];
    p.decode_merge = static_cast<int>(rng() % 2);
    p.decode_kernel = static_cast<int>(rng() % 3);  // auto, CUDA cores, tensor cores
    SCOPED_TRACE(absl::StrFormat("requests=%d blocks=%d splits=%d merge=%d kernel=%d extras=%d",
                                 num_req, nb, p.num_splits, p.decode_merge, p.decode_kernel,
                                 num_extra));
    absl::StatusOr<size_t> need = PagedAttentionWorkspaceBytes(p);
    ASSERT_TRUE(need.ok()) << need.status();
    DeviceBuffer d_ws(*need);
    PrepareWorkspace(d_ws.ptr, *need);
    p.workspace = d_ws.ptr;
    p.workspace_bytes = *need;
    const absl::Status st = PagedAttention(p);
    ASSERT_TRUE(st.ok()) << st;
    TOKENLAKE_CUDA_OK(cudaDeviceSynchronize());
    ExpectCountersZero(d_ws.ptr, *need);
    std::vector<float> out(q_elems), lse(ref_lse.size());
    TOKENLAKE_CUDA_OK(cudaMemcpy(out.data(), d_out.ptr, q_elems * 4, cudaMemcpyDeviceToHost));
    TOKENLAKE_CUDA_OK(cudaMemcpy(lse.data(), d_lse.ptr, lse.size() * 4, cudaMemcpyDeviceToHost));
    for (int r = 0; r < num_req; ++r) {
      SCOPED_TRACE(::testing::Message() << "request " << r);
      const size_t heads = static_cast<size_t>(s.num_heads);
      ExpectMatchesReference(absl::MakeConstSpan(out).subspan(r * req_q, req_q),
                             absl::MakeConstSpan(lse).subspan(r * heads, heads),
                             absl::MakeConstSpan(ref_out).subspan(r * req_q, req_q),
                             absl::MakeConstSpan(ref_lse).subspan(r * heads, heads), s.head_dim);
      if (HasFatalFailure()) return;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, PagedAttentionGpuTest,
                         ::testing::Values(Shape{4, 4, 64, 16}, Shape{8, 2, 128, 64},
                                           Shape{32, 8, 128, 100}, Shape{8, 1, 64, 256},
                                           Shape{12, 4, 128, 64}, Shape{32, 8, 128, 256},
                                           // Small head dims (SmallHeadKernel): the tiny
                                           // fixture models' shapes (head_dim 16, GQA 2 and 4).
                                           Shape{4, 2, 16, 16}, Shape{4, 1, 16, 5},
                                           Shape{8, 2, 32, 16}),
                         ShapeName);

TEST(PagedAttentionGpuTest, NoBlocksGivesEmptyPartial) {
  TOKENLAKE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(7);
  Case c;
  c.shape = Shape{8, 2, 128, 64};
  c.num_q = 20;
  RunAndCompare(c, rng);  // zero blocks
  c.block_lens = {0, 0, 0};
  RunAndCompare(c, rng);  // only empty blocks
  c.kernel = AttentionKernel::kDecode;
  RunAndCompare(c, rng);
}

// Merge kernels against the CPU merge of attention.h, with -inf rows mixed in.
TEST(PagedAttentionGpuTest, MergesMatchCpuMerge) {
  TOKENLAKE_SKIP_WITHOUT_GPU();
  const uint64_t seed = 4242;
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int d : {64, 128, 12}) {
    for (int parts : {1, 2, 3, 9}) {
      const int num_q = 7, heads = 5;
      const int64_t rows = num_q * heads;
      std::vector<float> outs(parts * rows * d), lses(parts * rows);
      for (float& v : outs) v = normal(rng);
      for (float& v : lses) v = rng() % 4 == 0 ? -kInf : normal(rng) * 5.f;
      for (int p = 0; p < parts; ++p) lses[p * rows + 3] = -kInf;  // one all-empty row
      // CPU: fold with MergePartialsInPlace.
      PartialShape shape{num_q, heads, d};
      std::vector<float> acc_o(outs.begin(), outs.begin() + rows * d);
      std::vector<float> acc_l(lses.begin(), lses.begin() + rows);
      std::vector<PartialView> others;
      for (int p = 1; p < parts; ++p) {
        others.push_back({absl::MakeConstSpan(outs).subspan(p * rows * d, rows * d),
                          absl::MakeConstSpan(lses).subspan(p * rows, rows)});
      }
      ASSERT_TRUE(
          MergePartialsInPlace(shape, {absl::MakeSpan(acc_o), absl::MakeSpan(acc_l)}, others).ok());
      DeviceBuffer d_outs(outs.size() * 4), d_lses(lses.size() * 4), d_o(rows * d * 4),
          d_l(rows * 4);
      TOKENLAKE_CUDA_OK(
          cudaMemcpy(d_outs.ptr, outs.data(), outs.size() * 4, cudaMemcpyHostToDevice));
      TOKENLAKE_CUDA_OK(
          cudaMemcpy(d_lses.ptr, lses.data(), lses.size() * 4, cudaMemcpyHostToDevice));
      TOKENLAKE_CUDA_OK(cudaMemset(d_o.ptr, 0xff, rows * d * 4));
      TOKENLAKE_CUDA_OK(cudaMemset(d_l.ptr, 0xff, rows * 4));
      ASSERT_TRUE(MergePartialsN(d_outs.as<float>(), d_lses.as<float>(), parts, rows, d,
                                 d_o.as<float>(), d_l.as<float>())
                      .ok());
      std::vector<float> o(rows * d), l(rows);
      TOKENLAKE_CUDA_OK(cudaMemcpy(o.data(), d_o.ptr, o.size() * 4, cudaMemcpyDeviceToHost));
      TOKENLAKE_CUDA_OK(cudaMemcpy(l.data(), d_l.ptr, l.size() * 4, cudaMemcpyDeviceToHost));
      for (int64_t r = 0; r < rows; ++r) {
        SCOPED_TRACE(absl::StrFormat("d=%d parts=%d row=%d", d, parts, r));
        if (acc_l[r] == -kInf) {
          ASSERT_EQ(l[r], -kInf);
        } else {
          ASSERT_NEAR(l[r], acc_l[r], 1e-4f * std::max(1.f, std::fabs(acc_l[r])));
        }
        for (int i = 0; i < d; ++i) ASSERT_NEAR(o[r * d + i], acc_o[r * d + i], 1e-4f);
      }
      if (parts == 2) {
        // In-place two-way merge: a <- merge(a, b).
        TOKENLAKE_CUDA_OK(cudaMemcpy(d_o.ptr, outs.data(), rows * d * 4, cudaMemcpyHostToDevice));
        TOKENLAKE_CUDA_OK(cudaMemcpy(d_l.ptr, lses.data(), rows * 4, cudaMemcpyHostToDevice));
        ASSERT_TRUE(MergePartials(d_o.as<float>(), d_l.as<float>(), d_outs.as<float>() + rows * d,
                                  d_lses.as<float>() + rows, rows, d)
                        .ok());
        TOKENLAKE_CUDA_OK(cudaMemcpy(o.data(), d_o.ptr, o.size() * 4, cudaMemcpyDeviceToHost));
        TOKENLAKE_CUDA_OK(cudaMemcpy(l.data(), d_l.ptr, l.size() * 4, cudaMemcpyDeviceToHost));
        for (int64_t r = 0; r < rows; ++r) {
          if (acc_l[r] == -kInf) {
            ASSERT_EQ(l[r], -kInf);
          } else {
            ASSERT_NEAR(l[r], acc_l[r], 1e-4f * std::max(1.f, std::fabs(acc_l[r])));
          }
          for (int i = 0; i < d; ++i) ASSERT_NEAR(o[r * d + i], acc_o[r * d + i], 1e-4f);
        }
      }
    }
  }
}

// Bad input is a clear InvalidArgument before any GPU work (runs without a GPU).
TEST(PagedAttentionArgsTest, RejectsBadShapesWithClearErrors) {
  PagedAttentionParams p;
  p.num_q_tokens = 4;
  p.num_blocks = 1;
  p.max_block_tokens = 16;
  float dummy = 0;
  p.out = &dummy;
  p.lse = &dummy;
  p.q = &dummy;
  p.blocks = reinterpret_cast<const DeviceKvBlock*>(&dummy);

  auto expect_invalid = [](const PagedAttentionParams& params, const std::string& field) {
    const absl::Status s = PagedAttention(params);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(field), std::string::npos) << s;
    EXPECT_EQ(PagedAttentionWorkspaceBytes(params).status().code(),
              absl::StatusCode::kInvalidArgument);
  };
  PagedAttentionParams bad = p;
  bad.head_dim = 96;
  expect_invalid(bad, "head_dim");
  bad = p;
  bad.num_heads = 10;
  bad.num_kv_heads = 4;
  expect_invalid(bad, "num_heads");
  bad = p;
  bad.num_q_tokens = -1;
  expect_invalid(bad, "num_q_tokens");
  bad = p;
  bad.num_blocks = -2;
  expect_invalid(bad, "num_blocks");
  bad = p;
  bad.max_block_tokens = 0;
  expect_invalid(bad, "max_block_tokens");
  bad = p;
  bad.out = nullptr;
  expect_invalid(bad, "out");
  bad = p;
  bad.q_start_pos = -3;
  expect_invalid(bad, "q_start_pos");
  bad = p;
  bad.num_extra = -1;
  expect_invalid(bad, "num_extra");
  bad = p;
  bad.num_extra = 2;
  bad.extra_lse = &dummy;
  expect_invalid(bad, "extra_out");
  bad = p;
  bad.num_extra = 1;
  bad.extra_out = &dummy;
  expect_invalid(bad, "extra_lse");
  bad = p;
  bad.prefill_kernel = 3;
  expect_invalid(bad, "prefill_kernel");
  bad = p;
  bad.decode_merge = 2;
  expect_invalid(bad, "decode_merge");
  bad = p;
  bad.causal = true;
  bad.q_block_offsets = reinterpret_cast<const int32_t*>(&dummy);
  expect_invalid(bad, "q_block_offsets");
  bad = p;
  bad.decode_pipeline = 3;
  expect_invalid(bad, "decode_pipeline");
  bad = p;
  bad.decode_unroll = 3;
  expect_invalid(bad, "decode_unroll");
  bad = p;
  bad.prefill_warps = 6;
  expect_invalid(bad, "prefill_warps");
  bad = p;
  bad.prefill_rows_per_warp = 8;
  expect_invalid(bad, "prefill_rows_per_warp");
  bad = p;
  bad.decode_kernel = 3;
  expect_invalid(bad, "decode_kernel");
  bad = p;
  bad.decode_mma_stages = 5;
  expect_invalid(bad, "decode_mma_stages");
  bad = p;
  bad.decode_mma_descriptors = 3;
  expect_invalid(bad, "decode_mma_descriptors");
  bad = p;
  bad.pdl = 3;
  expect_invalid(bad, "pdl");
  bad.pdl = -1;
  expect_invalid(bad, "pdl");
  bad = p;
  bad.num_splits = -1;
  expect_invalid(bad, "num_splits");

  EXPECT_EQ(MergePartials(nullptr, nullptr, nullptr, nullptr, -1, 128).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MergePartials(&dummy, &dummy, &dummy, &dummy, 1, 6).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MergePartialsN(nullptr, nullptr, -1, 1, 128, &dummy, &dummy).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MergePartialsN(nullptr, nullptr, 2, 1, 128, &dummy, &dummy).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(PagedAttentionGpuTest, TooSmallWorkspaceIsInvalidArgument) {
  TOKENLAKE_SKIP_WITHOUT_GPU();
  PagedAttentionParams p;
  p.num_q_tokens = 1;
  p.num_blocks = 64;
  p.max_block_tokens = 512;
  float* dummy = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dummy), 1 << 20), cudaSuccess);
  p.q = dummy;
  p.blocks = reinterpret_cast<const DeviceKvBlock*>(dummy);
  p.out = dummy;
  p.lse = dummy;
  absl::StatusOr<size_t> ws = PagedAttentionWorkspaceBytes(p);
  ASSERT_TRUE(ws.ok());
  ASSERT_GT(*ws, 0u);
  p.workspace = dummy;
  p.workspace_bytes = *ws - 1;
  const absl::Status s = PagedAttention(p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("workspace"), std::string::npos);
  cudaFree(dummy);
}

}  // namespace
}  // namespace tokenlake::attention::cuda
