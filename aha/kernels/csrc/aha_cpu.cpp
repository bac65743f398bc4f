// AHA attention on CPU: a flash-style kernel in which every query row has one contiguous key range.
//
// A query at absolute position p routed global reads keys [start, p]; routed local it reads
// [max(start, p - window + 1), p] (start = first real key of its batch row, 0 without padding)
// plus, with `sink` > 0, the attention-sink keys [start, start + sink) that are <= p.
// Per (batch, head) the local rows and the global rows are each kept in position order and cut
// into tiles of consecutive rows, so the rows of a tile have similar ranges. A tile reads only
// the keys its rows need, in blocks; a block that lies inside every row's range needs no mask,
// the others are masked per row by comparing key positions against the row limits (no mask
// tensor is read and nothing of size seq x seq exists anywhere).
//
// Layout trick: scores are computed transposed, S^T[key, row] = K[key] . Q[row], so the softmax
// statistics of 16 query rows live in one vector and neither K nor V needs to be transposed or
// packed: every GEMM is "C[M x 16j] (+)= A(strided) . B[rows x 16j]" with row-major B.
// Accumulation is fp32. bf16/fp16 rows are widened into per-thread scratch block by block, except
// in the bf16 forward on CPUs with AVX512-BF16, whose GEMMs read bf16 pairs (vdpbf16ps) directly.
// Vectors are GCC vector extensions (AVX-512 zmm with -march=native there, AVX2 pairs elsewhere).
//
// Ops: aha::forward -> (out, lse) and aha::backward -> (dq, dk, dv); lse is the natural-log
// softmax normaliser per query (-inf for a query with no key), which the backward reuses.
// aha::forward with one query per head (decoding) takes a split-KV dot-product path instead.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

