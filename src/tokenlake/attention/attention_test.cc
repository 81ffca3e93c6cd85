#include "tokenlake/attention/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/attention/attention_reference.h"
#include "tokenlake/attention/bf16.h"
#include "tokenlake/attention/cpu_kernel.h"
#include "tokenlake/base/random.h"

namespace tokenlake::attention {
namespace {

using ::testing::HasSubstr;

constexpr float kInf = std::numeric_limits<float>::infinity();

// Segments of KV for one layer, each S rows, stored in the requested dtype.
class KvStore {
 public:
  KvStore(int num_kv_heads, int head_dim, KvDtype dtype)
      : num_kv_heads_(num_kv_heads), head_dim_(head_dim), dtype_(dtype) {}

  // Adds a segment with `capacity` rows of random K and V in [-amp, amp]; returns its index.
  size_t AddSegment(int capacity, Rng& rng, float amp) {
    const size_t n = static_cast<size_t>(capacity) * num_kv_heads_ * head_dim_;
    std::vector<float> k(n);
    std::vector<float> v(n);
    for (auto& x : k) x = static_cast<float>((rng.UniformDouble() * 2 - 1) * amp);
    for (auto& x : v) x = static_cast<float>(rng.UniformDouble() * 2 - 1);
    Segment s;
    s.capacity = capacity;
    if (dtype_ == KvDtype::kFloat32) {
      s.k32 = std::move(k);
      s.v32 = std::move(v);
    } else {
      s.k16.resize(n);
      s.v16.resize(n);
      EXPECT_TRUE(FloatToBf16(absl::MakeConstSpan(k), absl::MakeSpan(s.k16)).ok());
      EXPECT_TRUE(FloatToBf16(absl::MakeConstSpan(v), absl::MakeSpan(s.v16)).ok());
    }
    segments_.push_back(std::move(s));
    return segments_.size() - 1;
  }

  // Block over rows [row_begin, row_begin + num_tokens) of segment i.
  KvBlock Block(size_t i, int row_begin, int num_tokens) const {
    const Segment& s = segments_[i];
    const size_t off = static_cast<size_t>(row_begin) * num_kv_heads_ * head_dim_;
    KvBlock b;
    b.num_tokens = num_tokens;
    if (dtype_ == KvDtype::kFloat32) {
      b.k = s.k32.data() + off;
      b.v = s.v32.data() + off;
    } else {
      b.k = s.k16.data() + off;
      b.v = s.v16.data() + off;
    }
    return b;
  }

