// The tile kernel: for up to kMaxTileRows (token, head) rows of one KV group, one pass over the
// keys in tiles of kKeyTile with an online softmax (running max m, running sum l, unnormalised
// accumulator acc rescaled when m grows). Written with GCC vector extensions (8 x float, lowered
// to SSE2 pairs in the baseline clone and to AVX2 in the avx2+fma clone, picked at run time).
//
// Inner loops:
//   scores: 2 rows x 4 keys per step, 8 independent accumulators over head_dim (one load of each
//           K row chunk serves 2 rows); bf16 K/V rows of a tile are widened once into scratch.
//   exp:    an 8-wide exp (Cody-Waite reduction + degree-6 polynomial, ~1 ulp on [-87, 0]).
//   p.V:    2 rows x 32 dims per step, the acc rescale fused into the load.
#include "tokenlake/attention/cpu_kernel.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace tokenlake::attention::internal {
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

#define TL_INLINE inline __attribute__((always_inline))

constexpr int kKeyTile = 32;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

TL_INLINE v8f Splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
TL_INLINE v8f Load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
TL_INLINE void Store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
TL_INLINE float HSum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// exp(x) for x <= 0; 0 for x < -87 (including -inf).
TL_INLINE v8f Exp8(v8f x) {
  const v8i underflow = x < Splat(-87.0f);
  x = underflow ? Splat(-87.0f) : x;
  const v8f kMagic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer.
  const v8f t = x * Splat(1.44269504088896341f) + kMagic;
  const v8f n = t - kMagic;
  v8i ni;
  std::memcpy(&ni, &t, sizeof(ni));
  ni = ni - 0x4B400000;
  v8f r = x - n * Splat(0.693359375f);
  r = r - n * Splat(-2.12194440e-4f);
  v8f y = Splat(1.9875691500e-4f);
  y = y * r + Splat(1.3981999507e-3f);
  y = y * r + Splat(8.3334519073e-3f);
  y = y * r + Splat(4.1665795894e-2f);
  y = y * r + Splat(1.6666665459e-1f);
  y = y * r + Splat(5.0000001201e-1f);
  y = y * (r * r) + r + Splat(1.0f);
  const v8i bits = (ni + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y = y * scale;
  return underflow ? Splat(0.0f) : y;
}

// Widens n bf16 values to float.
TL_INLINE void WidenBf16(const uint16_t* src, float* dst, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    v8h h;
    std::memcpy(&h, src + i, sizeof(h));
    const v8u w = __builtin_convertvector(h, v8u) << 16;
    std::memcpy(dst + i, &w, sizeof(w));
  }
  for (; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
}

// s[a][j] = dot(qa, k[j]), s[b][j] = dot(qb, k[j]) for 4 keys.
TL_INLINE void Dot2x4(const float* qa, const float* qb, const float* const* k, int d, float* sa,
                      float* sb) {
  v8f a0 = Splat(0), a1 = Splat(0), a2 = Splat(0), a3 = Splat(0);
  v8f b0 = Splat(0), b1 = Splat(0), b2 = Splat(0), b3 = Splat(0);
  const float* k0 = k[0];
  const float* k1 = k[1];
  const float* k2 = k[2];
  const float* k3 = k[3];
  int c = 0;
  for (; c + 8 <= d; c += 8) {
    const v8f x = Load8(qa + c);
    const v8f y = Load8(qb + c);
    const v8f w0 = Load8(k0 + c);
    const v8f w1 = Load8(k1 + c);
    const v8f w2 = Load8(k2 + c);
    const v8f w3 = Load8(k3 + c);
    a0 += x * w0;
    a1 += x * w1;
    a2 += x * w2;
    a3 += x * w3;
    b0 += y * w0;
    b1 += y * w1;
    b2 += y * w2;
    b3 += y * w3;
  }
  float ta[4] = {HSum(a0), HSum(a1), HSum(a2), HSum(a3)};
  float tb[4] = {HSum(b0), HSum(b1), HSum(b2), HSum(b3)};
  for (; c < d; ++c) {
    for (int j = 0; j < 4; ++j) {
      ta[j] += qa[c] * k[j][c];
      tb[j] += qb[c] * k[j][c];
    }
  }
  for (int j = 0; j < 4; ++j) {
    sa[j] = ta[j];
    sb[j] = tb[j];
  }
}

// acc_a = acc_a * alpha_a + sum_j pa[j] v[j]; same for b (a and b may be the same row).
TL_INLINE void AccumulatePv2(float* acc_a, float* acc_b, float alpha_a, float alpha_b,
                             const float* pa, const float* pb, const float* const* v, int nk,
                             int d) {
  int c = 0;
  const v8f sa = Splat(alpha_a);
  const v8f sb = Splat(alpha_b);
  for (; c + 32 <= d; c += 32) {
    v8f a0 = Load8(acc_a + c) * sa, a1 = Load8(acc_a + c + 8) * sa;
    v8f a2 = Load8(acc_a + c + 16) * sa, a3 = Load8(acc_a + c + 24) * sa;
    v8f b0 = Load8(acc_b + c) * sb, b1 = Load8(acc_b + c + 8) * sb;
    v8f b2 = Load8(acc_b + c + 16) * sb, b3 = Load8(acc_b + c + 24) * sb;
    for (int j = 0; j < nk; ++j) {
      const float* vj = v[j] + c;
      const v8f x = Splat(pa[j]);
      const v8f y = Splat(pb[j]);
      const v8f w0 = Load8(vj), w1 = Load8(vj + 8), w2 = Load8(vj + 16), w3 = Load8(vj + 24);
      a0 += x * w0;
      a1 += x * w1;
      a2 += x * w2;
      a3 += x * w3;
      b0 += y * w0;
      b1 += y * w1;
      b2 += y * w2;
      b3 += y * w3;
    }
    Store8(acc_a + c, a0);
    Store8(acc_a + c + 8, a1);
    Store8(acc_a + c + 16, a2);
    Store8(acc_a + c + 24, a3);
    Store8(acc_b + c, b0);
    Store8(acc_b + c + 8, b1);
    Store8(acc_b + c + 16, b2);
    Store8(acc_b + c + 24, b3);
  }
  for (; c + 8 <= d; c += 8) {
    v8f a = Load8(acc_a + c) * sa;
    v8f b = Load8(acc_b + c) * sb;
    for (int j = 0; j < nk; ++j) {
      const v8f w = Load8(v[j] + c);
      a += Splat(pa[j]) * w;
      b += Splat(pb[j]) * w;
    }
    Store8(acc_a + c, a);
    Store8(acc_b + c, b);
  }
  for (; c < d; ++c) {
    float a = acc_a[c] * alpha_a;
    float b = acc_b[c] * alpha_b;
    for (int j = 0; j < nk; ++j) {
      a += pa[j] * v[j][c];
      b += pb[j] * v[j][c];
    }
    acc_a[c] = a;
    acc_b[c] = b;
  }
}

template <typename T>
TL_INLINE void RunTileImpl(const KernelProblem& pb, const TileRange& tile, float* out, float* lse) {
  const int d = pb.head_dim;
  const int group = pb.num_heads / pb.num_kv_heads;
  const int kv_head = tile.head_begin / group;
  const int nh = tile.head_end - tile.head_begin;
  const int rows = (tile.token_end - tile.token_begin) * nh;
  const int64_t row_stride = static_cast<int64_t>(pb.num_kv_heads) * d;

  thread_local std::vector<float> scratch;
  const size_t need = static_cast<size_t>(2 * rows + 2 * kKeyTile) * d;
  if (scratch.size() < need) scratch.resize(need);
  float* qs = scratch.data();
  float* acc = qs + static_cast<size_t>(rows) * d;
  float* kbuf = acc + static_cast<size_t>(rows) * d;
  float* vbuf = kbuf + static_cast<size_t>(kKeyTile) * d;

  float m[kMaxTileRows];
  float l[kMaxTileRows];
  int64_t qpos[kMaxTileRows];
  for (int r = 0; r < rows; ++r) {
    const int t = tile.token_begin + r / nh;
    const int h = tile.head_begin + r % nh;
    const float* src = pb.q + (static_cast<int64_t>(t) * pb.num_heads + h) * d;
    for (int i = 0; i < d; ++i) qs[static_cast<size_t>(r) * d + i] = src[i] * pb.scale;
    std::fill_n(acc + static_cast<size_t>(r) * d, d, 0.0f);
    m[r] = kNegInf;
    l[r] = 0.0f;
    qpos[r] = pb.q_start_pos + t;
  }

  int64_t key_end = tile.key_end;
  if (pb.causal) key_end = std::min<int64_t>(key_end, pb.q_start_pos + tile.token_end);
  // First block that holds key_begin (blocks with no rows are skipped by the advance loop).
  size_t b = static_cast<size_t>(
      std::upper_bound(pb.block_start, pb.block_start + pb.blocks.size() + 1, tile.key_begin) -
      pb.block_start);
  b = b == 0 ? 0 : b - 1;

  const float* kp[kKeyTile];
  const float* vp[kKeyTile];
  alignas(32) float s[kMaxTileRows][kKeyTile];
  alignas(32) float p[kMaxTileRows][kKeyTile];
  float alpha[kMaxTileRows];

  for (int64_t key = tile.key_begin; key < key_end; key += kKeyTile) {
    const int nk = static_cast<int>(std::min<int64_t>(kKeyTile, key_end - key));
    for (int j = 0; j < nk; ++j) {
      while (key + j >= pb.block_start[b + 1]) ++b;
      const int64_t offset =
          (key + j - pb.block_start[b]) * row_stride + static_cast<int64_t>(kv_head) * d;
      const T* krow = static_cast<const T*>(pb.blocks[b].k) + offset;
      const T* vrow = static_cast<const T*>(pb.blocks[b].v) + offset;
      if constexpr (std::is_same_v<T, float>) {
        kp[j] = krow;
        vp[j] = vrow;
      } else {
        WidenBf16(krow, kbuf + static_cast<size_t>(j) * d, d);
        WidenBf16(vrow, vbuf + static_cast<size_t>(j) * d, d);
        kp[j] = kbuf + static_cast<size_t>(j) * d;
        vp[j] = vbuf + static_cast<size_t>(j) * d;
      }
    }
    const int nk4 = (nk + 3) & ~3;
    for (int j = nk; j < nk4; ++j) kp[j] = kp[0];  // padding keys, masked below.

    for (int r = 0; r < rows; r += 2) {
      const int r2 = std::min(r + 1, rows - 1);
      for (int j = 0; j < nk4; j += 4) {
        Dot2x4(qs + static_cast<size_t>(r) * d, qs + static_cast<size_t>(r2) * d, kp + j, d,
               &s[r][j], &s[r2][j]);
      }
    }

    for (int r = 0; r < rows; ++r) {
      float* sr = s[r];
      int visible = nk;
      if (pb.causal) {
        visible = static_cast<int>(std::clamp<int64_t>(qpos[r] - key + 1, 0, nk));
      }
      for (int j = visible; j < kKeyTile; ++j) sr[j] = kNegInf;
      float tile_max = kNegInf;
      for (int j = 0; j < visible; ++j) tile_max = std::max(tile_max, sr[j]);
      const float m_new = std::max(m[r], tile_max);
      float* pr = p[r];
      if (m_new == kNegInf) {
        alpha[r] = 1.0f;
        std::fill_n(pr, kKeyTile, 0.0f);
        continue;
      }
      alpha[r] = m[r] == kNegInf ? 0.0f : std::exp(m[r] - m_new);
      const v8f mv = Splat(m_new);
      v8f sum = Splat(0.0f);
      for (int j = 0; j < kKeyTile; j += 8) {
        const v8f e = Exp8(Load8(sr + j) - mv);
        Store8(pr + j, e);
        sum += e;
      }
      l[r] = l[r] * alpha[r] + HSum(sum);
      m[r] = m_new;
    }

    for (int r = 0; r < rows; r += 2) {
      const int r2 = std::min(r + 1, rows - 1);
      AccumulatePv2(acc + static_cast<size_t>(r) * d, acc + static_cast<size_t>(r2) * d, alpha[r],
                    alpha[r2], p[r], p[r2], vp, nk, d);
    }
  }

  for (int r = 0; r < rows; ++r) {
    const int t = tile.token_begin + r / nh;
    const int h = tile.head_begin + r % nh;
    const int64_t row = static_cast<int64_t>(t) * pb.num_heads + h;
    float* o = out + row * d;
    const float* a = acc + static_cast<size_t>(r) * d;
    if (l[r] > 0.0f) {
      const float inv = 1.0f / l[r];
      for (int i = 0; i < d; ++i) o[i] = a[i] * inv;
      lse[row] = m[r] + std::log(l[r]);
    } else {
      std::fill_n(o, d, 0.0f);
      lse[row] = kNegInf;
    }
  }
}

__attribute__((target("avx2,fma"))) void RunTileAvx2(const KernelProblem& pb, const TileRange& tile,
                                                     float* out, float* lse) {
  if (pb.dtype == KvDtype::kFloat32) {
    RunTileImpl<float>(pb, tile, out, lse);
  } else {
    RunTileImpl<uint16_t>(pb, tile, out, lse);
  }
}

void RunTileBaseline(const KernelProblem& pb, const TileRange& tile, float* out, float* lse) {
  if (pb.dtype == KvDtype::kFloat32) {
    RunTileImpl<float>(pb, tile, out, lse);
  } else {
    RunTileImpl<uint16_t>(pb, tile, out, lse);
  }
}

bool DetectAvx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

}  // namespace

std::atomic<bool> g_force_baseline{false};

bool KernelUsesAvx2() {
  static const bool kAvx2 = DetectAvx2();
  return kAvx2 && !g_force_baseline.load(std::memory_order_relaxed);
}

void ForceBaselineKernelForTesting(bool force) {
  g_force_baseline.store(force, std::memory_order_relaxed);
}

void RunAttentionTile(const KernelProblem& problem, const TileRange& tile, float* out, float* lse) {
  if (KernelUsesAvx2()) {
    RunTileAvx2(problem, tile, out, lse);
  } else {
    RunTileBaseline(problem, tile, out, lse);
  }
}

}  // namespace tokenlake::attention::internal