namespace {

constexpr int kLanes = 16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kMaxKeyBlock = 512;

typedef float vfloat __attribute__((vector_size(64)));
typedef float vfloat_u __attribute__((vector_size(64), aligned(4)));
typedef int32_t vint __attribute__((vector_size(64)));
typedef int32_t vint_u __attribute__((vector_size(64), aligned(4)));

inline vfloat vload(const float* p) { return *reinterpret_cast<const vfloat_u*>(p); }
inline void vstore(float* p, vfloat x) { *reinterpret_cast<vfloat_u*>(p) = x; }
inline vint vloadi(const int32_t* p) { return *reinterpret_cast<const vint_u*>(p); }
inline vfloat vsplat(float x) { return vfloat{} + x; }
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

// 2^x with ~1 ulp relative error (Cephes exp2f polynomial on x - round(x)); exactly 0 for
// x < -126, including -inf. Softmax arguments are <= 0, larger ones are clamped to 2^127.
inline vfloat vexp2(vfloat x) {
  const vfloat lowest = vsplat(-126.0f);
  const vfloat xc = vmax(x, lowest) > vsplat(127.0f) ? vsplat(127.0f) : vmax(x, lowest);
#if defined(__AVX512F__)
  const vfloat n = (vfloat)_mm512_roundscale_ps((__m512)xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vfloat magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const vfloat n = (xc + magic) - magic;
#endif
  const vfloat f = xc - n;
  vfloat p = vsplat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
#if defined(__AVX512F__)
  const vfloat r = (vfloat)_mm512_scalef_ps((__m512)p, (__m512)n);  // p * 2^n
#else
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  const vfloat r = p * (vfloat)bits;  // a vector cast reinterprets the bits
#endif
  return x < lowest ? vfloat{} : r;
}

// ---------------------------------------------------------------------------------------------
// GEMM micro-kernels: C[M x 16*NV] (+)= A . B, A(m, k) = a[m * a_row + k * a_k], B row k at b + k * ldb.
// The Dot policy says what one step k is. Fp32Dot: floats, c += a * b. Bf16PairDot (AVX512-BF16):
// A and B hold pairs of bf16 in 32-bit words and a step adds a two-term dot product per lane
// (vdpbf16ps), so K counts pairs and each instruction does twice the work.

struct Fp32Dot {
  using Elem = float;
  using Vec = vfloat;
  static Vec load(const float* p) { return vload(p); }
  static Vec splat(const float* p) { return vsplat(*p); }
  static vfloat madd(vfloat c, Vec a, Vec b) { return c + a * b; }
};

#if defined(__AVX512BF16__)
constexpr bool kHasBf16Dot = true;
struct Bf16PairDot {
  using Elem = uint32_t;
  using Vec = __m512i;
  static Vec load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static Vec splat(const uint32_t* p) {
    int32_t word;
    std::memcpy(&word, p, sizeof word);  // p may point into bf16 storage
    return _mm512_set1_epi32(word);
  }
  static vfloat madd(vfloat c, Vec a, Vec b) { return (vfloat)_mm512_dpbf16_ps((__m512)c, (__m512bh)a, (__m512bh)b); }
};
#else
constexpr bool kHasBf16Dot = false;
#endif

template <class Dot, int NV, int R, bool ACCUM>
inline void gemm_rows(int64_t K, const typename Dot::Elem* __restrict a, int64_t a_row, int64_t a_k,
                      const typename Dot::Elem* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc) {
  vfloat acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = ACCUM ? vload(c + r * ldc + v * kLanes) : vfloat{};
  for (int64_t k = 0; k < K; ++k) {
    typename Dot::Vec bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = Dot::load(b + k * ldb + v * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const typename Dot::Vec av = Dot::splat(a + r * a_row + k * a_k);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = Dot::madd(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * kLanes, acc[r][v]);
}

template <class Dot, int NV, int R, bool ACCUM>
inline void gemm_tail(int64_t rows, int64_t K, const typename Dot::Elem* a, int64_t a_row, int64_t a_k,
                      const typename Dot::Elem* b, int64_t ldb, float* c, int64_t ldc) {
  if constexpr (R > 0) {
    if (rows == R)
      gemm_rows<Dot, NV, R, ACCUM>(K, a, a_row, a_k, b, ldb, c, ldc);
    else
      gemm_tail<Dot, NV, R - 1, ACCUM>(rows, K, a, a_row, a_k, b, ldb, c, ldc);
  }
}

template <class Dot, int NV, bool ACCUM>
void gemm_panel(int64_t M, int64_t K, const typename Dot::Elem* a, int64_t a_row, int64_t a_k,
                const typename Dot::Elem* b, int64_t ldb, float* c, int64_t ldc) {
  constexpr int R = NV >= 4 ? 6 : 12;  // R * NV accumulators + NV B vectors fit the 32 vector registers
  int64_t m = 0;
  for (; m + R <= M; m += R) gemm_rows<Dot, NV, R, ACCUM>(K, a + m * a_row, a_row, a_k, b, ldb, c + m * ldc, ldc);
  gemm_tail<Dot, NV, R - 1, ACCUM>(M - m, K, a + m * a_row, a_row, a_k, b, ldb, c + m * ldc, ldc);
}

// C[M x N] (+)= A[M x K] . B[K x N] for N a multiple of 16, in column panels of 64, 32 and 16.
template <bool ACCUM, class Dot = Fp32Dot>
void gemm(int64_t M, int64_t N, int64_t K, const typename Dot::Elem* a, int64_t a_row, int64_t a_k,
          const typename Dot::Elem* b, int64_t ldb, float* c, int64_t ldc) {
  if (M <= 0) return;
  int64_t n = 0;
  for (; n + 64 <= N; n += 64) gemm_panel<Dot, 4, ACCUM>(M, K, a, a_row, a_k, b + n, ldb, c + n, ldc);
  if (n + 32 <= N) {
    gemm_panel<Dot, 2, ACCUM>(M, K, a, a_row, a_k, b + n, ldb, c + n, ldc);
    n += 32;
  }
  if (n < N) gemm_panel<Dot, 1, ACCUM>(M, K, a, a_row, a_k, b + n, ldb, c + n, ldc);
}

// ---------------------------------------------------------------------------------------------
// Element access for fp32 / bf16 / fp16 inputs.

template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);
}

inline void widen_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void widen_row(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(src[i].x) << 16);
}

inline void widen_row(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Rows [first, first + count) of a [seq, dim] matrix with row stride `ld`, as fp32: a pointer into
// the tensor itself for fp32, else a widened copy in `scratch`. Returns the pointer and its row stride.
template <typename T>
inline std::pair<const float*, int64_t> rows_as_float(const T* base, int64_t ld, int64_t first, int64_t count,
                                                      int64_t dim, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return {base + first * ld, ld};
  } else {
    for (int64_t i = 0; i < count; ++i) widen_row(base + (first + i) * ld, scratch + i * dim, dim);
    return {scratch, dim};
  }
}

// ---------------------------------------------------------------------------------------------
// Problem description and tiling.

struct Problem {
  int64_t batch, q_heads, kv_heads, seq_q, seq_kv, dim;
  int64_t window, sink;
  float scale;
  // element strides of q/out/dout-like [B, Hq, Sq, D] and k/v [B, Hkv, Skv, D] tensors (last dim contiguous)
  int64_t q_sb, q_sh, q_st;
  int64_t k_sb, k_sh, k_st;
  int64_t v_sb, v_sh, v_st;
  int64_t group() const { return q_heads / kv_heads; }
};

// One tile: `count` query rows of head (b, h); row i is query `rows[i]` reading keys [lo[i], hi[i]]
// and the sink keys [start, sink_end) that are <= hi[i].
struct Tile {
  int32_t b, h;
  int64_t offset;  // into the flat row/lo/hi arrays
  int32_t count;
  int32_t key_lo, key_hi;      // union of the rows' ranges (inclusive); key_lo > key_hi when all are empty
  int32_t shared_lo, shared_hi;  // intersection of the non-empty ranges: keys no row needs masked
  int32_t sink_lo, sink_hi;    // sink keys below key_lo that the tile reads (inclusive); empty when sink_lo > sink_hi
  int32_t sink_end;            // keys < sink_end (and >= start) are sink keys, visible to every row that reaches them
  double cost;
};

struct Tiling {
  std::vector<int32_t> rows, lo, hi;
  std::vector<Tile> tiles;
};

Tiling make_tiles(const Problem& pb, const bool* route, const int32_t* key_start, int64_t local_rows,
                  int64_t global_rows) {
  Tiling tl;
  const int64_t n = pb.batch * pb.q_heads * pb.seq_q;
  tl.rows.resize(n);
  tl.lo.resize(n);
  tl.hi.resize(n);
  const int64_t first_pos = pb.seq_kv - pb.seq_q;
  for (int64_t b = 0; b < pb.batch; ++b) {
    const int32_t start = key_start[b];
    for (int64_t h = 0; h < pb.q_heads; ++h) {
      const int64_t base = (b * pb.q_heads + h) * pb.seq_q;
      const bool* r = route + base;
      int64_t n_local = 0;
      for (int64_t t = 0; t < pb.seq_q; ++t) n_local += !r[t];
      int64_t next_local = base, next_global = base + n_local;
      for (int64_t t = 0; t < pb.seq_q; ++t) {
        const int64_t p = first_pos + t;
        const int64_t slot = r[t] ? next_global++ : next_local++;
        tl.rows[slot] = static_cast<int32_t>(t);
        tl.hi[slot] = static_cast<int32_t>(p);
        tl.lo[slot] = static_cast<int32_t>(r[t] ? start : std::max<int64_t>(start, p - pb.window + 1));
      }
      auto cut = [&](int64_t begin, int64_t end, int64_t size) {
        for (int64_t s = begin; s < end; s += size) {
          const int32_t sink_end = static_cast<int32_t>(start + pb.sink);
          Tile tile{static_cast<int32_t>(b), static_cast<int32_t>(h), s, static_cast<int32_t>(std::min(size, end - s)),
                    std::numeric_limits<int32_t>::max(), -1, -1, std::numeric_limits<int32_t>::max(), start, start - 1,
                    sink_end, 0.0};
          for (int64_t i = s; i < s + tile.count; ++i) {
            if (tl.lo[i] > tl.hi[i]) continue;
            tile.key_lo = std::min(tile.key_lo, tl.lo[i]);
            tile.key_hi = std::max(tile.key_hi, tl.hi[i]);
            tile.shared_lo = std::max(tile.shared_lo, tl.lo[i]);
            tile.shared_hi = std::min(tile.shared_hi, tl.hi[i]);
          }
          if (tile.key_hi >= tile.key_lo) tile.sink_hi = std::min(sink_end, tile.key_lo) - 1;
          const int32_t sink_keys = std::max(0, tile.sink_hi - tile.sink_lo + 1);
          tile.cost = tile.key_hi >= tile.key_lo ? double(tile.count + 8) * double(tile.key_hi - tile.key_lo + sink_keys + 64) : 0.0;
          tl.tiles.push_back(tile);
        }
      };
      cut(base, base + n_local, local_rows);
      cut(base + n_local, base + pb.seq_q, global_rows);
    }
  }
  return tl;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Key blocks of nearly equal size (at most kMaxKeyBlock) covering [lo, hi].
inline int64_t key_block_count(int64_t lo, int64_t hi) { return (hi - lo + kMaxKeyBlock) / kMaxKeyBlock; }

// Calls fn(j0, j1) for the key blocks [j0, j1) a tile reads: its sink keys, then its key range.
template <typename Fn>
void for_each_key_block(const Tile& tile, Fn&& fn) {
  auto blocks_of = [&](int64_t lo, int64_t hi) {
    if (hi < lo) return;
    const int64_t blocks = key_block_count(lo, hi);
    const int64_t span = hi - lo + 1;
    for (int64_t blk = 0; blk < blocks; ++blk) fn(lo + span * blk / blocks, lo + span * (blk + 1) / blocks);
  };
  blocks_of(tile.sink_lo, tile.sink_hi);
  blocks_of(tile.key_lo, tile.key_hi);
}

template <typename Elem = float>
struct AlignedBuffer {
  std::unique_ptr<Elem[], void (*)(void*)> data{nullptr, std::free};
  explicit AlignedBuffer(int64_t count)
      : data(static_cast<Elem*>(std::aligned_alloc(64, round_up(std::max<int64_t>(count, 16) * sizeof(Elem), 64))),
             std::free) {}
  Elem* get() const { return data.get(); }
};

// Runs task(index, thread_slot) for every index, largest tasks first, balanced dynamically.
template <typename Fn>
void run_tasks(const std::vector<int64_t>& order, Fn&& task) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), order.size()));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      task(-1, slot);  // lets the task set up per-thread scratch
      for (int64_t i = next.fetch_add(1); i < static_cast<int64_t>(order.size()); i = next.fetch_add(1))
        task(order[i], slot);
    }
  });
}