 private:
  struct Segment {
    int capacity = 0;
    std::vector<float> k32, v32;
    std::vector<uint16_t> k16, v16;
  };
  int num_kv_heads_;
  int head_dim_;
  KvDtype dtype_;
  std::vector<Segment> segments_;
};

std::vector<float> RandomQueries(int nq, int num_heads, int head_dim, Rng& rng, float amp) {
  std::vector<float> q(static_cast<size_t>(nq) * num_heads * head_dim);
  for (auto& x : q) x = static_cast<float>((rng.UniformDouble() * 2 - 1) * amp);
  return q;
}

struct Partial {
  std::vector<float> out;
  std::vector<float> lse;
  Partial(int nq, const AttentionParams& p)
      : out(static_cast<size_t>(nq) * p.num_heads * p.head_dim, 12345.0f),
        lse(static_cast<size_t>(nq) * p.num_heads, 12345.0f) {}
  PartialView view() const { return {out, lse}; }
  MutablePartialView mut() { return {absl::MakeSpan(out), absl::MakeSpan(lse)}; }
};

// Expects a and b to agree: lse within tol * max(1, |lse|), out within tol, -inf identical.
void ExpectPartialsNear(const Partial& got, const Partial& want, double tol) {
  ASSERT_EQ(got.out.size(), want.out.size());
  ASSERT_EQ(got.lse.size(), want.lse.size());
  const size_t d = want.lse.empty() ? 0 : want.out.size() / want.lse.size();
  for (size_t r = 0; r < want.lse.size(); ++r) {
    if (std::isinf(want.lse[r])) {
      ASSERT_EQ(got.lse[r], want.lse[r]) << "row " << r;
    } else {
      ASSERT_NEAR(got.lse[r], want.lse[r], tol * std::max(1.0f, std::fabs(want.lse[r])))
          << "row " << r;
    }
    for (size_t i = 0; i < d; ++i) {
      ASSERT_NEAR(got.out[r * d + i], want.out[r * d + i], tol) << "row " << r << " elem " << i;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Random shapes against the naive reference.

class RandomShapeTest : public ::testing::TestWithParam<std::tuple<KvDtype, int, bool>> {
 protected:
  void TearDown() override { internal::ForceBaselineKernelForTesting(false); }
};

TEST_P(RandomShapeTest, FastPathMatchesReference) {
  const auto [dtype, group, baseline] = GetParam();
  // baseline: run the SSE2 clone even on a CPU with AVX2, so both clones are tested.
  internal::ForceBaselineKernelForTesting(baseline);
  const uint64_t seed = 1000 + static_cast<uint64_t>(group) * 7 + static_cast<int>(dtype);
  std::cout << "seed=" << seed << "\n";
  Rng rng(seed);
  const int kHeadDims[] = {64, 128, 1, 3, 7, 8, 17, 33, 80, 96};
  for (int c = 0; c < 24; ++c) {
    SCOPED_TRACE(testing::Message() << "seed=" << seed << " case=" << c);
    AttentionParams p;
    p.num_kv_heads = static_cast<int>(rng.UniformInt(1, std::max<int64_t>(1, 32 / group / 4)));
    p.num_heads = p.num_kv_heads * group;
    p.head_dim = kHeadDims[rng.UniformInt(0, 9)];
    p.kv_dtype = dtype;
    p.causal = rng.Bernoulli(0.5);
    const int segment_tokens = static_cast<int>(rng.UniformInt(1, 48));
    const int num_blocks = static_cast<int>(rng.UniformInt(0, 6));
    const int nq = static_cast<int>(rng.UniformInt(c == 0 ? 0 : 1, 20));
    const float amp = rng.Bernoulli(0.3) ? 4.0f : 1.0f;
    KvStore store(p.num_kv_heads, p.head_dim, dtype);
    std::vector<KvBlock> blocks;
    int64_t total = 0;
    for (int b = 0; b < num_blocks; ++b) {
      const size_t s = store.AddSegment(segment_tokens, rng, amp);
      const int n = static_cast<int>(rng.UniformInt(0, segment_tokens));
      blocks.push_back(store.Block(s, 0, n));
      total += n;
    }
    if (p.causal) p.q_start_pos = rng.UniformInt(0, total);
    if (rng.Bernoulli(0.2)) p.softmax_scale = 0.05f;
    SCOPED_TRACE(testing::Message()
                 << "heads=" << p.num_heads << "/" << p.num_kv_heads << " d=" << p.head_dim
                 << " S=" << segment_tokens << " blocks=" << num_blocks << " keys=" << total
                 << " nq=" << nq << " causal=" << p.causal << " q_start=" << p.q_start_pos);
    const std::vector<float> q = RandomQueries(nq, p.num_heads, p.head_dim, rng, amp);
    Partial want(nq, p);
    Partial got(nq, p);
    ASSERT_TRUE(ReferencePartialAttention(p, nq, q, blocks, absl::MakeSpan(want.out),
                                          absl::MakeSpan(want.lse))
                    .ok());
    ASSERT_TRUE(
        PartialAttention(p, nq, q, blocks, absl::MakeSpan(got.out), absl::MakeSpan(got.lse)).ok());
    ExpectPartialsNear(got, want, 5e-6);
  }
}

INSTANTIATE_TEST_SUITE_P(DtypesAndGroups, RandomShapeTest,
                         ::testing::Combine(::testing::Values(KvDtype::kFloat32,
                                                              KvDtype::kBFloat16),
                                            ::testing::Values(1, 2, 4, 8, 32), ::testing::Bool()),
                         [](const auto& param_info) {
                           return std::string(KvDtypeName(std::get<0>(param_info.param))) +
                                  "_group" + std::to_string(std::get<1>(param_info.param)) +
                                  (std::get<2>(param_info.param) ? "_baseline" : "_dispatched");
                         });

// ---------------------------------------------------------------------------------------------
// Hand-checked cases.

TEST(PartialAttentionTest, NoKeysGivesEmptyPartial) {
  AttentionParams p{.num_heads = 4, .num_kv_heads = 2, .head_dim = 8};
  Rng rng(1);
  const std::vector<float> q = RandomQueries(3, 4, 8, rng, 1.0f);
  std::vector<KvBlock> blocks = {KvBlock{nullptr, nullptr, 0}, KvBlock{nullptr, nullptr, 0}};
  for (bool causal : {false, true}) {
    p.causal = causal;
    Partial got(3, p);
    ASSERT_TRUE(
        PartialAttention(p, 3, q, blocks, absl::MakeSpan(got.out), absl::MakeSpan(got.lse)).ok());
    for (float x : got.out) EXPECT_EQ(x, 0.0f);
    for (float x : got.lse) EXPECT_EQ(x, -kInf);
  }
}

TEST(PartialAttentionTest, SingleKeyReturnsItsValueAndScaledScore) {
  // One query, one head, d = 3, one key: out = v exactly, lse = scale * q.k.
  AttentionParams p{.num_heads = 1, .num_kv_heads = 1, .head_dim = 3};
  const std::vector<float> q = {1.0f, 2.0f, -1.0f};
  const std::vector<float> k = {0.5f, 0.25f, 2.0f};
  const std::vector<float> v = {3.0f, -4.0f, 0.125f};
  const KvBlock block{k.data(), v.data(), 1};
  Partial got(1, p);
  ASSERT_TRUE(
      PartialAttention(p, 1, q, {&block, 1}, absl::MakeSpan(got.out), absl::MakeSpan(got.lse))
          .ok());
  EXPECT_FLOAT_EQ(got.out[0], 3.0f);
  EXPECT_FLOAT_EQ(got.out[1], -4.0f);
  EXPECT_FLOAT_EQ(got.out[2], 0.125f);
  // q.k = 0.5 + 0.5 - 2 = -1; scale = 1/sqrt(3).
  EXPECT_NEAR(got.lse[0], -1.0 / std::sqrt(3.0), 1e-6);
}

TEST(PartialAttentionTest, TwoEqualScoresAverageValuesAndAddLog2) {
  AttentionParams p{.num_heads = 1, .num_kv_heads = 1, .head_dim = 2, .softmax_scale = 1.0f};
  const std::vector<float> q = {0.0f, 0.0f};
  const std::vector<float> k = {1.0f, 2.0f, 3.0f, 4.0f};
  const std::vector<float> v = {2.0f, 0.0f, 4.0f, 8.0f};
  const KvBlock block{k.data(), v.data(), 2};
  Partial got(1, p);
  ASSERT_TRUE(
      PartialAttention(p, 1, q, {&block, 1}, absl::MakeSpan(got.out), absl::MakeSpan(got.lse))
          .ok());
  EXPECT_FLOAT_EQ(got.out[0], 3.0f);
  EXPECT_FLOAT_EQ(got.out[1], 4.0f);
  EXPECT_NEAR(got.lse[0], std::log(2.0), 1e-6);
}

TEST(PartialAttentionTest, CausalFirstQuerySeesOnlyKeyZero) {
  AttentionParams p{.num_heads = 1, .num_kv_heads = 1, .head_dim = 1, .causal = true};
  const std::vector<float> q = {1.0f, 1.0f};
  const std::vector<float> k = {1.0f, 100.0f};
  const std::vector<float> v = {7.0f, -7.0f};
  const KvBlock block{k.data(), v.data(), 2};
  Partial got(2, p);
  ASSERT_TRUE(
      PartialAttention(p, 2, q, {&block, 1}, absl::MakeSpan(got.out), absl::MakeSpan(got.lse))
          .ok());
  EXPECT_FLOAT_EQ(got.out[0], 7.0f);  // query 0 cannot see key 1
  EXPECT_FLOAT_EQ(got.lse[0], 1.0f);
  EXPECT_NEAR(got.out[1], -7.0f, 1e-6);  // key 1 dominates for query 1
}

TEST(PartialAttentionTest, LongMqaDecodeMatchesReference) {
  // One token, MQA with 8 heads over 40 segments (part-segments among them): one tile of all
  // heads streams every key.
  for (KvDtype dtype : {KvDtype::kFloat32, KvDtype::kBFloat16}) {
    const uint64_t seed = 77 + static_cast<int>(dtype);
    SCOPED_TRACE(testing::Message() << "seed=" << seed);
    Rng rng(seed);
    AttentionParams p{.num_heads = 8, .num_kv_heads = 1, .head_dim = 64, .kv_dtype = dtype};
    KvStore store(1, 64, dtype);
    std::vector<KvBlock> blocks;
    for (int b = 0; b < 40; ++b)
      blocks.push_back(store.Block(store.AddSegment(64, rng, 2.0f), 0, 64 - b % 3));
    const std::vector<float> q = RandomQueries(1, 8, 64, rng, 2.0f);
    Partial want(1, p);
    Partial got(1, p);
    ASSERT_TRUE(ReferencePartialAttention(p, 1, q, blocks, absl::MakeSpan(want.out),
                                          absl::MakeSpan(want.lse))
                    .ok());
    ASSERT_TRUE(
        PartialAttention(p, 1, q, blocks, absl::MakeSpan(got.out), absl::MakeSpan(got.lse)).ok());
    ExpectPartialsNear(got, want, 5e-6);
  }
}

// Results within tolerance of the reference, bit-identical from one run to the next.
TEST(PartialAttentionTest, ResultsMatchReferenceAndAreDeterministic) {
  const uint64_t seed = 901;
  std::cout << "seed=" << seed << "\n";
  Rng rng(seed);
  for (int nq : {1, 3, 9}) {
    SCOPED_TRACE(testing::Message() << "seed=" << seed << " nq=" << nq);
    AttentionParams p{
        .num_heads = 12, .num_kv_heads = 3, .head_dim = 40, .kv_dtype = KvDtype::kBFloat16};
    KvStore store(3, 40, p.kv_dtype);
    std::vector<KvBlock> blocks;
    for (int b = 0; b < 30; ++b) {
      blocks.push_back(
          store.Block(store.AddSegment(48, rng, 2.0f), 0, static_cast<int>(rng.UniformInt(0, 48))));
    }
    const std::vector<float> q = RandomQueries(nq, 12, 40, rng, 2.0f);
    Partial want(nq, p), first(nq, p), second(nq, p);
    ASSERT_TRUE(ReferencePartialAttention(p, nq, q, blocks, absl::MakeSpan(want.out),
                                          absl::MakeSpan(want.lse))
                    .ok());
    ASSERT_TRUE(
        PartialAttention(p, nq, q, blocks, absl::MakeSpan(first.out), absl::MakeSpan(first.lse))
            .ok());
    ASSERT_TRUE(
        PartialAttention(p, nq, q, blocks, absl::MakeSpan(second.out), absl::MakeSpan(second.lse))
            .ok());
    ExpectPartialsNear(first, want, 5e-6);
    EXPECT_EQ(first.out, second.out);
    EXPECT_EQ(first.lse, second.lse);
  }
}

// ---------------------------------------------------------------------------------------------
// Merge.

class MergeSplitTest : public ::testing::TestWithParam<int> {};

// Splits the keys at random points (also inside blocks), computes one partial per chunk,
// merges them (2-way fold and n-way in place) and compares with the reference over all keys.
TEST_P(MergeSplitTest, MergedChunksEqualFullAttention) {
  const int num_chunks = GetParam();
  const uint64_t seed = 5000 + static_cast<uint64_t>(num_chunks);
  std::cout << "seed=" << seed << "\n";
  Rng rng(seed);
  for (int c = 0; c < 8; ++c) {
    SCOPED_TRACE(testing::Message() << "seed=" << seed << " case=" << c);
    const KvDtype dtype = rng.Bernoulli(0.5) ? KvDtype::kFloat32 : KvDtype::kBFloat16;
    AttentionParams p;
    p.num_kv_heads = static_cast<int>(rng.UniformInt(1, 4));
    p.num_heads = p.num_kv_heads * static_cast<int>(1 << rng.UniformInt(0, 3));
    p.head_dim = rng.Bernoulli(0.5) ? 64 : static_cast<int>(rng.UniformInt(1, 40));
    p.kv_dtype = dtype;
    const int nq = static_cast<int>(rng.UniformInt(1, 12));
    KvStore store(p.num_kv_heads, p.head_dim, dtype);
    // The full key list as (segment, row) runs.
    std::vector<KvBlock> full;
    std::vector<std::pair<size_t, int>> seg_rows;
    const int num_segments = static_cast<int>(rng.UniformInt(1, 5));
    for (int s = 0; s < num_segments; ++s) {
      const int n = static_cast<int>(rng.UniformInt(1, 40));
      const size_t id = store.AddSegment(n, rng, 3.0f);
      full.push_back(store.Block(id, 0, n));
      seg_rows.emplace_back(id, n);
    }
    int64_t total = 0;
    for (const auto& b : full) total += b.num_tokens;
    // Random cut points (may repeat: empty chunks are allowed).
    std::vector<int64_t> cuts = {0, total};
    for (int i = 0; i + 1 < num_chunks; ++i) cuts.push_back(rng.UniformInt(0, total));
    std::sort(cuts.begin(), cuts.end());
    const std::vector<float> q = RandomQueries(nq, p.num_heads, p.head_dim, rng, 1.0f);
    std::vector<Partial> partials;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) {
      std::vector<KvBlock> chunk;
      int64_t pos = 0;
      for (const auto& [id, n] : seg_rows) {
        const int64_t lo = std::max<int64_t>(cuts[i], pos);
        const int64_t hi = std::min<int64_t>(cuts[i + 1], pos + n);
        if (lo < hi) {
          chunk.push_back(store.Block(id, static_cast<int>(lo - pos), static_cast<int>(hi - lo)));
        }
        pos += n;
      }
      partials.emplace_back(nq, p);
      ASSERT_TRUE(PartialAttention(p, nq, q, chunk, absl::MakeSpan(partials.back().out),
                                   absl::MakeSpan(partials.back().lse))
                      .ok());
    }
    Partial want(nq, p);
    ASSERT_TRUE(ReferencePartialAttention(p, nq, q, full, absl::MakeSpan(want.out),
                                          absl::MakeSpan(want.lse))
                    .ok());
    const PartialShape shape{nq, p.num_heads, p.head_dim};
    // 2-way fold, in place into a copy of partial 0.
    Partial folded = partials[0];
    for (size_t i = 1; i < partials.size(); ++i) {
      ASSERT_TRUE(MergePartials(shape, folded.view(), partials[i].view(), folded.mut()).ok());
    }
    ExpectPartialsNear(folded, want, 5e-6);
    // n-way in place.
    Partial nway = partials[0];
    std::vector<PartialView> others;
    for (size_t i = 1; i < partials.size(); ++i) others.push_back(partials[i].view());
    ASSERT_TRUE(MergePartialsInPlace(shape, nway.mut(), others).ok());
    ExpectPartialsNear(nway, want, 5e-6);
  }
}

INSTANTIATE_TEST_SUITE_P(Chunks, MergeSplitTest, ::testing::Values(1, 2, 3, 5, 9));

TEST(MergeTest, CachedPartialPlusCausalNewTokensEqualsCausalAttentionOverAll) {
  // The serving pattern: new tokens see every cached token (causal=false) and, causally, each
  // other (causal=true, q_start_pos=0). Merged, that is causal attention over cached+new with
  // q_start_pos = number of cached tokens.
  const uint64_t seed = 4242;
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  Rng rng(seed);
  AttentionParams p{.num_heads = 8, .num_kv_heads = 2, .head_dim = 32};
  const int nq = 13;
  KvStore store(2, 32, KvDtype::kFloat32);
  const size_t cached_a = store.AddSegment(16, rng, 2.0f);
  const size_t cached_b = store.AddSegment(16, rng, 2.0f);
  const size_t fresh = store.AddSegment(nq, rng, 2.0f);
  const std::vector<KvBlock> cached = {store.Block(cached_a, 0, 16), store.Block(cached_b, 0, 9)};
  const std::vector<KvBlock> own = {store.Block(fresh, 0, nq)};
  const std::vector<KvBlock> all = {cached[0], cached[1], own[0]};
  const std::vector<float> q = RandomQueries(nq, 8, 32, rng, 1.0f);
  Partial a(nq, p), b(nq, p), want(nq, p);
  ASSERT_TRUE(
      PartialAttention(p, nq, q, cached, absl::MakeSpan(a.out), absl::MakeSpan(a.lse)).ok());
  AttentionParams pc = p;
  pc.causal = true;
  ASSERT_TRUE(PartialAttention(pc, nq, q, own, absl::MakeSpan(b.out), absl::MakeSpan(b.lse)).ok());
  AttentionParams pall = p;
  pall.causal = true;
  pall.q_start_pos = 25;
  ASSERT_TRUE(ReferencePartialAttention(pall, nq, q, all, absl::MakeSpan(want.out),
                                        absl::MakeSpan(want.lse))
                  .ok());
  ASSERT_TRUE(MergePartials({nq, 8, 32}, a.view(), b.view(), a.mut()).ok());
  ExpectPartialsNear(a, want, 1e-5);
}

TEST(MergeTest, EmptyPartialsContributeNothingEvenWithGarbageOutputs) {
  const PartialShape shape{1, 2, 3};
  // Row 0: a empty (garbage out), b real. Row 1: both empty.
  std::vector<float> oa = {NAN, NAN, NAN, 9.0f, 9.0f, 9.0f};
  std::vector<float> la = {-kInf, -kInf};
  std::vector<float> ob = {1.0f, 2.0f, 3.0f, NAN, 1.0f, 1.0f};
  std::vector<float> lb = {0.5f, -kInf};
  std::vector<float> o(6, 7.0f), l(2, 7.0f);
  ASSERT_TRUE(
      MergePartials(shape, {oa, la}, {ob, lb}, {absl::MakeSpan(o), absl::MakeSpan(l)}).ok());
  EXPECT_THAT(o, ::testing::ElementsAre(1.0f, 2.0f, 3.0f, 0.0f, 0.0f, 0.0f));
  EXPECT_EQ(l[0], 0.5f);
  EXPECT_EQ(l[1], -kInf);
  // The same through the n-way merge, acc empty.
  std::vector<float> acc_o = oa, acc_l = la;
  const PartialView others[] = {{ob, lb}};
  ASSERT_TRUE(
      MergePartialsInPlace(shape, {absl::MakeSpan(acc_o), absl::MakeSpan(acc_l)}, others).ok());
  EXPECT_THAT(acc_o, ::testing::ElementsAre(1.0f, 2.0f, 3.0f, 0.0f, 0.0f, 0.0f));
  EXPECT_EQ(acc_l[0], 0.5f);
  EXPECT_EQ(acc_l[1], -kInf);
}

TEST(MergeTest, EqualLseAveragesAndAddsLog2) {
  std::vector<float> oa = {2.0f}, la = {1.0f}, ob = {4.0f}, lb = {1.0f}, o(1), l(1);
  ASSERT_TRUE(
      MergePartials({1, 1, 1}, {oa, la}, {ob, lb}, {absl::MakeSpan(o), absl::MakeSpan(l)}).ok());
  EXPECT_FLOAT_EQ(o[0], 3.0f);
  EXPECT_NEAR(l[0], 1.0 + std::log(2.0), 1e-6);
}

TEST(MergeTest, LargeLseDoNotOverflow) {
  std::vector<float> oa = {1.0f}, la = {1000.0f}, ob = {3.0f}, lb = {1000.0f + std::log(3.0f)};
  std::vector<float> o(1), l(1);
  ASSERT_TRUE(
      MergePartials({1, 1, 1}, {oa, la}, {ob, lb}, {absl::MakeSpan(o), absl::MakeSpan(l)}).ok());
  EXPECT_NEAR(o[0], 0.25 * 1 + 0.75 * 3, 1e-5);
  EXPECT_NEAR(l[0], 1000.0 + std::log(4.0), 1e-3);
}

TEST(MergeTest, FillEmptyPartialIsTheIdentity) {
  std::vector<float> o(4, 3.0f), l(2, 3.0f);
  ASSERT_TRUE(FillEmptyPartial({1, 2, 2}, {absl::MakeSpan(o), absl::MakeSpan(l)}).ok());
  EXPECT_THAT(o, ::testing::Each(0.0f));
  EXPECT_THAT(l, ::testing::Each(-kInf));
  std::vector<float> bo = {1, 2, 3, 4}, bl = {0.1f, 0.2f};
  ASSERT_TRUE(
      MergePartials({1, 2, 2}, {o, l}, {bo, bl}, {absl::MakeSpan(o), absl::MakeSpan(l)}).ok());
  EXPECT_EQ(o, bo);
  EXPECT_EQ(l, bl);
}

// ---------------------------------------------------------------------------------------------
// Bad input.

TEST(ValidationTest, BadShapesAreInvalidArgumentAndLeaveOutputUntouched) {
  const std::vector<float> kv(64, 1.0f);
  struct BadCase {
    std::string name;
    AttentionParams params;
    int nq;
    KvBlock block;
    size_t q_size, out_size, lse_size;
    std::string expect_substr;
  };
  const AttentionParams ok{.num_heads = 4, .num_kv_heads = 2, .head_dim = 4};
  auto with = [&](auto f) {
    AttentionParams p = ok;
    f(p);
    return p;
  };
  const KvBlock good{kv.data(), kv.data(), 2};
  const std::vector<BadCase> cases = {
      {"heads not multiple", with([](auto& p) { p.num_heads = 3; }), 1, good, 12, 12, 3,
       "multiple of num_kv_heads"},
      {"head_dim 0", with([](auto& p) { p.head_dim = 0; }), 1, good, 0, 0, 4, "head_dim"},
      {"kv heads 0", with([](auto& p) { p.num_kv_heads = 0; }), 1, good, 16, 16, 4, "num_kv_heads"},
      {"null k", ok, 1, KvBlock{nullptr, kv.data(), 2}, 16, 16, 4, "null k"},
      {"null v", ok, 1, KvBlock{kv.data(), nullptr, 1}, 16, 16, 4, "null v"},
      {"negative tokens", ok, 1, KvBlock{kv.data(), kv.data(), -1}, 16, 16, 4, "num_tokens"},
      {"q size", ok, 1, good, 15, 16, 4, "q has 15"},
      {"out size", ok, 1, good, 16, 17, 4, "out has 17"},
      {"lse size", ok, 1, good, 16, 16, 3, "lse has 3"},
      {"negative nq", ok, -1, good, 0, 0, 0, "num_q_tokens"},
      {"q_start_pos", with([](auto& p) {
         p.causal = true;
         p.q_start_pos = -2;
       }),
       1, good, 16, 16, 4, "q_start_pos"},
      {"nan scale", with([](auto& p) { p.softmax_scale = NAN; }), 1, good, 16, 16, 4,
       "softmax_scale"},
      {"bad dtype", with([](auto& p) { p.kv_dtype = static_cast<KvDtype>(9); }), 1, good, 16, 16, 4,
       "kv_dtype"},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.name);
    std::vector<float> q(c.q_size, 1.0f), out(c.out_size, 5.0f), lse(c.lse_size, 5.0f);
    const KvBlock blocks[] = {good, c.block};
    for (bool reference : {false, true}) {
      const absl::Status s =
          reference ? ReferencePartialAttention(c.params, c.nq, q, blocks, absl::MakeSpan(out),
                                                absl::MakeSpan(lse))
                    : PartialAttention(c.params, c.nq, q, blocks, absl::MakeSpan(out),
                                       absl::MakeSpan(lse));
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
      EXPECT_THAT(std::string(s.message()), HasSubstr(c.expect_substr));
      EXPECT_THAT(out, ::testing::Each(5.0f));
      EXPECT_THAT(lse, ::testing::Each(5.0f));
    }
  }
}

TEST(ValidationTest, MergeRejectsMismatchedSizes) {
  std::vector<float> o(6), l(2), short_o(5), short_l(1);
  EXPECT_THAT(std::string(MergePartials({1, 2, 3}, {short_o, l}, {o, l},
                                        {absl::MakeSpan(o), absl::MakeSpan(l)})
                              .message()),
              HasSubstr("a.out has 5"));
  EXPECT_EQ(
      MergePartials({1, 2, 3}, {o, l}, {o, short_l}, {absl::MakeSpan(o), absl::MakeSpan(l)}).code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MergePartials({1, 0, 3}, {o, l}, {o, l}, {absl::MakeSpan(o), absl::MakeSpan(l)}).code(),
            absl::StatusCode::kInvalidArgument);
  const PartialView others[] = {{o, l}, {o, short_l}};
  const absl::Status s =
      MergePartialsInPlace({1, 2, 3}, {absl::MakeSpan(o), absl::MakeSpan(l)}, others);
  EXPECT_THAT(std::string(s.message()), HasSubstr("others[1].lse"));
  EXPECT_EQ(FillEmptyPartial({1, 2, 3}, {absl::MakeSpan(short_o), absl::MakeSpan(l)}).code(),
            absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// Slot layout.

TEST(KvSlotLayoutTest, OffsetsFollowLayerKvTokenHeadDimOrder) {
  const KvSlotLayout layout{.num_layers = 3,
                            .segment_tokens = 4,
                            .num_kv_heads = 2,
                            .head_dim = 8,
                            .dtype = KvDtype::kBFloat16};
  ASSERT_TRUE(layout.Validate().ok());
  EXPECT_EQ(layout.TokenRowBytes(), 2 * 8 * 2);
  EXPECT_EQ(layout.BlockBytes(), 4 * 32);
  EXPECT_EQ(layout.SlotBytes(), 3 * 2 * 128);
  EXPECT_EQ(layout.BlockOffsetBytes(0, 0), 0);
  EXPECT_EQ(layout.BlockOffsetBytes(0, 1), 128);
  EXPECT_EQ(layout.BlockOffsetBytes(2, 1), 5 * 128);
  std::vector<unsigned char> slot(static_cast<size_t>(layout.SlotBytes()));
  auto block = SlotLayerBlock(layout, slot.data(), 1, 3);
  ASSERT_TRUE(block.ok());
  EXPECT_EQ(block->k, slot.data() + 256);
  EXPECT_EQ(block->v, slot.data() + 384);
  EXPECT_EQ(block->num_tokens, 3);
}

TEST(KvSlotLayoutTest, BadLayoutsAndArgumentsAreInvalidArgument) {
  KvSlotLayout layout{.num_layers = 2, .segment_tokens = 4, .num_kv_heads = 1, .head_dim = 2};
  std::vector<unsigned char> slot(static_cast<size_t>(layout.SlotBytes()));
  EXPECT_THAT(std::string(SlotLayerBlock(layout, slot.data(), 2, 1).status().message()),
              HasSubstr("layer 2"));
  EXPECT_THAT(std::string(SlotLayerBlock(layout, slot.data(), 0, 5).status().message()),
              HasSubstr("num_tokens 5"));
  EXPECT_THAT(std::string(SlotLayerBlock(layout, nullptr, 0, 1).status().message()),
              HasSubstr("null slot"));
  EXPECT_TRUE(SlotLayerBlock(layout, nullptr, 0, 0).ok());
  layout.segment_tokens = 0;
  EXPECT_THAT(std::string(layout.Validate().message()), HasSubstr("segment_tokens"));
  layout.segment_tokens = 1 << 30;
  layout.head_dim = 1 << 30;
  layout.num_kv_heads = 1 << 30;
  EXPECT_THAT(std::string(layout.Validate().message()), HasSubstr("overflow"));
}

TEST(KvSlotLayoutTest, AttentionOverSlotLayerBlocksMatchesSeparateArrays) {
  // Writes K/V into slots at the layout's offsets and checks attention over SlotLayerBlock
  // equals attention over the same values kept in plain per-layer arrays.
  const uint64_t seed = 99;
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  Rng rng(seed);
  const KvSlotLayout layout{.num_layers = 2,
                            .segment_tokens = 8,
                            .num_kv_heads = 2,
                            .head_dim = 16,
                            .dtype = KvDtype::kFloat32};
  const int layer = 1;
  const int n_rows = 5;
  std::vector<float> slot(static_cast<size_t>(layout.SlotBytes() / 4));
  std::vector<float> k(static_cast<size_t>(n_rows) * 2 * 16), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>(rng.UniformDouble() - 0.5);
    v[i] = static_cast<float>(rng.UniformDouble() - 0.5);
    // [layer][kv][token][head][dim] element index, computed by hand.
    slot[(layer * 2 + 0) * 8 * 32 + i] = k[i];
    slot[(layer * 2 + 1) * 8 * 32 + i] = v[i];
  }
  auto block = SlotLayerBlock(layout, slot.data(), layer, n_rows);
  ASSERT_TRUE(block.ok());
  const KvBlock plain{k.data(), v.data(), n_rows};
  AttentionParams p{.num_heads = 4, .num_kv_heads = 2, .head_dim = 16};
  const std::vector<float> q = RandomQueries(2, 4, 16, rng, 1.0f);
  Partial got(2, p), want(2, p);
  ASSERT_TRUE(
      PartialAttention(p, 2, q, {&*block, 1}, absl::MakeSpan(got.out), absl::MakeSpan(got.lse))
          .ok());
  ASSERT_TRUE(ReferencePartialAttention(p, 2, q, {&plain, 1}, absl::MakeSpan(want.out),
                                        absl::MakeSpan(want.lse))
                  .ok());
  ExpectPartialsNear(got, want, 5e-6);
}

// ---------------------------------------------------------------------------------------------
// bf16 conversion.

// Independent nearest-even rounding: the two bf16 neighbours by truncation, pick the nearer.
uint16_t NaiveBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint16_t lo = static_cast<uint16_t>(bits >> 16);
  const uint16_t hi = static_cast<uint16_t>(lo + 1);
  const double dx = x;
  const double dlo = Bf16ToFloat(lo);
  const double dhi = (hi & 0x7f80) == 0x7f80 ? std::copysign(INFINITY, dx) : Bf16ToFloat(hi);
  // For the largest finite magnitude, the "next" value is infinity, reached when x is at least
  // halfway to 2^128 (the next power). Treat that by comparing with the would-be neighbour.
  const double next_mag = (hi & 0x7f80) == 0x7f80 ? std::ldexp(1.0, 128) * (dx < 0 ? -1 : 1) : dhi;
  const double dist_lo = std::fabs(dx - dlo);
  const double dist_hi = std::fabs(next_mag - dx);
  if (dist_lo < dist_hi) return lo;
  if (dist_hi < dist_lo) return hi;
  return (lo & 1) ? hi : lo;
}

TEST(Bf16Test, EveryBf16ValueRoundTripsExactly) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const auto bits = static_cast<uint16_t>(b);
    const float f = Bf16ToFloat(bits);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(f)))) << b;
    } else {
      ASSERT_EQ(FloatToBf16(f), bits) << b;
    }
  }
}

