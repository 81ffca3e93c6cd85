// The tile kernel: for up to kMaxTileRows (token, head) rows (a contiguous head range, possibly
// spanning KV groups), one pass over the keys in tiles of kKeyTile with an online softmax
// (running max m, running sum l, unnormalised accumulator acc rescaled when m grows). Written with
// GCC vector extensions (8 x float, lowered to SSE2 pairs in the baseline clone and to AVX2 in
// the avx2+fma clone, picked at run time).
//
// Inner loops:
//   scores: 2 rows x 4 keys per step, 8 independent accumulators over head_dim (when both rows
//           use the same KV head, each K chunk is loaded once for both); the 8 dot products are
//           reduced with in-register shuffles.
//   packing: with >= 8 rows per KV head (prefill) the tile's K/V rows are packed contiguously
//           (bf16 widened once); unpacked rows a 4 KiB-multiple stride apart thrash L1 sets when
//           re-read (measured: -12% CPU time f32, -24% bf16 on the prefill benchmark). With few
//           rows per KV head (decode) rows are read in place and bf16 is widened in registers
//           (packing measured slower there).
//   exp:    an 8-wide exp (Cody-Waite reduction + degree-6 polynomial, ~1 ulp on [-87, 0]).
//   p.V:    2 rows x 32 dims per step, the acc rescale fused into the load.
//   memory: the rows of the next key tile are prefetched (each key's K/V rows for the tile's KV
//           heads are one short contiguous run at a token stride).
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

// GCC's __builtin_shuffle takes the mask as a vector, clang's __builtin_shufflevector as
// constant arguments; clang builds (which run the thread-safety analysis) get the second, and
// GCC's code stays as measured.
#if defined(__clang__)
#define TL_SHUFFLE1(a, mask) __builtin_shufflevector(a, a, mask)
#define TL_SHUFFLE2(a, b, mask) __builtin_shufflevector(a, b, mask)
#define TL_MASK(...) __VA_ARGS__
#else
#define TL_SHUFFLE1(a, mask) __builtin_shuffle(a, mask)
#define TL_SHUFFLE2(a, b, mask) __builtin_shuffle(a, b, mask)
#define TL_MASK(...) (v8i{__VA_ARGS__})
#endif

// A broadcast written as a shuffle so GCC emits vbroadcastss (the initializer-list form was
// lowered to a chain of vinsertps).
TL_INLINE v8f Splat(float x) { return TL_SHUFFLE1(v8f{x}, TL_MASK(0, 0, 0, 0, 0, 0, 0, 0)); }
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

template <typename T>
TL_INLINE v8f LoadKv(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Load8(p);
  } else {
    v8h h;
    std::memcpy(&h, p, sizeof(h));
    const v8u w = __builtin_convertvector(h, v8u) << 16;
    v8f f;
    std::memcpy(&f, &w, sizeof(f));
    return f;
  }
}

template <typename T>
TL_INLINE float KvElem(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return *p;
  } else {
    return Bf16ToFloat(*p);
  }
}