std::vector<int64_t> largest_first(const std::vector<double>& costs) {
  std::vector<int64_t> order(costs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return costs[a] > costs[b]; });
  return order;
}

// Row limits of a tile as padded int32 arrays (padding rows get an empty range).
struct TileLimits {
  alignas(64) int32_t lo[256];
  alignas(64) int32_t hi[256];
  void load(const Tiling& tl, const Tile& tile, int64_t padded) {
    for (int64_t i = 0; i < padded; ++i) {
      const bool real = i < tile.count;
      lo[i] = real ? tl.lo[tile.offset + i] : std::numeric_limits<int32_t>::max();
      hi[i] = real ? tl.hi[tile.offset + i] : -1;
    }
  }
};

// Sets S^T[j, i] = fill for key rows j of block [j0, j1) that row i does not read (outside its
// range and not a sink key <= hi[i]); only key rows outside the tile's shared range are visited.
inline void mask_block(float* s, int64_t ld, int64_t j0, int64_t j1, const Tile& tile, const TileLimits& lim,
                       int64_t padded, float fill) {
  const vfloat fillv = vsplat(fill);
  for (int64_t j = j0; j < j1; ++j) {
    if (j >= tile.shared_lo && j <= tile.shared_hi) {
      j = tile.shared_hi;  // skip to the first key past the shared range
      continue;
    }
    const vint key = vint{} + static_cast<int32_t>(j);
    const vint sink = vint{} + (j < tile.sink_end ? -1 : 0);
    float* row = s + (j - j0) * ld;
    for (int64_t i = 0; i < padded; i += kLanes) {
      const vint inside = ((vloadi(lim.lo + i) <= key) | sink) & (vloadi(lim.hi + i) >= key);
      vstore(row + i, inside ? vload(row + i) : fillv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Online-softmax step for one key block: S^T [nb x padded] (times `to_log2` in log2 units) becomes
// P^T; the running max m (log2 units) and sum l of every query column are updated and the first
// M rows of O are rescaled to the new max.
inline void softmax_block(float* s, int64_t nb, int64_t padded, int64_t M, float to_log2, float* m, float* l,
                          float* o, int64_t D) {
  const vfloat c = vsplat(to_log2);
  for (int64_t i = 0; i < padded; i += kLanes) {
    const vfloat m_old = vload(m + i);
    vfloat raw_max = vsplat(kNegInf);
    for (int64_t j = 0; j < nb; ++j) raw_max = vmax(raw_max, vload(s + j * padded + i));
    const vfloat mx = vmax(m_old, raw_max * c);
    const vfloat m_use = mx == vsplat(kNegInf) ? vfloat{} : mx;  // no key yet: avoid -inf - -inf
    const vfloat alpha = vexp2(m_old - m_use);
    vfloat sum{};
    for (int64_t j = 0; j < nb; ++j) {
      const vfloat p = vexp2(vload(s + j * padded + i) * c - m_use);
      vstore(s + j * padded + i, p);
      sum += p;
    }
    vstore(l + i, vload(l + i) * alpha + sum);
    vstore(m + i, mx);
    alignas(64) float a[kLanes];
    vstore(a, alpha);
    for (int64_t r = i; r < std::min(i + kLanes, M); ++r)
      for (int64_t d = 0; d < D; d += kLanes) vstore(o + r * D + d, vload(o + r * D + d) * a[r - i]);
  }
}

#if defined(__AVX512BF16__)
// Packing for Bf16PairDot: a word holds two bf16 that are consecutive along the reduction.

// qw[p][i] = (Q[i][2p], Q[i][2p+1]): word p of query row i, for the tile's rows (0 for padding).
inline void pack_query_pairs(const c10::BFloat16* qh, int64_t q_st, const int32_t* rows, int64_t M, int64_t padded,
                             int64_t D, uint32_t* qw) {
  for (int64_t i = 0; i < padded; ++i) {
    const c10::BFloat16* row = i < M ? qh + rows[i] * q_st : nullptr;
    for (int64_t p = 0; p < D / 2; ++p)
      qw[p * padded + i] = row ? uint32_t(row[2 * p].x) | uint32_t(row[2 * p + 1].x) << 16 : 0u;
  }
}

// pw[q][i] = (P^T[2q][i], P^T[2q+1][i]) rounded to bf16; P^T has an even number of rows.
inline void pack_probability_pairs(const float* s, int64_t padded, int64_t pairs, uint32_t* pw) {
  for (int64_t q = 0; q < pairs; ++q)
    for (int64_t i = 0; i < padded; i += kLanes) {
      const __m512i even = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh((__m512)vload(s + 2 * q * padded + i)));
      const __m512i odd = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh((__m512)vload(s + (2 * q + 1) * padded + i)));
      _mm512_storeu_si512(pw + q * padded + i, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
    }
}

// vw[q][c] = (V[j0+2q][c], V[j0+2q+1][c]) for keys [j0, j0 + nb); a missing last key is 0.
inline void pack_value_pairs(const c10::BFloat16* vh, int64_t v_st, int64_t j0, int64_t nb, int64_t D, uint32_t* vw) {
  for (int64_t q = 0; q < (nb + 1) / 2; ++q) {
    const c10::BFloat16* even = vh + (j0 + 2 * q) * v_st;
    const c10::BFloat16* odd = 2 * q + 1 < nb ? even + v_st : nullptr;
    for (int64_t c = 0; c < D; ++c) vw[q * D + c] = uint32_t(even[c].x) | (odd ? uint32_t(odd[c].x) << 16 : 0u);
  }
}
#endif

template <typename T>
void forward_impl(const Problem& pb, const T* q, const T* k, const T* v, const Tiling& tl, T* out, float* lse) {
  const int64_t D = pb.dim;
  const int64_t group = pb.group();
  int64_t max_rows = 16;
  for (const Tile& t : tl.tiles) max_rows = std::max<int64_t>(max_rows, t.count);
  const int64_t P = round_up(max_rows, kLanes);
  // bf16 with AVX512-BF16: the GEMMs read bf16 pairs directly (K rows must hold whole pairs)
  constexpr bool kPairKernel = kHasBf16Dot && std::is_same_v<T, c10::BFloat16>;
  const bool pairs = kPairKernel && pb.k_st % 2 == 0;
  const float to_log2 = pb.scale * kLog2e;

  std::vector<double> costs(tl.tiles.size());
  for (size_t i = 0; i < costs.size(); ++i) costs[i] = tl.tiles[i].cost;
  const auto order = largest_first(costs);

  struct Scratch {
    AlignedBuffer<> qt, s, o, m, l, kbuf, vbuf;
    AlignedBuffer<uint32_t> qw, pw, vw;
    Scratch(int64_t D, int64_t P, bool pairs)
        : qt(pairs ? 0 : D * P), s((kMaxKeyBlock + 1) * P), o(P * D), m(P), l(P), kbuf(pairs ? 0 : kMaxKeyBlock * D),
          vbuf(pairs ? 0 : kMaxKeyBlock * D), qw(pairs ? D / 2 * P : 0), pw(pairs ? (kMaxKeyBlock / 2 + 1) * P : 0),
          vw(pairs ? (kMaxKeyBlock / 2 + 1) * D : 0) {}
  };
  std::vector<std::unique_ptr<Scratch>> scratch(at::get_num_threads() + 1);

  run_tasks(order, [&](int64_t index, int64_t slot) {
    if (index < 0) {
      if (!scratch[slot]) scratch[slot] = std::make_unique<Scratch>(D, P, pairs);
      return;
    }
    Scratch& sc = *scratch[slot];
    const Tile& tile = tl.tiles[index];
    const int64_t M = tile.count;
    const int64_t padded = round_up(M, kLanes);
    const T* qh = q + tile.b * pb.q_sb + tile.h * pb.q_sh;
    const T* kh = k + tile.b * pb.k_sb + (tile.h / group) * pb.k_sh;
    const T* vh = v + tile.b * pb.v_sb + (tile.h / group) * pb.v_sh;
    const int32_t* rows = tl.rows.data() + tile.offset;
    TileLimits lim;
    lim.load(tl, tile, padded);

    float* qt = sc.qt.get();
#if defined(__AVX512BF16__)
    if constexpr (kPairKernel) {
      if (pairs) pack_query_pairs(qh, pb.q_st, rows, M, padded, D, sc.qw.get());
    }
#endif
    if (!pairs) {  // Q^T in fp32, pre-scaled so that scores come out in log2 units
      float row[1024];
      for (int64_t i = 0; i < padded; ++i) {
        if (i < M) widen_row(qh + rows[i] * pb.q_st, row, D);
        for (int64_t d = 0; d < D; ++d) qt[d * padded + i] = i < M ? row[d] * to_log2 : 0.0f;
      }
    }
    float* o = sc.o.get();
    float* m = sc.m.get();
    float* l = sc.l.get();
    std::fill(o, o + padded * D, 0.0f);
    std::fill(m, m + padded, kNegInf);
    std::fill(l, l + padded, 0.0f);
    float* s = sc.s.get();

    for_each_key_block(tile, [&](int64_t j0, int64_t j1) {
      const int64_t nb = j1 - j0;
#if defined(__AVX512BF16__)
      if constexpr (kPairKernel) {
        if (pairs) {
          const auto* kw = reinterpret_cast<const uint32_t*>(kh + j0 * pb.k_st);
          gemm<false, Bf16PairDot>(nb, padded, D / 2, kw, pb.k_st / 2, 1, sc.qw.get(), padded, s, padded);
          mask_block(s, padded, j0, j1, tile, lim, padded, kNegInf);
          softmax_block(s, nb, padded, M, to_log2, m, l, o, D);
          std::fill(s + nb * padded, s + (nb + 1) * padded, 0.0f);  // pairs need an even row count
          pack_probability_pairs(s, padded, (nb + 1) / 2, sc.pw.get());
          pack_value_pairs(vh, pb.v_st, j0, nb, D, sc.vw.get());
          gemm<true, Bf16PairDot>(M, D, (nb + 1) / 2, sc.pw.get(), 1, padded, sc.vw.get(), D, o, D);
          return;
        }
      }
#endif
      auto [kp, ldk] = rows_as_float(kh, pb.k_st, j0, nb, D, sc.kbuf.get());
      auto [vp, ldv] = rows_as_float(vh, pb.v_st, j0, nb, D, sc.vbuf.get());
      gemm<false>(nb, padded, D, kp, ldk, 1, qt, padded, s, padded);
      mask_block(s, padded, j0, j1, tile, lim, padded, kNegInf);
      softmax_block(s, nb, padded, M, 1.0f, m, l, o, D);
      gemm<true>(M, D, nb, s, 1, padded, vp, ldv, o, D);
    });

    T* oh = out + (tile.b * pb.q_heads + tile.h) * pb.seq_q * D;
    float* lh = lse + (tile.b * pb.q_heads + tile.h) * pb.seq_q;
    for (int64_t i = 0; i < M; ++i) {
      const bool empty = lim.lo[i] > lim.hi[i];
      const float inv = empty ? 0.0f : 1.0f / l[i];
      T* dst = oh + rows[i] * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(o[i * D + d] * inv);
      lh[rows[i]] = empty ? kNegInf : (m[i] + std::log2(l[i])) * kLn2;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward. Tasks are (batch, KV head, part): a task owns the dK/dV accumulators of its part, so
// no two threads write the same memory; parts > 1 only when there are fewer KV heads than threads.

template <typename T>
void backward_impl(const Problem& pb, const T* q, const T* k, const T* v, const T* out, const T* dout,
                   const float* lse, const Tiling& tl, int64_t parts, T* dq, float* dk_parts, float* dv_parts) {
  const int64_t D = pb.dim;
  const int64_t group = pb.group();
  int64_t max_rows = 16;
  for (const Tile& t : tl.tiles) max_rows = std::max<int64_t>(max_rows, t.count);
  const int64_t P = round_up(max_rows, kLanes);

  // tiles of each (b, kv head), dealt to `parts` tasks largest first onto the least loaded part
  const int64_t heads = pb.batch * pb.kv_heads;
  std::vector<std::vector<int64_t>> task_tiles(heads * parts);
  std::vector<double> task_cost(heads * parts, 0.0);
  {
    std::vector<double> costs(tl.tiles.size());
    for (size_t i = 0; i < costs.size(); ++i) costs[i] = tl.tiles[i].cost;
    for (int64_t index : largest_first(costs)) {
      const Tile& t = tl.tiles[index];
      const int64_t head = t.b * pb.kv_heads + t.h / group;
      int64_t best = head * parts;
      for (int64_t p = head * parts; p < (head + 1) * parts; ++p)
        if (task_cost[p] < task_cost[best]) best = p;
      task_tiles[best].push_back(index);
      task_cost[best] += t.cost;
    }
  }

  struct Scratch {
    AlignedBuffer<> qt, dot, qrows, dorows, s, dp, dqt, delta, lse2, kbuf, vbuf;
    Scratch(int64_t D, int64_t P)
        : qt(D * P), dot(D * P), qrows(P * D), dorows(P * D), s(kMaxKeyBlock * P), dp(kMaxKeyBlock * P), dqt(P * D),
          delta(P), lse2(P), kbuf(kMaxKeyBlock * D), vbuf(kMaxKeyBlock * D) {}
  };
  std::vector<std::unique_ptr<Scratch>> scratch(at::get_num_threads() + 1);

  run_tasks(largest_first(task_cost), [&](int64_t task, int64_t slot) {
    if (task < 0) {
      if (!scratch[slot]) scratch[slot] = std::make_unique<Scratch>(D, P);
      return;
    }
    Scratch& sc = *scratch[slot];
    float* dk_acc = dk_parts + task * pb.seq_kv * D;
    float* dv_acc = dv_parts + task * pb.seq_kv * D;
    for (int64_t index : task_tiles[task]) {
      const Tile& tile = tl.tiles[index];
      if (tile.key_hi < tile.key_lo) continue;  // every row empty: zero gradients
      const int64_t M = tile.count;
      const int64_t padded = round_up(M, kLanes);
      const int64_t head_off = (tile.b * pb.q_heads + tile.h);
      const T* qh = q + tile.b * pb.q_sb + tile.h * pb.q_sh;
      const T* oh = out + head_off * pb.seq_q * D;
      const T* doh = dout + head_off * pb.seq_q * D;
      const float* lh = lse + head_off * pb.seq_q;
      const T* kh = k + tile.b * pb.k_sb + (tile.h / group) * pb.k_sh;
      const T* vh = v + tile.b * pb.v_sb + (tile.h / group) * pb.v_sh;
      const int32_t* rows = tl.rows.data() + tile.offset;
      TileLimits lim;
      lim.load(tl, tile, padded);

      float *qt = sc.qt.get(), *dot = sc.dot.get(), *qrows = sc.qrows.get(), *dorows = sc.dorows.get();
      float *delta = sc.delta.get(), *lse2 = sc.lse2.get(), *dqt = sc.dqt.get();
      const float qscale = pb.scale * kLog2e;
      float orow[1024];
      for (int64_t i = 0; i < padded; ++i) {
        float* qr = qrows + i * D;
        float* dr = dorows + i * D;
        const bool live = i < M && lim.lo[i] <= lim.hi[i];
        if (live) {
          widen_row(qh + rows[i] * pb.q_st, qr, D);
          widen_row(doh + rows[i] * D, dr, D);
          widen_row(oh + rows[i] * D, orow, D);
        } else {
          std::fill(qr, qr + D, 0.0f);
          std::fill(dr, dr + D, 0.0f);
        }
        float dsum = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
          if (live) dsum += dr[d] * orow[d];
          qt[d * padded + i] = qr[d] * qscale;
          dot[d * padded + i] = dr[d];
        }
        delta[i] = dsum;
        // +inf makes P = 2^(S - lse2) exactly 0 for rows that attend nothing
        lse2[i] = live ? lh[rows[i]] * kLog2e : std::numeric_limits<float>::infinity();
      }
      std::fill(dqt, dqt + padded * D, 0.0f);
      float* s = sc.s.get();
      float* dp = sc.dp.get();

      for_each_key_block(tile, [&](int64_t j0, int64_t j1) {
        const int64_t nb = j1 - j0;
        auto [kp, ldk] = rows_as_float(kh, pb.k_st, j0, nb, D, sc.kbuf.get());
        auto [vp, ldv] = rows_as_float(vh, pb.v_st, j0, nb, D, sc.vbuf.get());
        // P^T = 2^(S^T - lse)
        gemm<false>(nb, padded, D, kp, ldk, 1, qt, padded, s, padded);
        mask_block(s, padded, j0, j1, tile, lim, padded, kNegInf);
        for (int64_t j = 0; j < nb; ++j)
          for (int64_t i = 0; i < padded; i += kLanes)
            vstore(s + j * padded + i, vexp2(vload(s + j * padded + i) - vload(lse2 + i)));
        // dV += P^T . dO
        gemm<true>(nb, D, M, s, padded, 1, dorows, D, dv_acc + j0 * D, D);
        // dS^T = P^T * (dO . V^T - delta) * scale
        gemm<false>(nb, padded, D, vp, ldv, 1, dot, padded, dp, padded);
        const vfloat scale = vsplat(pb.scale);
        for (int64_t j = 0; j < nb; ++j)
          for (int64_t i = 0; i < padded; i += kLanes) {
            float* x = dp + j * padded + i;
            vstore(x, vload(s + j * padded + i) * (vload(x) - vload(delta + i)) * scale);
          }
        // dQ += dS . K ; dK += dS^T . Q
        gemm<true>(M, D, nb, dp, 1, padded, kp, ldk, dqt, D);
        gemm<true>(nb, D, M, dp, padded, 1, qrows, D, dk_acc + j0 * D, D);
      });
      T* dqh = dq + head_off * pb.seq_q * D;
      for (int64_t i = 0; i < M; ++i) {
        T* dst = dqh + rows[i] * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(dqt[i * D + d]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Decode (one query per head): memory-bound, so each key row is read once with a dot product
// (no tile padding), and long key ranges are split into chunks that threads share, merged
// afterwards through their softmax statistics (split-KV, as in flash-decoding).

constexpr int64_t kDecodeChunk = 2048;

typedef float vfloat8 __attribute__((vector_size(32)));
typedef float vfloat4 __attribute__((vector_size(16)));

// Horizontal sum as a tree of vector adds (a lane-by-lane loop is one long dependency chain).
inline float hsum(vfloat x) {
  const vfloat8 h = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const vfloat4 f = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (f[0] + f[2]) + (f[1] + f[3]);
}

// Softmax statistics (max m, sum l, unnormalised output acc[D]) of one query, pre-scaled to log2
// units in `qr`, over keys [j0, j0 + n). NV = D / 16 keeps the query and accumulators in
// registers; NV = 0 handles any D. Two accumulator sets break the FMA dependency between keys.
template <int NV, typename T>
void decode_chunk(const float* qr, const T* kh, int64_t k_st, const T* vh, int64_t v_st, int64_t j0, int64_t n,
                  int64_t D, float* s, float* rows, float& m_out, float& l_out, float* acc_out) {
  constexpr int kCap = NV > 0 ? NV : 64;
  const int nv = NV > 0 ? NV : static_cast<int>(D / kLanes);
  vfloat qv[kCap];
  for (int i = 0; i < nv; ++i) qv[i] = vload(qr + i * kLanes);
  for (int64_t j = 0; j < n; ++j) {
    const float* kr = rows_as_float(kh, k_st, j0 + j, 1, D, rows).first;
    vfloat dot = vload(kr) * qv[0];
    for (int i = 1; i < nv; ++i) dot += vload(kr + i * kLanes) * qv[i];
    s[j] = hsum(dot);
  }
  std::fill(s + n, s + round_up(n, kLanes), kNegInf);
  vfloat mx = vsplat(kNegInf);
  for (int64_t j = 0; j < n; j += kLanes) mx = vmax(mx, vload(s + j));
  float m = kNegInf;
  for (int i = 0; i < kLanes; ++i) m = std::max(m, mx[i]);
  vfloat sum{};
  for (int64_t j = 0; j < n; j += kLanes) {
    const vfloat p = vexp2(vload(s + j) - m);
    vstore(s + j, p);
    sum += p;
  }
  vfloat even[kCap], odd[kCap];
  for (int i = 0; i < nv; ++i) even[i] = odd[i] = vfloat{};
  int64_t j = 0;
  for (; j + 1 < n; j += 2) {
    const float* v0 = rows_as_float(vh, v_st, j0 + j, 1, D, rows).first;
    const float* v1 = rows_as_float(vh, v_st, j0 + j + 1, 1, D, rows + D).first;
    const vfloat p0 = vsplat(s[j]), p1 = vsplat(s[j + 1]);
    for (int i = 0; i < nv; ++i) {
      even[i] += p0 * vload(v0 + i * kLanes);
      odd[i] += p1 * vload(v1 + i * kLanes);
    }
  }
  if (j < n) {
    const float* v0 = rows_as_float(vh, v_st, j0 + j, 1, D, rows).first;
    for (int i = 0; i < nv; ++i) even[i] += vsplat(s[j]) * vload(v0 + i * kLanes);
  }
  for (int i = 0; i < nv; ++i) vstore(acc_out + i * kLanes, even[i] + odd[i]);
  m_out = m;
  l_out = hsum(sum);
}

template <typename T>
void decode_chunk_dispatch(const float* qr, const T* kh, int64_t k_st, const T* vh, int64_t v_st, int64_t j0,
                           int64_t n, int64_t D, float* s, float* rows, float& m, float& l, float* acc) {
  switch (D / kLanes) {
    case 1: return decode_chunk<1>(qr, kh, k_st, vh, v_st, j0, n, D, s, rows, m, l, acc);
    case 2: return decode_chunk<2>(qr, kh, k_st, vh, v_st, j0, n, D, s, rows, m, l, acc);
    case 4: return decode_chunk<4>(qr, kh, k_st, vh, v_st, j0, n, D, s, rows, m, l, acc);
    case 8: return decode_chunk<8>(qr, kh, k_st, vh, v_st, j0, n, D, s, rows, m, l, acc);
    default: return decode_chunk<0>(qr, kh, k_st, vh, v_st, j0, n, D, s, rows, m, l, acc);
  }
}

template <typename T>
void decode_impl(const Problem& pb, const T* q, const T* k, const T* v, const bool* route, const int32_t* key_start,
                 T* out, float* lse) {
  const int64_t D = pb.dim;
  const int64_t group = pb.group();
  const int64_t rows = pb.batch * pb.q_heads;
  const int64_t pos = pb.seq_kv - 1;
  struct Chunk {
    int64_t row, j0, j1;
  };
  std::vector<Chunk> chunks;
  std::vector<double> costs;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t start = key_start[row / pb.q_heads];
    const int64_t lo = route[row] ? start : std::max<int64_t>(start, pos - pb.window + 1);
    auto add_chunks = [&](int64_t begin, int64_t end) {  // keys [begin, end)
      for (int64_t j0 = begin; j0 < end; j0 += kDecodeChunk) {
        chunks.push_back({row, j0, std::min(end, j0 + kDecodeChunk)});
        costs.push_back(double(chunks.back().j1 - j0) + 64.0);
      }
    };
    add_chunks(start, std::min(start + pb.sink, lo));  // the sink keys the window misses
    add_chunks(lo, pos + 1);
  }
  std::fill(out, out + rows * D, from_float<T>(0.0f));  // rows that attend nothing (padded queries)
  std::fill(lse, lse + rows, kNegInf);
  std::vector<float> part_m(chunks.size()), part_l(chunks.size()), part_o(chunks.size() * D);
  struct Scratch {
    AlignedBuffer<> qrow, krow, scores;
    explicit Scratch(int64_t D) : qrow(D), krow(2 * D), scores(kDecodeChunk + kLanes) {}
  };
  std::vector<std::unique_ptr<Scratch>> scratch(at::get_num_threads() + 1);
  run_tasks(largest_first(costs), [&](int64_t index, int64_t slot) {
    if (index < 0) {
      if (!scratch[slot]) scratch[slot] = std::make_unique<Scratch>(D);
      return;
    }
    Scratch& sc = *scratch[slot];
    const Chunk& c = chunks[index];
    const int64_t b = c.row / pb.q_heads, h = c.row % pb.q_heads;
    const T* kh = k + b * pb.k_sb + (h / group) * pb.k_sh;
    const T* vh = v + b * pb.v_sb + (h / group) * pb.v_sh;
    float* qr = sc.qrow.get();
    widen_row(q + b * pb.q_sb + h * pb.q_sh, qr, D);
    for (int64_t d = 0; d < D; ++d) qr[d] *= pb.scale * kLog2e;
    decode_chunk_dispatch(qr, kh, pb.k_st, vh, pb.v_st, c.j0, c.j1 - c.j0, D, sc.scores.get(), sc.krow.get(),
                          part_m[index], part_l[index], part_o.data() + index * D);
  });
  // merge the chunks of each row (they are consecutive in `chunks`)
  std::vector<float> merged(D);
  for (size_t first = 0; first < chunks.size();) {
    size_t last = first;
    float m = kNegInf;
    while (last < chunks.size() && chunks[last].row == chunks[first].row) m = std::max(m, part_m[last++]);
    float l = 0.0f;
    std::fill(merged.begin(), merged.end(), 0.0f);
    for (size_t i = first; i < last; ++i) {
      const float w = std::exp2(part_m[i] - m);
      l += w * part_l[i];
      for (int64_t d = 0; d < D; ++d) merged[d] += w * part_o[i * D + d];
    }
    const int64_t row = chunks[first].row;
    for (int64_t d = 0; d < D; ++d) out[row * D + d] = from_float<T>(merged[d] / l);
    lse[row] = (m + std::log2(l)) * kLn2;
    first = last;
  }
}

// ---------------------------------------------------------------------------------------------
// Op wrappers.

Problem describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& route,
                 const at::Tensor& key_start, int64_t window, int64_t sink, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "aha: q, k, v must be [batch, heads, seq, dim]");
  TORCH_CHECK(q.device().is_cpu(), "aha: the C++ kernel runs on CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "aha: q, k, v dtypes differ");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "aha: the last dim must be contiguous");
  TORCH_CHECK(q.size(3) % kLanes == 0 && q.size(3) <= 1024, "aha: head_dim must be a multiple of 16 and <= 1024");
  Problem pb{};
  pb.batch = q.size(0);
  pb.q_heads = q.size(1);
  pb.seq_q = q.size(2);
  pb.dim = q.size(3);
  pb.kv_heads = k.size(1);
  pb.seq_kv = k.size(2);
  TORCH_CHECK(pb.kv_heads > 0 && pb.q_heads % pb.kv_heads == 0, "aha: q_heads must be a multiple of kv_heads");
  TORCH_CHECK(pb.seq_kv >= pb.seq_q && pb.seq_kv < (int64_t(1) << 30), "aha: bad sequence lengths");
  pb.window = window;
  pb.sink = sink;
  TORCH_CHECK(window >= 1 && sink >= 0, "aha: window must be >= 1 and sink >= 0");
  pb.scale = static_cast<float>(scale);
  pb.q_sb = q.stride(0), pb.q_sh = q.stride(1), pb.q_st = q.stride(2);
  pb.k_sb = k.stride(0), pb.k_sh = k.stride(1), pb.k_st = k.stride(2);
  pb.v_sb = v.stride(0), pb.v_sh = v.stride(1), pb.v_st = v.stride(2);
  TORCH_CHECK(route.scalar_type() == at::kBool && route.is_contiguous() && route.numel() == pb.batch * pb.q_heads * pb.seq_q,
              "aha: route must be a contiguous bool tensor [batch, q_heads, seq_q]");
  TORCH_CHECK(key_start.scalar_type() == at::kInt && key_start.numel() == pb.batch, "aha: key_start must be int32 [batch]");
  return pb;
}

Tiling tiles_for(const Problem& pb, const at::Tensor& route, const at::Tensor& key_start, int64_t local_rows,
                 int64_t global_rows) {
  TORCH_CHECK(local_rows >= 1 && local_rows <= 256 && global_rows >= 1 && global_rows <= 256, "aha: tile rows in [1, 256]");
  const at::Tensor ks = key_start.contiguous();
  return make_tiles(pb, route.data_ptr<bool>(), ks.data_ptr<int32_t>(), local_rows, global_rows);
}

#define AHA_DISPATCH(dtype, ...)                                                         \
  switch (dtype) {                                                                       \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__; break; }                      \
    case at::kBFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__; break; }           \
    case at::kHalf: { using scalar_t = c10::Half; __VA_ARGS__; break; }                   \
    default: TORCH_CHECK(false, "aha: unsupported dtype ", dtype, " (use float32, bfloat16 or float16)"); \
  }

std::tuple<at::Tensor, at::Tensor> aha_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& route, const at::Tensor& key_start, int64_t window,
                                               int64_t sink, double scale, int64_t local_rows, int64_t global_rows) {
  const Problem pb = describe(q, k, v, route, key_start, window, sink, scale);
  at::Tensor out = at::empty({pb.batch, pb.q_heads, pb.seq_q, pb.dim}, q.options());
  at::Tensor lse = at::empty({pb.batch, pb.q_heads, pb.seq_q}, q.options().dtype(at::kFloat));
  if (pb.seq_q == 1) {
    const at::Tensor ks = key_start.contiguous();
    AHA_DISPATCH(q.scalar_type(),
                 decode_impl<scalar_t>(pb, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                       v.const_data_ptr<scalar_t>(), route.const_data_ptr<bool>(),
                                       ks.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(),
                                       lse.mutable_data_ptr<float>()));
    return {out, lse};
  }
  const Tiling tl = tiles_for(pb, route, key_start, local_rows, global_rows);
  AHA_DISPATCH(q.scalar_type(),
               forward_impl<scalar_t>(pb, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                      v.const_data_ptr<scalar_t>(), tl, out.mutable_data_ptr<scalar_t>(),
                                      lse.mutable_data_ptr<float>()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aha_backward(const at::Tensor& dout, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& out, const at::Tensor& lse,
                                                            const at::Tensor& route, const at::Tensor& key_start,
                                                            int64_t window, int64_t sink, double scale,
                                                            int64_t local_rows, int64_t global_rows) {
  const Problem pb = describe(q, k, v, route, key_start, window, sink, scale);
  const Tiling tl = tiles_for(pb, route, key_start, local_rows, global_rows);
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous() && lse.scalar_type() == at::kFloat, "aha: bad saved tensors");
  const at::Tensor dout_c = dout.contiguous().to(q.scalar_type());
  const int64_t heads = pb.batch * pb.kv_heads;
  const int64_t threads = at::get_num_threads();
  const int64_t parts = heads >= 2 * threads ? 1 : (2 * threads + heads - 1) / heads;
  at::Tensor dq = at::empty({pb.batch, pb.q_heads, pb.seq_q, pb.dim}, q.options());
  at::Tensor dk_parts = at::zeros({pb.batch, pb.kv_heads, parts, pb.seq_kv, pb.dim}, q.options().dtype(at::kFloat));
  at::Tensor dv_parts = at::zeros({pb.batch, pb.kv_heads, parts, pb.seq_kv, pb.dim}, q.options().dtype(at::kFloat));
  AHA_DISPATCH(q.scalar_type(),
               backward_impl<scalar_t>(pb, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                       v.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                                       dout_c.const_data_ptr<scalar_t>(), lse.const_data_ptr<float>(), tl, parts,
                                       dq.mutable_data_ptr<scalar_t>(), dk_parts.mutable_data_ptr<float>(),
                                       dv_parts.mutable_data_ptr<float>()));
  at::Tensor dk = (parts == 1 ? dk_parts.squeeze(2) : dk_parts.sum(2)).to(q.scalar_type());
  at::Tensor dv = (parts == 1 ? dv_parts.squeeze(2) : dv_parts.sum(2)).to(q.scalar_type());
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(aha, m) {
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, Tensor route, Tensor key_start, int window, int sink, float scale, "
      "int local_rows, int global_rows) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor route, Tensor key_start, "
      "int window, int sink, float scale, int local_rows, int global_rows) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aha, CPU, m) {
  m.impl("forward", &aha_forward);
  m.impl("backward", &aha_backward);
}