TEST(Bf16Test, RoundsToNearestTiesToEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3F80);
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);      // tie, even is down
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);  // tie, even is up
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3F81);
  EXPECT_EQ(FloatToBf16(-2.0f), 0xC000);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds up to inf
  EXPECT_EQ(FloatToBf16(kInf), 0x7F80);
  EXPECT_EQ(FloatToBf16(-kInf), 0xFF80);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
  // A NaN whose payload lies only in the low 16 bits must not become infinity.
  uint32_t nan_bits = 0x7F800001u;
  float low_nan;
  std::memcpy(&low_nan, &nan_bits, 4);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(low_nan))));
}

TEST(Bf16Test, RandomFloatsMatchNaiveNearestEven) {
  const uint64_t seed = 31337;
  std::cout << "seed=" << seed << "\n";
  Rng rng(seed);
  for (int i = 0; i < 200000; ++i) {
    const auto bits = static_cast<uint32_t>(rng.Next64());
    float x;
    std::memcpy(&x, &bits, 4);
    if (std::isnan(x) || std::isinf(x)) continue;
    ASSERT_EQ(FloatToBf16(x), NaiveBf16(x)) << "bits=" << std::hex << bits;
  }
}

TEST(Bf16Test, BulkConversionChecksSizes) {
  std::vector<float> f = {1.5f, -3.25f};
  std::vector<uint16_t> h(2);
  ASSERT_TRUE(FloatToBf16(f, absl::MakeSpan(h)).ok());
  std::vector<float> back(2);
  ASSERT_TRUE(Bf16ToFloat(h, absl::MakeSpan(back)).ok());
  EXPECT_EQ(back, f);
  std::vector<uint16_t> short_h(1);
  EXPECT_EQ(FloatToBf16(f, absl::MakeSpan(short_h)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Bf16ToFloat(short_h, absl::MakeSpan(back)).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tokenlake::attention