// Returns [sum(a0), sum(a1), sum(a2), sum(a3), sum(b0), sum(b1), sum(b2), sum(b3)] with in-lane
// shuffles (unpck / shufps) and one cross-lane step, instead of 8 scalar horizontal sums.
TL_INLINE v8f Reduce4x2(v8f a0, v8f a1, v8f a2, v8f a3, v8f b0, v8f b1, v8f b2, v8f b3) {
#define TL_LO TL_MASK(0, 8, 1, 9, 4, 12, 5, 13)
#define TL_HI TL_MASK(2, 10, 3, 11, 6, 14, 7, 15)
#define TL_EVEN TL_MASK(0, 1, 8, 9, 4, 5, 12, 13)
#define TL_ODD TL_MASK(2, 3, 10, 11, 6, 7, 14, 15)
  const v8f ta01 = TL_SHUFFLE2(a0, a1, TL_LO) + TL_SHUFFLE2(a0, a1, TL_HI);
  const v8f ta23 = TL_SHUFFLE2(a2, a3, TL_LO) + TL_SHUFFLE2(a2, a3, TL_HI);
  const v8f tb01 = TL_SHUFFLE2(b0, b1, TL_LO) + TL_SHUFFLE2(b0, b1, TL_HI);
  const v8f tb23 = TL_SHUFFLE2(b2, b3, TL_LO) + TL_SHUFFLE2(b2, b3, TL_HI);
  const v8f ua = TL_SHUFFLE2(ta01, ta23, TL_EVEN) + TL_SHUFFLE2(ta01, ta23, TL_ODD);
  const v8f ub = TL_SHUFFLE2(tb01, tb23, TL_EVEN) + TL_SHUFFLE2(tb01, tb23, TL_ODD);
#undef TL_LO
#undef TL_HI
#undef TL_EVEN
#undef TL_ODD
  return TL_SHUFFLE2(ua, ub, TL_MASK(0, 1, 2, 3, 8, 9, 10, 11)) +
         TL_SHUFFLE2(ua, ub, TL_MASK(4, 5, 6, 7, 12, 13, 14, 15));
}

// sa[j] = dot(qa, ka[j]), sb[j] = dot(qb, kb[j]) for 4 keys j. kShared: ka == kb (rows of one
// KV group), so each K chunk is loaded once for both rows.
template <typename T, bool kShared>
TL_INLINE void Dot2x4(const float* qa, const float* qb, const T* const* ka, const T* const* kb,
                      int d, float* sa, float* sb) {
  v8f a0 = Splat(0), a1 = Splat(0), a2 = Splat(0), a3 = Splat(0);
  v8f b0 = Splat(0), b1 = Splat(0), b2 = Splat(0), b3 = Splat(0);
  int c = 0;
  for (; c + 8 <= d; c += 8) {
    const v8f x = Load8(qa + c);
    const v8f y = Load8(qb + c);
    const v8f w0 = LoadKv(ka[0] + c);
    const v8f w1 = LoadKv(ka[1] + c);
    const v8f w2 = LoadKv(ka[2] + c);
    const v8f w3 = LoadKv(ka[3] + c);
    a0 += x * w0;
    a1 += x * w1;
    a2 += x * w2;
    a3 += x * w3;
    if constexpr (kShared) {
      b0 += y * w0;
      b1 += y * w1;
      b2 += y * w2;
      b3 += y * w3;
    } else {
      b0 += y * LoadKv(kb[0] + c);
      b1 += y * LoadKv(kb[1] + c);
      b2 += y * LoadKv(kb[2] + c);
      b3 += y * LoadKv(kb[3] + c);
    }
  }
  const v8f r = Reduce4x2(a0, a1, a2, a3, b0, b1, b2, b3);
  float t[8];
  Store8(t, r);
  for (; c < d; ++c) {
    for (int j = 0; j < 4; ++j) {
      t[j] += qa[c] * KvElem(ka[j] + c);
      t[4 + j] += qb[c] * KvElem(kb[j] + c);
    }
  }
  for (int j = 0; j < 4; ++j) {
    sa[j] = t[j];
    sb[j] = t[4 + j];
  }
}

// acc_a = acc_a * alpha_a + sum_j pa[j] va[j]; same for b (a and b may be the same row, then
// va == vb). kShared: va == vb, each V chunk is loaded once.
template <typename T, bool kShared>
TL_INLINE void AccumulatePv2(float* acc_a, float* acc_b, float alpha_a, float alpha_b,
                             const float* pa, const float* pb, const T* const* va,
                             const T* const* vb, int nk, int d) {
  int c = 0;
  const v8f sa = Splat(alpha_a);
  const v8f sb = Splat(alpha_b);
  for (; c + 32 <= d; c += 32) {
    v8f a0 = Load8(acc_a + c) * sa, a1 = Load8(acc_a + c + 8) * sa;
    v8f a2 = Load8(acc_a + c + 16) * sa, a3 = Load8(acc_a + c + 24) * sa;
    v8f b0 = Load8(acc_b + c) * sb, b1 = Load8(acc_b + c + 8) * sb;
    v8f b2 = Load8(acc_b + c + 16) * sb, b3 = Load8(acc_b + c + 24) * sb;
    for (int j = 0; j < nk; ++j) {
      const T* vj = va[j] + c;
      const v8f x = Splat(pa[j]);
      const v8f y = Splat(pb[j]);
      const v8f w0 = LoadKv(vj), w1 = LoadKv(vj + 8), w2 = LoadKv(vj + 16), w3 = LoadKv(vj + 24);
      a0 += x * w0;
      a1 += x * w1;
      a2 += x * w2;
      a3 += x * w3;
      if constexpr (kShared) {
        b0 += y * w0;
        b1 += y * w1;
        b2 += y * w2;
        b3 += y * w3;
      } else {
        const T* wj = vb[j] + c;
        b0 += y * LoadKv(wj);
        b1 += y * LoadKv(wj + 8);
        b2 += y * LoadKv(wj + 16);
        b3 += y * LoadKv(wj + 24);
      }
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
      a += Splat(pa[j]) * LoadKv(va[j] + c);
      b += Splat(pb[j]) * LoadKv(vb[j] + c);
    }
    Store8(acc_a + c, a);
    Store8(acc_b + c, b);
  }
  for (; c < d; ++c) {
    float a = acc_a[c] * alpha_a;
    float b = acc_b[c] * alpha_b;
    for (int j = 0; j < nk; ++j) {
      a += pa[j] * KvElem(va[j] + c);
      b += pb[j] * KvElem(vb[j] + c);
    }
    acc_a[c] = a;
    acc_b[c] = b;
  }
}

// Copies (f32) or widens (bf16) one row of d elements into dst.
template <typename T>
TL_INLINE void PackRow(const T* src, float* dst, int d) {
  int c = 0;
  for (; c + 8 <= d; c += 8) Store8(dst + c, LoadKv(src + c));
  for (; c < d; ++c) dst[c] = KvElem(src + c);
}

// s[r][j] = dot(q_r, K row of key j for row r's KV head) for every row and the keys [0, nk4).
template <typename U>
TL_INLINE void ScoreTile(const float* qs, int rows, const int* row_kv, const U* (*kp)[kKeyTile],
                         int nk4, int d, float (*s)[kKeyTile]) {
  for (int r = 0; r < rows; r += 2) {
    const int r2 = std::min(r + 1, rows - 1);
    const float* qa = qs + static_cast<size_t>(r) * d;
    const float* qb = qs + static_cast<size_t>(r2) * d;
    const int ga = row_kv[r];
    const int gb = row_kv[r2];
    for (int j = 0; j < nk4; j += 4) {
      if (ga == gb) {
        Dot2x4<U, true>(qa, qb, &kp[ga][j], &kp[ga][j], d, &s[r][j], &s[r2][j]);
      } else {
        Dot2x4<U, false>(qa, qb, &kp[ga][j], &kp[gb][j], d, &s[r][j], &s[r2][j]);
      }
    }
  }
}

// acc_r = acc_r * alpha_r + sum_j p[r][j] V_j for every row.
template <typename U>
TL_INLINE void PvTile(float* acc, int rows, const int* row_kv, const float* alpha,
                      float (*p)[kKeyTile], const U* (*vp)[kKeyTile], int nk, int d) {
  for (int r = 0; r < rows; r += 2) {
    const int r2 = std::min(r + 1, rows - 1);
    const int ga = row_kv[r];
    const int gb = row_kv[r2];
    float* acc_a = acc + static_cast<size_t>(r) * d;
    float* acc_b = acc + static_cast<size_t>(r2) * d;
    if (ga == gb) {
      AccumulatePv2<U, true>(acc_a, acc_b, alpha[r], alpha[r2], p[r], p[r2], vp[ga], vp[ga], nk, d);
    } else {
      AccumulatePv2<U, false>(acc_a, acc_b, alpha[r], alpha[r2], p[r], p[r2], vp[ga], vp[gb], nk,
                              d);
    }
  }
}

template <typename T>
TL_INLINE void RunTileImpl(const KernelProblem& pb, const TileRange& tile, float* out, float* lse) {
  const int d = pb.head_dim;
  const int group = pb.num_heads / pb.num_kv_heads;
  const int nh = tile.head_end - tile.head_begin;
  const int rows = (tile.token_end - tile.token_begin) * nh;
  const int kv_first = tile.head_begin / group;
  const int kv_count = (tile.head_end - 1) / group - kv_first + 1;
  const int64_t row_stride = static_cast<int64_t>(pb.num_kv_heads) * d;

  // With many rows per KV head (prefill) each K/V row is reused by many rows: pack the tile's
  // rows contiguously (widening bf16 once). Unpacked rows sit a token stride apart, often a
  // multiple of 4 KiB, and thrash a few L1 sets when a tile re-reads them. With few rows per KV
  // head (decode) the rows are read in place.
  const bool pack = rows >= 8 * kv_count;
  thread_local std::vector<float> scratch;
  const size_t pack_floats = pack ? static_cast<size_t>(2 * kv_count * kKeyTile) * d : 0;
  const size_t need = static_cast<size_t>(2 * rows) * d + pack_floats;
  if (scratch.size() < need) scratch.resize(need);
  float* qs = scratch.data();
  float* acc = qs + static_cast<size_t>(rows) * d;
  float* kbuf = acc + static_cast<size_t>(rows) * d;
  float* vbuf = kbuf + pack_floats / 2;

  float m[kMaxTileRows];
  float l[kMaxTileRows];
  int64_t qpos[kMaxTileRows];
  int row_kv[kMaxTileRows];
  for (int r = 0; r < rows; ++r) {
    const int t = tile.token_begin + r / nh;
    const int h = tile.head_begin + r % nh;
    const float* src = pb.q + (static_cast<int64_t>(t) * pb.num_heads + h) * d;
    for (int i = 0; i < d; ++i) qs[static_cast<size_t>(r) * d + i] = src[i] * pb.scale;
    std::fill_n(acc + static_cast<size_t>(r) * d, d, 0.0f);
    m[r] = kNegInf;
    l[r] = 0.0f;
    qpos[r] = pb.q_start_pos + t;
    row_kv[r] = h / group - kv_first;
  }

  int64_t key_end = tile.key_end;
  if (pb.causal) key_end = std::min<int64_t>(key_end, pb.q_start_pos + tile.token_end);
  // First block that holds key_begin (blocks with no rows are skipped by the advance loops).
  size_t b = static_cast<size_t>(
      std::upper_bound(pb.block_start, pb.block_start + pb.blocks.size() + 1, tile.key_begin) -
      pb.block_start);
  b = b == 0 ? 0 : b - 1;

  // Software prefetch of the next tile's rows (the tile's KV heads of each key are one
  // contiguous run; consecutive keys are a token stride apart).
  const int64_t run_bytes = static_cast<int64_t>(kv_count) * d * static_cast<int64_t>(sizeof(T));
  size_t pf_b = b;
  auto prefetch_key = [&](int64_t pf_key) {
    while (pf_key >= pb.block_start[pf_b + 1]) ++pf_b;
    const int64_t offset =
        (pf_key - pb.block_start[pf_b]) * row_stride + static_cast<int64_t>(kv_first) * d;
    const char* kr = static_cast<const char*>(
        static_cast<const void*>(static_cast<const T*>(pb.blocks[pf_b].k) + offset));
    const char* vr = static_cast<const char*>(
        static_cast<const void*>(static_cast<const T*>(pb.blocks[pf_b].v) + offset));
    for (int64_t off = 0; off < run_bytes; off += 64) {
      __builtin_prefetch(kr + off);
      __builtin_prefetch(vr + off);
    }
  };

  // kp[g][j] / vp[g][j]: the K / V row of key j of the tile for the tile's KV head kv_first + g.
  const T* kp[kMaxTileRows][kKeyTile];
  const T* vp[kMaxTileRows][kKeyTile];
  const float* kpf[kMaxTileRows][kKeyTile];  // packed rows (pack only)
  const float* vpf[kMaxTileRows][kKeyTile];
  alignas(32) float s[kMaxTileRows][kKeyTile];
  alignas(32) float p[kMaxTileRows][kKeyTile];
  float alpha[kMaxTileRows];

  for (int64_t key = tile.key_begin; key < key_end; key += kKeyTile) {
    const int nk = static_cast<int>(std::min<int64_t>(kKeyTile, key_end - key));
    const int64_t pf_end = std::min<int64_t>(key_end, key + 2 * kKeyTile);
    for (int64_t pf_key = key + kKeyTile; pf_key < pf_end; ++pf_key) prefetch_key(pf_key);
    for (int j = 0; j < nk; ++j) {
      while (key + j >= pb.block_start[b + 1]) ++b;
      const int64_t offset =
          (key + j - pb.block_start[b]) * row_stride + static_cast<int64_t>(kv_first) * d;
      const T* krow = static_cast<const T*>(pb.blocks[b].k) + offset;
      const T* vrow = static_cast<const T*>(pb.blocks[b].v) + offset;
      for (int g = 0; g < kv_count; ++g) {
        kp[g][j] = krow + static_cast<int64_t>(g) * d;
        vp[g][j] = vrow + static_cast<int64_t>(g) * d;
        if (pack) {
          float* kd = kbuf + (static_cast<size_t>(g) * kKeyTile + j) * d;
          float* vd = vbuf + (static_cast<size_t>(g) * kKeyTile + j) * d;
          PackRow(kp[g][j], kd, d);
          PackRow(vp[g][j], vd, d);
          kpf[g][j] = kd;
          vpf[g][j] = vd;
        }
      }
    }
    const int nk4 = (nk + 3) & ~3;
    for (int g = 0; g < kv_count; ++g) {
      for (int j = nk; j < nk4; ++j) {  // padding keys, masked below.
        kp[g][j] = kp[g][0];
        if (pack) kpf[g][j] = kpf[g][0];
      }
    }

    if (pack) {
      ScoreTile<float>(qs, rows, row_kv, kpf, nk4, d, s);
    } else {
      ScoreTile<T>(qs, rows, row_kv, kp, nk4, d, s);
    }

    for (int r = 0; r < rows; ++r) {
      float* sr = s[r];
      int visible = nk;
      if (pb.causal) {
        visible = static_cast<int>(std::clamp<int64_t>(qpos[r] - key + 1, 0, nk));
      }
      for (int j = visible; j < kKeyTile; ++j) sr[j] = kNegInf;
      // Masked lanes hold -inf, so the max runs over the whole tile, 8 lanes at a time.
      v8f vmax = Load8(sr);
      for (int j = 8; j < kKeyTile; j += 8) {
        const v8f x = Load8(sr + j);
        vmax = x > vmax ? x : vmax;
      }
      float tile_max = vmax[0];
      for (int i = 1; i < 8; ++i) tile_max = std::max(tile_max, vmax[i]);
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

    if (pack) {
      PvTile<float>(acc, rows, row_kv, alpha, p, vpf, nk, d);
    } else {
      PvTile<T>(acc, rows, row_kv, alpha, p, vp, nk, d);
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
