// AHA attention on CPU: a flash-style kernel in which every query row has one contiguous key range.
//
// A query at absolute position p routed global reads keys [start, p]; routed local it reads
// [max(start, p - window + 1), p] (start = first real key of its batch row, 0 without padding)
// plus, with `sink` > 0, the attention-sink keys [start, start + sink) that are <= p.
// Per (batch, head) the local rows and the global rows are each kept in position order and cut
// into tiles of consecutive rows, so the rows of a tile have similar ranges. A tile reads only
// the keys its rows need, in blocks; a block that lies inside every row's range needs no mask,
// the others are masked per row by comparing key positions against the row limits (no mask
// tensor is read and nothing of size seq x seq exists anywhere). The forward computes a block
// only for the groups of 16 (8) rows that read one of its keys, and its softmax only over the
// keys each group reads.
//
// Layout: scores are computed transposed, S^T[key, row] = K[key] . Q[row], so the softmax
// statistics of 16 (AVX-512) or 8 (AVX2) query rows live in one vector. Accumulation is fp32. One
// tile loop (mask, online softmax) serves two microkernels, which supply the GEMMs:
//   vector -- hand-written GEMMs on GCC vector extensions of the target's width (zmm with
//             AVX-512, ymm elsewhere); K and V are read in place, bf16/fp16 rows widened block by
//             block, except bf16 on CPUs with AVX512-BF16, multiplied as bf16 pairs (vdpbf16ps);
//   onednn -- at::native::cpublas::brgemm, the oneDNN micro-GEMMs of PyTorch's CPU flash
//             attention: AMX tiles for bf16 where present (VNNI operands), AVX-512/AVX2 for fp32;
//             fp16 is widened to fp32 once per call; V^T (K^T in the backward) is transposed once
//             per call into panels of kPanel keys.
// The `microkernel` argument picks one (0 = the built-in rule, see resolve_microkernel).
//
// Ops: aha::forward -> (out, lse) and aha::backward -> (dq, dk, dv); lse is the natural-log
// softmax normaliser per query (-inf for a query with no key), which the backward reuses.
// aha::forward with one query per head (decoding) takes a split-KV dot-product path instead
// (memory-bound: it reads each key once, on either microkernel choice); aha::decode_paged runs the
// same path for sequences of different lengths in a paged cache (a serving engine's decode step).
// aha::microkernel names what a (dtype, choice) runs on this CPU.

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <fbgemm/Utils.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__AVX__)
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
#include <variant>
#include <vector>

namespace {

// Vectors are the machine's own width: 16 floats (zmm) with AVX-512, else 8 (ymm). GCC lowers a
// vector wider than the target's registers to memory round trips: 64-byte vectors compiled for
// AVX2 made the hand-written kernels 15x slower than SDPA on a Zen 3.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
// oneDNN micro-GEMM covers start and end on multiples of 16 keys on every ISA (few JIT shapes).
constexpr int64_t kCoverAlign = 16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kMaxKeyBlock = 512;

typedef float vfloat __attribute__((vector_size(4 * kLanes)));
typedef float vfloat_u __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef int32_t vint __attribute__((vector_size(4 * kLanes)));
typedef int32_t vint_u __attribute__((vector_size(4 * kLanes), aligned(4)));

inline vfloat vload(const float* p) { return *reinterpret_cast<const vfloat_u*>(p); }
inline void vstore(float* p, vfloat x) { *reinterpret_cast<vfloat_u*>(p) = x; }
inline vint vloadi(const int32_t* p) { return *reinterpret_cast<const vint_u*>(p); }
inline vfloat vsplat(float x) {  // one broadcast (vfloat{} + x would add a zero first)
#if defined(__AVX512F__)
  return (vfloat)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (vfloat)_mm256_set1_ps(x);
#else
  return vfloat{} + x;
#endif
}
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

// 2^x with ~1 ulp relative error (Cephes exp2f polynomial on x - round(x)); exactly 0 for
// x < -126, including -inf; NaN for NaN (a NaN score must not vanish from the softmax). Softmax
// arguments are <= 0, larger ones are clamped to 2^127.
// kFast: a degree-4 polynomial, relative error 2.7e-6, for probabilities rounded to bf16 (whose
// own rounding error is 3.9e-3); 2^0 is then not exactly 1.
template <bool kFast = false>
inline vfloat vexp2(vfloat x) {
  const vfloat lowest = vsplat(-126.0f);
  const vfloat above = lowest > x ? lowest : x;  // NaN stays NaN: the comparison is false
  const vfloat xc = above > vsplat(127.0f) ? vsplat(127.0f) : above;
#if defined(__AVX512F__)
  const vfloat n = (vfloat)_mm512_roundscale_ps((__m512)xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vfloat magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const vfloat n = (xc + magic) - magic;
#endif
  const vfloat f = xc - n;
  vfloat p;
  if constexpr (kFast) {
    p = vsplat(9.560519835786383e-3f);
    p = p * f + 5.591712286326782e-2f;
    p = p * f + 2.402498165047801e-1f;
    p = p * f + 6.931219575470391e-1f;
    p = p * f + 9.999991904522173e-1f;
  } else {
    p = vsplat(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
  }
#if defined(__AVX512F__)
  // p * 2^n, zero-masked where x < -126 (NaN compares unordered and is kept): masked lanes are not
  // computed, which spares the denormal assists that cost 3x on masked-out softmax blocks
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, (__m512)lowest, _CMP_NLT_UQ);
  return (vfloat)_mm512_maskz_scalef_ps(keep, (__m512)p, (__m512)n);
#else
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  const vfloat r = p * (vfloat)bits;  // a vector cast reinterprets the bits
  return x < lowest ? vfloat{} : r;
#endif
}

// ---------------------------------------------------------------------------------------------
// GEMM micro-kernels: C[M x kLanes*NV] (+)= A . B, A(m, k) = a[m * a_row + k * a_k], B row k at b + k * ldb.
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

// Rows per register block for NV vectors: R * NV accumulators, NV B vectors and the broadcast A
// value fit the vector registers (AVX-512: 32 zmm, panels of up to 4 vectors; AVX2: 16 ymm, up
// to 2, the classic 6 x 16 FMA block).
#if defined(__AVX512F__)
constexpr int kMaxPanelVectors = 4;
#else
constexpr int kMaxPanelVectors = 2;
#endif
template <int NV>
constexpr int kBlockRows = NV >= kMaxPanelVectors ? 6 : 12;

template <class Dot, int NV, bool ACCUM>
void gemm_panel(int64_t M, int64_t K, const typename Dot::Elem* a, int64_t a_row, int64_t a_k,
                const typename Dot::Elem* b, int64_t ldb, float* c, int64_t ldc) {
  constexpr int R = kBlockRows<NV>;
  int64_t m = 0;
  for (; m + R <= M; m += R) gemm_rows<Dot, NV, R, ACCUM>(K, a + m * a_row, a_row, a_k, b, ldb, c + m * ldc, ldc);
  gemm_tail<Dot, NV, R - 1, ACCUM>(M - m, K, a + m * a_row, a_row, a_k, b, ldb, c + m * ldc, ldc);
}

// C[M x N] (+)= A[M x K] . B[K x N] for N a multiple of kLanes, in column panels of 4, 2 and 1
// vectors (AVX-512: 64, 32, 16 columns), or of 2 and 1 (AVX2: 16, 8).
template <bool ACCUM, class Dot = Fp32Dot>
void gemm(int64_t M, int64_t N, int64_t K, const typename Dot::Elem* a, int64_t a_row, int64_t a_k,
          const typename Dot::Elem* b, int64_t ldb, float* c, int64_t ldc) {
  if (M <= 0) return;
  int64_t n = 0;
  if constexpr (kMaxPanelVectors >= 4)
    for (; n + 4 * kLanes <= N; n += 4 * kLanes) gemm_panel<Dot, 4, ACCUM>(M, K, a, a_row, a_k, b + n, ldb, c + n, ldc);
  for (; n + 2 * kLanes <= N; n += 2 * kLanes) gemm_panel<Dot, 2, ACCUM>(M, K, a, a_row, a_k, b + n, ldb, c + n, ldc);
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

// Key blocks. A block owns the keys [j0, j1); the GEMMs run over its cover, `rows` keys from a0
// (a0 <= j0, a0 + rows >= j1). Keys of the cover outside [j0, j1) are masked for every query row,
// so a microkernel may widen a block to the sizes it computes fastest.
struct KeyBlock {
  int64_t a0, rows, j0, j1;
};

// Blocks of nearly equal size (at most kMaxKeyBlock), each its own cover: the hand-written kernels.
struct EvenBlocks {
  template <typename Fn>
  static void split(int64_t lo, int64_t hi, Fn&& fn) {
    if (hi < lo) return;
    const int64_t span = hi - lo + 1;
    const int64_t blocks = (span + kMaxKeyBlock - 1) / kMaxKeyBlock;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t j0 = lo + span * blk / blocks, j1 = lo + span * (blk + 1) / blocks;
      fn(KeyBlock{j0, j1 - j0, j0, j1});
    }
  }
};

// Blocks cut at multiples of kPanel, covers aligned to 16 keys: the oneDNN micro-GEMMs, whose
// JIT-compiled kernels are cached per shape (so few shapes), read V^T panel by panel.
#ifndef AHA_PANEL
#define AHA_PANEL 512
#endif
constexpr int64_t kPanel = AHA_PANEL;
struct PanelBlocks {
  template <typename Fn>
  static void split(int64_t lo, int64_t hi, Fn&& fn) {
    for (int64_t j0 = lo; j0 <= hi;) {
      const int64_t j1 = std::min(hi + 1, (j0 / kPanel + 1) * kPanel);
      const int64_t a0 = j0 / kCoverAlign * kCoverAlign;
      fn(KeyBlock{a0, round_up(j1, kCoverAlign) - a0, j0, j1});
      j0 = j1;
    }
  }
};

// Calls fn(block) for the key blocks a tile reads: its sink keys, then its key range.
template <typename Blocks, typename Fn>
void for_each_key_block(const Tile& tile, Fn&& fn) {
  Blocks::split(tile.sink_lo, tile.sink_hi, fn);
  Blocks::split(tile.key_lo, tile.key_hi, fn);
}

template <typename Elem = float>
struct AlignedBuffer {
  std::unique_ptr<Elem[], void (*)(void*)> data{nullptr, std::free};
  explicit AlignedBuffer(int64_t count)
      : data(static_cast<Elem*>(std::aligned_alloc(64, round_up(std::max<int64_t>(count, 16) * sizeof(Elem), 64))),
             std::free) {}
  Elem* get() const { return data.get(); }
};

// Per-call scratch that the next call on the same thread reuses (up to kKeptBytes): a fresh
// allocation of this size is fresh pages, and faulting them in cost 5-10% of a 16K-key forward.
template <typename T, int Slot = 0>
class CallBuffer {
 public:
  static constexpr size_t kKeptBytes = size_t(64) << 20;
  explicit CallBuffer(int64_t count) : bytes_(round_up(std::max<int64_t>(count, 1) * sizeof(T), 64)) {
    if (bytes_ > kKeptBytes) {
      own_.reset(static_cast<std::byte*>(std::aligned_alloc(64, bytes_)));
      data_ = own_.get();
      return;
    }
    thread_local std::unique_ptr<std::byte[], void (*)(void*)> kept{nullptr, std::free};
    thread_local size_t capacity = 0;
    TORCH_CHECK(!t_call_buffer_busy, "aha: CallBuffer is not reentrant");
    if (bytes_ > capacity) {
      kept.reset(static_cast<std::byte*>(std::aligned_alloc(64, bytes_)));
      capacity = bytes_;
    }
    data_ = kept.get();
    borrowed_ = t_call_buffer_busy = true;
  }
  ~CallBuffer() {
    if (borrowed_) t_call_buffer_busy = false;
  }
  CallBuffer(const CallBuffer&) = delete;
  CallBuffer& operator=(const CallBuffer&) = delete;
  T* get() const { return reinterpret_cast<T*>(data_); }

 private:
  static inline thread_local bool t_call_buffer_busy = false;
  size_t bytes_;
  std::unique_ptr<std::byte[], void (*)(void*)> own_{nullptr, std::free};
  std::byte* data_ = nullptr;
  bool borrowed_ = false;
};

// The oneDNN micro-GEMMs keep per-thread hardware state (AMX tile configuration) between calls;
// a thread that used them releases it when its share of a parallel region ends.
thread_local bool t_brgemm_vnni_used = false;
thread_local bool t_brgemm_used = false;
inline void release_brgemm() {
  if (t_brgemm_used) at::native::cpublas::brgemm_release(t_brgemm_vnni_used);
  t_brgemm_used = t_brgemm_vnni_used = false;
}

// Runs task(index, thread_slot) for every index of `order` (costs[index]: its modelled cost),
// balanced dynamically. Threads claim runs of consecutive entries of `order`, each about 1/8 of a
// thread's share of the cost still to do (guided scheduling): early runs are long, so the small
// tiles of a head that sit next to each other in `order` (and read the same keys) mostly run on
// one core, one after the other; the last runs are single tasks, for balance.
template <typename Fn>
void run_tasks(const std::vector<int64_t>& order, const std::vector<double>& costs, Fn&& task) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), order.size()));
  double remaining = 0.0;
  for (int64_t index : order) remaining += costs[index];
  std::vector<int64_t> run_end;  // run r is order[run_end[r - 1] .. run_end[r])
  double run_cost = 0.0;
  for (size_t i = 0; i < order.size(); ++i) {
    run_cost += costs[order[i]];
    if (run_cost >= remaining / (8.0 * threads) || i + 1 == order.size()) {
      run_end.push_back(static_cast<int64_t>(i) + 1);
      remaining -= run_cost;
      run_cost = 0.0;
    }
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      task(-1, slot);  // lets the task set up per-thread scratch
      for (int64_t r = next.fetch_add(1); r < static_cast<int64_t>(run_end.size()); r = next.fetch_add(1))
        for (int64_t i = r == 0 ? 0 : run_end[r - 1]; i < run_end[r]; ++i) task(order[i], slot);
    }
    release_brgemm();
  });
}

// Task indices by decreasing cost, in half-octave classes that keep their original order: tiles
// of nearly equal cost (a head's local tiles) stay in position order, next to the tiles whose keys
// they share, instead of being shuffled by small cost differences.
std::vector<int64_t> largest_first(const std::vector<double>& costs) {
  std::vector<int64_t> order(costs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  auto cost_class = [&](int64_t i) { return costs[i] > 0 ? std::floor(2 * std::log2(costs[i])) : -1e9; };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost_class(a) > cost_class(b); });
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

// The columns [first, first + count) of S^T (query rows of a tile, in whole vectors) that a block
// is computed for.
struct Columns {
  int64_t first, count;
};

// For each group of kLanes columns of S^T (query rows of a tile), the rows [lo, hi) of a block's
// cover that hold keys some row of the group reads: its other rows are masked for the whole group.
// A tile's rows are in position order, so the groups of a local tile see windows shifted by about
// a group's span (20% of a 64-row tile's cover lies outside each group's rows), and the later
// blocks of a tile of scattered global rows are read by its later groups only. Returns the
// columns from the first to the last group that reads the block (count 0: none does).
struct GroupRows {
  int32_t lo[256 / 8], hi[256 / 8];  // indexed by column / kLanes
};

inline Columns group_rows(const KeyBlock& blk, const Tile& tile, const TileLimits& lim, int64_t padded, GroupRows& gr) {
  int64_t first_column = padded, end_column = 0;
  for (int64_t i = 0; i < padded; i += kLanes) {
    int64_t lo_min = std::numeric_limits<int32_t>::max(), hi_max = -1;
    for (int lane = 0; lane < kLanes; ++lane) {
      if (lim.lo[i + lane] > lim.hi[i + lane]) continue;  // padding or an empty row
      lo_min = std::min<int64_t>(lo_min, lim.lo[i + lane]);
      hi_max = std::max<int64_t>(hi_max, lim.hi[i + lane]);
    }
    // sink keys are read by every row that reaches them, whatever its lower limit
    const int64_t first = blk.j0 < tile.sink_end ? blk.j0 : std::max(blk.j0, lo_min);
    const int64_t end = std::max(first, std::min(blk.j1, hi_max + 1));
    gr.lo[i / kLanes] = static_cast<int32_t>(std::clamp<int64_t>(first - blk.a0, 0, blk.rows));
    gr.hi[i / kLanes] = static_cast<int32_t>(std::clamp<int64_t>(end - blk.a0, 0, blk.rows));
    if (gr.lo[i / kLanes] == gr.hi[i / kLanes]) continue;
    first_column = std::min(first_column, i);
    end_column = i + kLanes;
  }
  return first_column < end_column ? Columns{first_column, end_column - first_column} : Columns{0, 0};
}

// Sets S^T[j, i] = fill for the keys j of the block's cover that row i (a column of `cols`) does
// not read: every key outside [j0, j1), and the keys outside row i's range that are not sink keys
// <= hi[i]. Keys in the tile's shared range are read by every row and skipped. With `gr`, only the
// rows [lo, hi) of each group are masked (the softmax treats the others as masked).
inline void mask_block(float* s, int64_t ld, const KeyBlock& blk, const Tile& tile, const TileLimits& lim,
                       Columns cols, const GroupRows* gr, float fill) {
  const vfloat fillv = vsplat(fill);
  for (int64_t i = cols.first; i < cols.first + cols.count; i += kLanes) {
    const vint lo = vloadi(lim.lo + i), hi = vloadi(lim.hi + i);
    const int64_t first = gr ? blk.a0 + gr->lo[i / kLanes] : blk.a0;
    const int64_t end = gr ? blk.a0 + gr->hi[i / kLanes] : blk.a0 + blk.rows;
    for (int64_t j = first; j < end; ++j) {
      float* x = s + (j - blk.a0) * ld + i;
      if (j < blk.j0 || j >= blk.j1) {
        vstore(x, fillv);
        continue;
      }
      if (j >= tile.shared_lo && j <= tile.shared_hi) {
        j = std::min<int64_t>(tile.shared_hi, end - 1);  // skip to the first key past the shared range
        continue;
      }
      const vint key = vint{} + static_cast<int32_t>(j);
      const vint sink = vint{} + (j < tile.sink_end ? -1 : 0);
      const vint inside = ((lo <= key) | sink) & (hi >= key);
      vstore(x, inside ? vload(x) : fillv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Two fp32 vectors rounded to bf16 (nearest even) and interleaved: word i = (a[i], b[i]).
inline void store_bf16_pairs(vfloat a, vfloat b, uint32_t* dst) {
#if defined(__AVX512BF16__)
  // a in the low half, b in the high half, then interleaved: one word per lane
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                              21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh((__m512)b, (__m512)a);
  _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(interleave, both));
#else
  for (int lane = 0; lane < kLanes; ++lane)
    dst[lane] = uint32_t(c10::BFloat16(a[lane]).x) | uint32_t(c10::BFloat16(b[lane]).x) << 16;
#endif
}

// Online-softmax step for one key block: S^T [nb x padded] (times `to_log2` in log2 units) becomes
// P^T; the running max m (log2 units) and sum l of every query column are updated and the
// accumulated output of each query is rescaled to the new max (skipped where the max did not
// move): O [padded x D] with `o_rows`, else O^T [D x padded].
// P^T is written over S^T, or, with `pairs`, only as bf16 pairs of key rows (pairs[q][i] =
// (P^T[2q][i], P^T[2q+1][i]), the VNNI layout; an odd last row is paired with 0), then from the
// faster exponential (l sums the same unrounded values).
// G column groups of kLanes are done at once (G = 0: any padded, group by group): S^T is read row
// by row in order, and the G max and sum chains are independent. Group g holds scores in the rows
// gr.lo..gr.hi of its index only; its other rows are masked (P = 0, no exponential).
template <int G>
inline void softmax_groups(float* s, int64_t nb, int64_t padded, int64_t i0, const GroupRows& gr, float to_log2,
                           float* m, float* l, float* o, int64_t D, bool o_rows, uint32_t* pairs) {
  constexpr int kG = G > 0 ? G : 1;
  const vfloat c = vsplat(to_log2);
  vfloat mx[kG], m_use[kG], sum[kG];
  int64_t lo[kG], hi[kG];
  int64_t rows_lo = nb, rows_hi = 0;
  for (int g = 0; g < kG; ++g) {
    mx[g] = vsplat(kNegInf);
    lo[g] = gr.lo[i0 / kLanes + g];
    hi[g] = gr.hi[i0 / kLanes + g];
    rows_lo = std::min(rows_lo, lo[g]);
    rows_hi = std::max(rows_hi, hi[g]);
  }
  for (int64_t j = rows_lo; j < rows_hi; ++j)
    for (int g = 0; g < kG; ++g)
      if (j >= lo[g] && j < hi[g]) mx[g] = vmax(mx[g], vload(s + j * padded + i0 + g * kLanes));
  auto probability = [&](int64_t j, int g) {
    return j >= lo[g] && j < hi[g] ? vexp2<true>(vload(s + j * padded + i0 + g * kLanes) * c - m_use[g]) : vfloat{};
  };
  for (int g = 0; g < kG; ++g) {
    const vfloat m_old = vload(m + i0 + g * kLanes);
    mx[g] = vmax(m_old, mx[g] * c);
    m_use[g] = mx[g] == vsplat(kNegInf) ? vfloat{} : mx[g];  // no key yet: avoid -inf - -inf
    sum[g] = vfloat{};
  }
  if (pairs) {
    for (int64_t q = 0; 2 * q < nb; ++q)
      for (int g = 0; g < kG; ++g) {
        const vfloat p0 = probability(2 * q, g), p1 = probability(2 * q + 1, g);  // row nb is outside every group
        sum[g] += p0 + p1;
        store_bf16_pairs(p0, p1, pairs + q * padded + i0 + g * kLanes);
      }
  } else {
    for (int64_t j = 0; j < nb; ++j)
      for (int g = 0; g < kG; ++g) {
        float* x = s + j * padded + i0 + g * kLanes;
        const vfloat p = j >= lo[g] && j < hi[g] ? vexp2(vload(x) * c - m_use[g]) : vfloat{};
        vstore(x, p);
        sum[g] += p;
      }
  }
  for (int g = 0; g < kG; ++g) {
    const int64_t i = i0 + g * kLanes;
    const vfloat m_old = vload(m + i);
    const vfloat alpha = vexp2(m_old - m_use[g]);
    vstore(l + i, vload(l + i) * alpha + sum[g]);
    vstore(m + i, mx[g]);
    // a column with no key before this block holds zeros: nothing to rescale
    const vint moved = (alpha != vsplat(1.0f)) & (m_old != vsplat(kNegInf));
    bool any = false;
    for (int lane = 0; lane < kLanes; ++lane) any |= moved[lane] != 0;
    if (!any) continue;
    if (o_rows) {
      for (int r = 0; r < kLanes; ++r)
        for (int64_t d = 0; d < D; d += kLanes) vstore(o + (i + r) * D + d, vload(o + (i + r) * D + d) * alpha[r]);
    } else {
      for (int64_t d = 0; d < D; ++d) vstore(o + d * padded + i, vload(o + d * padded + i) * alpha);
    }
  }
}

// softmax_groups over the columns `cols` of S^T (the others keep their statistics and output).
inline void softmax_block(float* s, int64_t nb, int64_t padded, Columns cols, const GroupRows& gr, float to_log2,
                          float* m, float* l, float* o, int64_t D, bool o_rows, uint32_t* pairs) {
  const int64_t i0 = cols.first;
  switch (cols.count / kLanes) {
    case 0: return;
    case 1: return softmax_groups<1>(s, nb, padded, i0, gr, to_log2, m, l, o, D, o_rows, pairs);
    case 2: return softmax_groups<2>(s, nb, padded, i0, gr, to_log2, m, l, o, D, o_rows, pairs);
    case 3: return softmax_groups<3>(s, nb, padded, i0, gr, to_log2, m, l, o, D, o_rows, pairs);
    case 4: return softmax_groups<4>(s, nb, padded, i0, gr, to_log2, m, l, o, D, o_rows, pairs);
    default:
      for (int64_t i = i0; i < i0 + cols.count; i += kLanes)
        softmax_groups<0>(s, nb, padded, i, gr, to_log2, m, l, o, D, o_rows, pairs);
  }
}

// Packing into pairs of bf16 held in 32-bit words, consecutive along the reduction: the operand
// layout of vdpbf16ps (Bf16PairDot) and the VNNI layout of oneDNN's bf16 micro-GEMMs.

// qw[p][i] = (Q[i][2p], Q[i][2p+1]): word p of query row i, for the tile's rows (0 for padding).
inline void pack_query_pairs(const c10::BFloat16* qh, int64_t q_st, const int32_t* rows, int64_t M, int64_t padded,
                             int64_t D, uint32_t* qw) {
  for (int64_t i = 0; i < padded; ++i) {
    const c10::BFloat16* row = i < M ? qh + rows[i] * q_st : nullptr;
    for (int64_t p = 0; p < D / 2; ++p)
      qw[p * padded + i] = row ? uint32_t(row[2 * p].x) | uint32_t(row[2 * p + 1].x) << 16 : 0u;
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

// The K and V rows of one (batch, KV head).
template <typename T>
struct HeadKV {
  const T* k;
  const T* v;
  int64_t b, kv_head;
};

// dst [cols x rows] = src [rows x cols]^T for 16- or 32-bit elements (fbgemm's SIMD transpose).
template <typename T>
inline void transpose(int64_t rows, int64_t cols, const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4);
  using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, float>;
  fbgemm::transpose_simd<Bits>(rows, cols, reinterpret_cast<const Bits*>(src), ld_src, reinterpret_cast<Bits*>(dst),
                               ld_dst);
}

// The type the oneDNN micro-GEMMs compute T in by default: fp16 is widened to fp32 (oneDNN's fp16
// micro-GEMMs without AMX-FP16 ran at half the fp32 rate on the AMX Xeon). bf16 is computed in
// bf16 where oneDNN can run its bf16 micro-GEMMs (brgemm_bf16_native), else widened to fp32 too.
template <typename T>
using ComputeType = std::conditional_t<std::is_same_v<T, c10::Half>, float, T>;

template <typename C, typename T>
inline C to_compute(T x) {
  if constexpr (std::is_same_v<C, T>) return x; else return static_cast<C>(static_cast<float>(x));
}

// X^T of every (batch, KV head) in panels of kPanel keys, [batch, kv_heads, panels, D, kPanel] of C,
// zero past the last key: the A operand of the GEMMs that reduce over keys (V^T . P^T, K^T . dS^T).
template <typename T, typename C = T>
struct TransposedPanels {
  const Problem& pb;
  int64_t panels;
  CallBuffer<C, 0> data;
  TransposedPanels(const Problem& problem, const T* x, int64_t sb, int64_t sh, int64_t st)
      : pb(problem), panels((pb.seq_kv + kPanel - 1) / kPanel), data(pb.batch * pb.kv_heads * panels * pb.dim * kPanel) {
    const int64_t D = pb.dim;
    at::parallel_for(0, pb.batch * pb.kv_heads * panels, 1, [&](int64_t begin, int64_t end) {
      std::vector<C> widened(std::is_same_v<T, C> ? 0 : kPanel * D);
      for (int64_t index = begin; index < end; ++index) {
        const int64_t head = index / panels, panel = index % panels;
        const T* xh = x + (head / pb.kv_heads) * sb + (head % pb.kv_heads) * sh;
        C* dst = data.get() + index * D * kPanel;
        const int64_t first = panel * kPanel, count = std::min(kPanel, pb.seq_kv - first);
        if constexpr (std::is_same_v<T, C>) {
          transpose(count, D, xh + first * st, st, dst, kPanel);
        } else {
          for (int64_t j = 0; j < count; ++j)
            for (int64_t d = 0; d < D; ++d) widened[j * D + d] = to_compute<C>(xh[(first + j) * st + d]);
          transpose(count, D, widened.data(), D, dst, kPanel);
        }
        for (int64_t d = 0; d < D; ++d) std::fill(dst + d * kPanel + count, dst + (d + 1) * kPanel, C(0.0f));
      }
    });
  }
  // The panel column of `key`: columns [key, key + n) for a block within one panel.
  const C* at(const HeadKV<T>& h, int64_t key) const {
    return data.get() + ((h.b * pb.kv_heads + h.kv_head) * panels + key / kPanel) * pb.dim * kPanel + key % kPanel;
  }
};

// The rows of a block's cover from [seq, D] rows with stride ld, as (pointer, stride): in place, or
// copied into `pad` with zero rows where the cover runs past the last key.
template <typename T>
std::pair<const T*, int64_t> cover_rows(const T* base, int64_t ld, const KeyBlock& blk, int64_t seq, int64_t D, T* pad) {
  const T* first = base + blk.a0 * ld;
  if (blk.a0 + blk.rows <= seq) return {first, ld};
  const int64_t real = seq - blk.a0;
  for (int64_t j = 0; j < blk.rows; ++j)
    for (int64_t d = 0; d < D; ++d) pad[j * D + d] = j < real ? first[j * ld + d] : T(0.0f);
  return {pad, D};
}

// The K or V rows of every (batch, KV head) in the compute type C: the tensor itself when T is C,
// else a converted copy [batch, kv_heads, seq, D], made once per call (Slot: which CallBuffer).
template <typename T, typename C, int Slot>
struct ComputeRows {
  static constexpr bool kSame = std::is_same_v<T, C>;
  const Problem& pb;
  const T* x;
  int64_t sb, sh, st;
  CallBuffer<C, Slot> copy;
  ComputeRows(const Problem& problem, const T* rows, int64_t sb_, int64_t sh_, int64_t st_)
      : pb(problem), x(rows), sb(sb_), sh(sh_), st(st_), copy(kSame ? 0 : pb.batch * pb.kv_heads * pb.seq_kv * pb.dim) {
    if constexpr (!kSame) {
      at::parallel_for(0, pb.batch * pb.kv_heads, 1, [&](int64_t begin, int64_t end) {
        for (int64_t head = begin; head < end; ++head) {
          const T* src = x + (head / pb.kv_heads) * sb + (head % pb.kv_heads) * sh;
          C* dst = copy.get() + head * pb.seq_kv * pb.dim;
          for (int64_t j = 0; j < pb.seq_kv; ++j)
            for (int64_t d = 0; d < pb.dim; ++d) dst[j * pb.dim + d] = to_compute<C>(src[j * st + d]);
        }
      });
    }
  }
  // The cover of a block for head h, as (pointer, row stride); `pad` holds it past the last key.
  std::pair<const C*, int64_t> cover(const HeadKV<T>& h, const KeyBlock& blk, C* pad) const {
    if constexpr (kSame) {
      const T* base = x + h.b * sb + h.kv_head * sh;
      return cover_rows(base, st, blk, pb.seq_kv, pb.dim, pad);
    } else {
      const C* base = copy.get() + (h.b * pb.kv_heads + h.kv_head) * pb.seq_kv * pb.dim;
      return cover_rows(base, pb.dim, blk, pb.seq_kv, pb.dim, pad);
    }
  }
};

// The query rows of a tile, gathered as rows [padded x D] (zero padding rows), times `factor` when
// it is not 1 (then fp32).
template <typename T, typename U>
inline void gather_rows(const T* qh, int64_t q_st, const int32_t* rows, int64_t M, int64_t padded, int64_t D,
                        float factor, U* dst) {
  for (int64_t i = 0; i < padded; ++i) {
    U* out = dst + i * D;
    if (i >= M) {
      std::fill(out, out + D, U(0.0f));
    } else if (std::is_same_v<T, U> && factor == 1.0f) {
      std::memcpy(out, qh + rows[i] * q_st, D * sizeof(T));
    } else {
      if constexpr (std::is_same_v<U, float>) {
        widen_row(qh + rows[i] * q_st, out, D);
        for (int64_t d = 0; d < D; ++d) out[d] *= factor;
      }
    }
  }
}

// Microkernels of the forward. Each computes, for one tile whose query rows it has loaded, and
// for the query columns `c` (Columns) of a key block only,
//   scores(block):      S^T [cover x c] = K[cover] . Q^T   (log2 units if kPrescaled, else raw)
//   accumulate(block):  O [c x D] += P . V[cover]  (kOutputRows), else O^T [D x c] += V^T . P^T
// with per-thread scratch in Scratch; S^T, P^T and O^T keep their `padded` columns. P^T is in S^T,
// or in bf16 pairs when pairs() is not null. The tile loop, masking and softmax are shared.

// Hand-written GEMMs on fp32 rows (bf16/fp16 widened block by block): AVX-512 or AVX2.
template <typename T>
struct VectorKernel {
  static constexpr bool kPrescaled = true;
  static constexpr bool kOutputRows = true;
  using Blocks = EvenBlocks;
  const Problem& pb;
  struct Scratch {
    AlignedBuffer<> qrows, qt, kbuf, vbuf;
    Scratch(const Problem& pb, int64_t P)
        : qrows(P * pb.dim), qt(pb.dim * P), kbuf(kMaxKeyBlock * pb.dim), vbuf(kMaxKeyBlock * pb.dim) {}
    uint32_t* pairs() { return nullptr; }
  };
  void load_queries(Scratch& sc, const T* qh, const int32_t* rows, int64_t M, int64_t padded) const {
    gather_rows(qh, pb.q_st, rows, M, padded, pb.dim, pb.scale * kLog2e, sc.qrows.get());
    transpose(padded, pb.dim, sc.qrows.get(), pb.dim, sc.qt.get(), padded);
  }
  void scores(Scratch& sc, const HeadKV<T>& h, const KeyBlock& blk, int64_t padded, Columns c, float* s) const {
    auto [kp, ldk] = rows_as_float(h.k, pb.k_st, blk.a0, blk.rows, pb.dim, sc.kbuf.get());
    gemm<false>(blk.rows, c.count, pb.dim, kp, ldk, 1, sc.qt.get() + c.first, padded, s + c.first, padded);
  }
  void accumulate(Scratch& sc, const HeadKV<T>& h, const KeyBlock& blk, int64_t M, int64_t padded, Columns c,
                  float* s, float* o) const {
    auto [vp, ldv] = rows_as_float(h.v, pb.v_st, blk.a0, blk.rows, pb.dim, sc.vbuf.get());
    const int64_t rows = std::min(M, c.first + c.count) - c.first;
    gemm<true>(rows, pb.dim, blk.rows, s + c.first, 1, padded, vp, ldv, o + c.first * pb.dim, pb.dim);
  }
};

// Query rows of a tile as the bf16-pair B operand Q^T: qw[p][i] = (Q[i][2p], Q[i][2p+1]).
struct QueryPairs {
  AlignedBuffer<c10::BFloat16> qrows;
  AlignedBuffer<uint32_t> qw;
  QueryPairs(int64_t D, int64_t P) : qrows(P * D), qw(D / 2 * P) {}
  void load(const Problem& pb, const c10::BFloat16* qh, const int32_t* rows, int64_t M, int64_t padded) {
    gather_rows(qh, pb.q_st, rows, M, padded, pb.dim, 1.0f, qrows.get());
    transpose(padded, pb.dim / 2, reinterpret_cast<const uint32_t*>(qrows.get()), pb.dim / 2, qw.get(), padded);
  }
};

#if defined(__AVX512BF16__)
// bf16 with AVX512-BF16: the hand-written GEMMs read bf16 pairs (vdpbf16ps), K rows in place.
struct Bf16PairKernel {
  static constexpr bool kPrescaled = false;
  static constexpr bool kOutputRows = true;
  using Blocks = EvenBlocks;
  using T = c10::BFloat16;
  const Problem& pb;
  struct Scratch {
    QueryPairs q;
    AlignedBuffer<uint32_t> pw, vw;
    Scratch(const Problem& pb, int64_t P)
        : q(pb.dim, P), pw((kMaxKeyBlock / 2 + 1) * P), vw((kMaxKeyBlock / 2 + 1) * pb.dim) {}
    uint32_t* pairs() { return pw.get(); }
  };
  void load_queries(Scratch& sc, const T* qh, const int32_t* rows, int64_t M, int64_t padded) const {
    sc.q.load(pb, qh, rows, M, padded);
  }
  void scores(Scratch& sc, const HeadKV<T>& h, const KeyBlock& blk, int64_t padded, Columns c, float* s) const {
    const auto* kw = reinterpret_cast<const uint32_t*>(h.k + blk.a0 * pb.k_st);
    gemm<false, Bf16PairDot>(blk.rows, c.count, pb.dim / 2, kw, pb.k_st / 2, 1, sc.q.qw.get() + c.first, padded,
                             s + c.first, padded);
  }
  void accumulate(Scratch& sc, const HeadKV<T>& h, const KeyBlock& blk, int64_t M, int64_t padded, Columns c, float*,
                  float* o) const {
    pack_value_pairs(h.v, pb.v_st, blk.a0, blk.rows, pb.dim, sc.vw.get());
    const int64_t rows = std::min(M, c.first + c.count) - c.first;
    gemm<true, Bf16PairDot>(rows, pb.dim, (blk.rows + 1) / 2, sc.pw.get() + c.first, 1, padded, sc.vw.get(), pb.dim,
                            o + c.first * pb.dim, pb.dim);
  }
};
#endif

// oneDNN micro-GEMMs (at::native::cpublas::brgemm, the ones PyTorch's CPU flash attention uses):
// AMX tiles for bf16 where the CPU has them (else AVX-512), AVX-512/AVX2 FMA for fp32 (and fp16,
// widened); chosen by oneDNN at run time. The A operands are K rows in place and V^T, transposed
// once per call into panels of kPanel keys (zero past the last key); the B operands are Q^T and
// P^T, in VNNI pairs for bf16.
// What the forward and backward oneDNN microkernels share: the compute type, whether operands are
// VNNI pairs (bf16), the blocking, and the bookkeeping of the per-thread AMX state.
template <typename T, typename Compute>
struct BrgemmTraits {
  using C = Compute;
  static constexpr bool kVnni = std::is_same_v<C, c10::BFloat16>;
  static constexpr bool kPrescaled = !kVnni;  // bf16 queries are not rescaled before rounding
  static constexpr bool kOutputRows = false;
  using Blocks = PanelBlocks;
  static void mark_used() {
    t_brgemm_used = true;
    t_brgemm_vnni_used |= kVnni;
  }
};

template <typename T, typename Compute = ComputeType<T>>
struct BrgemmKernel : BrgemmTraits<T, Compute> {
  using Traits = BrgemmTraits<T, Compute>;
  using typename Traits::C;
  using Traits::kVnni;
  using Traits::mark_used;
  const Problem& pb;
  TransposedPanels<T, C> vt;
  ComputeRows<T, C, 1> krows;

  BrgemmKernel(const Problem& problem, const T* k, const T* v)
      : pb(problem), vt(problem, v, pb.v_sb, pb.v_sh, pb.v_st), krows(problem, k, pb.k_sb, pb.k_sh, pb.k_st) {}

  struct Scratch {
    std::conditional_t<kVnni, QueryPairs, std::monostate> q;
    AlignedBuffer<float> qrows, qt;
    AlignedBuffer<uint32_t> pw;
    AlignedBuffer<C> kpad;
    Scratch(const Problem& pb, int64_t P)
        : q(make_queries(pb.dim, P)), qrows(kVnni ? 0 : P * pb.dim), qt(kVnni ? 0 : pb.dim * P),
          pw(kVnni ? kPanel / 2 * P : 0), kpad(kPanel * pb.dim) {}
    static auto make_queries(int64_t D, int64_t P) {
      if constexpr (kVnni) return QueryPairs(D, P); else return std::monostate{};
    }
    uint32_t* pairs() { return kVnni ? pw.get() : nullptr; }
  };
  void load_queries(Scratch& sc, const T* qh, const int32_t* rows, int64_t M, int64_t padded) const {
    if constexpr (kVnni) {
      sc.q.load(pb, qh, rows, M, padded);
    } else {
      gather_rows(qh, pb.q_st, rows, M, padded, pb.dim, pb.scale * kLog2e, sc.qrows.get());
      transpose(padded, pb.dim, sc.qrows.get(), pb.dim, sc.qt.get(), padded);
    }
  }
  // Q^T from column `first` on (a column of VNNI pairs is one 32-bit word).
  const C* query_operand(Scratch& sc, int64_t first) const {
    if constexpr (kVnni) return reinterpret_cast<const C*>(sc.q.qw.get() + first); else return sc.qt.get() + first;
  }
  void scores(Scratch& sc, const HeadKV<T>& h, const KeyBlock& blk, int64_t padded, Columns c, float* s) const {
    auto [a, lda] = krows.cover(h, blk, sc.kpad.get());
    mark_used();
    at::native::cpublas::brgemm(blk.rows, c.count, pb.dim, lda, padded, padded, false, a, query_operand(sc, c.first),
                                s + c.first, kVnni);
  }
  void accumulate(Scratch& sc, const HeadKV<T>& h, const KeyBlock& blk, int64_t, int64_t padded, Columns c, float* s,
                  float* ot) const {
    const C* a = vt.at(h, blk.a0);
    const C* b = kVnni ? reinterpret_cast<const C*>(sc.pw.get() + c.first) : reinterpret_cast<const C*>(s + c.first);
    mark_used();
    at::native::cpublas::brgemm(pb.dim, c.count, blk.rows, kPanel, padded, padded, true, a, b, ot + c.first, kVnni);
  }
};

// An output row o * scale converted to T (bf16 rounded to nearest even); returns false when a
// value is not finite (x * 0 is NaN exactly for NaN and inf).
template <typename T>
inline bool store_row(const float* o, float scale, int64_t D, T* dst) {
  vfloat poison{};
  float tail = 0.0f;
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    const vfloat x = vload(o + d) * scale;
    poison += x * 0.0f;
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)_mm512_cvtneps_pbh((__m512)x));
      continue;
    }
#endif
    for (int lane = 0; lane < kLanes; ++lane) dst[d + lane] = from_float<T>(x[lane]);
  }
  for (; d < D; ++d) {
    dst[d] = from_float<T>(o[d] * scale);
    tail += o[d] * scale * 0.0f;
  }
  bool finite = tail == 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) finite &= poison[lane] == 0.0f;
  return finite;
}

// Returns whether every output value is finite.
template <typename T, typename Kernel>
bool forward_impl(const Problem& pb, const Kernel& kernel, const T* q, const T* k, const T* v, const Tiling& tl,
                  T* out, float* lse) {
  const int64_t D = pb.dim;
  const int64_t group = pb.group();
  int64_t max_rows = 16;
  for (const Tile& t : tl.tiles) max_rows = std::max<int64_t>(max_rows, t.count);
  const int64_t P = round_up(max_rows, kLanes);
  const float softmax_factor = Kernel::kPrescaled ? 1.0f : pb.scale * kLog2e;

  std::vector<double> costs(tl.tiles.size());
  for (size_t i = 0; i < costs.size(); ++i) costs[i] = tl.tiles[i].cost;
  const auto order = largest_first(costs);

  struct Scratch {
    typename Kernel::Scratch kernel;
    AlignedBuffer<> s, acc, o, m, l;
    Scratch(const Problem& pb, int64_t P)
        : kernel(pb, P), s((kMaxKeyBlock + 2) * P), acc(pb.dim * P), o(P * pb.dim), m(P), l(P) {}
  };
  std::vector<std::unique_ptr<Scratch>> scratch(at::get_num_threads() + 1);
  std::atomic<bool> all_finite{true};

  run_tasks(order, costs, [&](int64_t index, int64_t slot) {
    if (index < 0) {
      if (!scratch[slot]) scratch[slot] = std::make_unique<Scratch>(pb, P);
      return;
    }
    Scratch& sc = *scratch[slot];
    const Tile& tile = tl.tiles[index];
    const int64_t M = tile.count;
    const int64_t padded = round_up(M, kLanes);
    const HeadKV<T> head{k + tile.b * pb.k_sb + (tile.h / group) * pb.k_sh,
                         v + tile.b * pb.v_sb + (tile.h / group) * pb.v_sh, tile.b, tile.h / group};
    const int32_t* rows = tl.rows.data() + tile.offset;
    TileLimits lim;
    lim.load(tl, tile, padded);

    kernel.load_queries(sc.kernel, q + tile.b * pb.q_sb + tile.h * pb.q_sh, rows, M, padded);
    float *s = sc.s.get(), *acc = sc.acc.get(), *m = sc.m.get(), *l = sc.l.get();
    std::fill(acc, acc + D * padded, 0.0f);
    std::fill(m, m + padded, kNegInf);
    std::fill(l, l + padded, 0.0f);
    for_each_key_block<typename Kernel::Blocks>(tile, [&](const KeyBlock& blk) {
      GroupRows gr;
      const Columns cols = group_rows(blk, tile, lim, padded, gr);
      if (cols.count == 0) return;
      kernel.scores(sc.kernel, head, blk, padded, cols, s);
      mask_block(s, padded, blk, tile, lim, cols, &gr, kNegInf);
      softmax_block(s, blk.rows, padded, cols, gr, softmax_factor, m, l, acc, D, Kernel::kOutputRows,
                    sc.kernel.pairs());
      kernel.accumulate(sc.kernel, head, blk, M, padded, cols, s, acc);
    });

    const float* o = acc;  // O [padded x D]
    if constexpr (!Kernel::kOutputRows) {
      transpose(D, padded, acc, padded, sc.o.get(), D);
      o = sc.o.get();
    }
    T* oh = out + (tile.b * pb.q_heads + tile.h) * pb.seq_q * D;
    float* lh = lse + (tile.b * pb.q_heads + tile.h) * pb.seq_q;
    bool finite = true;
    for (int64_t i = 0; i < M; ++i) {
      const bool empty = lim.lo[i] > lim.hi[i];
      finite &= store_row(o + i * D, empty ? 0.0f : 1.0f / l[i], D, oh + rows[i] * D);
      lh[rows[i]] = empty ? kNegInf : (m[i] + std::log2(l[i])) * kLn2;
    }
    if (!finite) all_finite.store(false, std::memory_order_relaxed);
  });
  return all_finite.load();
}

// ---------------------------------------------------------------------------------------------
// Backward (FlashAttention-2 style, from the forward's log-sum-exp). Per tile and key block:
//   P^T = 2^(S^T - lse), dV += P^T . dO, dP^T = V . dO^T, dS^T = P^T * (dP^T - delta) * scale,
//   dK += dS^T . Q, dQ += dS . K.
// Microkernels supply the GEMMs; masking, the exponential and dS are shared. Tasks are (batch,
// KV head, part): a task owns the dK/dV accumulators of its part, so no two threads write the same
// memory; parts > 1 only when there are fewer KV heads than threads.

// Hand-written GEMMs on fp32 rows (bf16/fp16 widened): AVX-512 or AVX2.
template <typename T>
struct VectorBackward {
  static constexpr bool kPrescaled = true;
  static constexpr bool kOutputRows = true;  // dQ accumulates as rows [padded x D]
  using Blocks = EvenBlocks;
  const Problem& pb;
  struct Scratch {
    AlignedBuffer<> qrows, qt, dorows, dot, kbuf, vbuf;
    const float* kp = nullptr;
    int64_t ldk = 0;
    Scratch(const Problem& pb, int64_t P)
        : qrows(P * pb.dim), qt(pb.dim * P), dorows(P * pb.dim), dot(pb.dim * P), kbuf(kMaxKeyBlock * pb.dim),
          vbuf(kMaxKeyBlock * pb.dim) {}
  };
  void load_tile(Scratch& sc, const T* qh, const T* doh, const int32_t* rows, int64_t M, int64_t padded) const {
    const int64_t D = pb.dim;
    gather_rows(qh, pb.q_st, rows, M, padded, D, 1.0f, sc.qrows.get());
    gather_rows(doh, D, rows, M, padded, D, 1.0f, sc.dorows.get());
    transpose(padded, D, sc.qrows.get(), D, sc.qt.get(), padded);
    transpose(padded, D, sc.dorows.get(), D, sc.dot.get(), padded);
    const float qscale = pb.scale * kLog2e;
    for (int64_t x = 0; x < D * padded; ++x) sc.qt.get()[x] *= qscale;
  }
  void scores(Scratch& sc, const HeadKV<T>& h, const KeyBlock& blk, int64_t padded, float* s) const {
    std::tie(sc.kp, sc.ldk) = rows_as_float(h.k, pb.k_st, blk.a0, blk.rows, pb.dim, sc.kbuf.get());
    gemm<false>(blk.rows, padded, pb.dim, sc.kp, sc.ldk, 1, sc.qt.get(), padded, s, padded);
  }
  void grad_v(Scratch& sc, const KeyBlock& blk, int64_t M, int64_t padded, const float* s, float* dv) const {
    gemm<true>(blk.rows, pb.dim, M, s, padded, 1, sc.dorows.get(), pb.dim, dv + blk.a0 * pb.dim, pb.dim);
  }
  void grad_probs(Scratch& sc, const HeadKV<T>& h, const KeyBlock& blk, int64_t padded, float* dp) const {
    auto [vp, ldv] = rows_as_float(h.v, pb.v_st, blk.a0, blk.rows, pb.dim, sc.vbuf.get());
    gemm<false>(blk.rows, padded, pb.dim, vp, ldv, 1, sc.dot.get(), padded, dp, padded);
  }
  void grad_qk(Scratch& sc, const HeadKV<T>&, const KeyBlock& blk, int64_t M, int64_t padded, const float* ds,
               float* dk, float* dq) const {
    gemm<true>(M, pb.dim, blk.rows, ds, 1, padded, sc.kp, sc.ldk, dq, pb.dim);
    gemm<true>(blk.rows, pb.dim, M, ds, padded, 1, sc.qrows.get(), pb.dim, dk + blk.a0 * pb.dim, pb.dim);
  }
};

// x rows [2r, 2r+1] of a [rows x D] bf16 matrix as the VNNI B operand: w[r][d] = (X[2r][d], X[2r+1][d]).
inline void pack_row_pairs(const c10::BFloat16* x, int64_t rows, int64_t D, uint32_t* w) {
  for (int64_t r = 0; r < rows / 2; ++r)
    for (int64_t d = 0; d < D; ++d) w[r * D + d] = uint32_t(x[2 * r * D + d].x) | uint32_t(x[(2 * r + 1) * D + d].x) << 16;
}

// [rows x padded] fp32 rounded to bf16 (a plain A operand).
inline void round_to_bf16(const float* x, int64_t count, c10::BFloat16* out) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + kLanes <= count; i += kLanes)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh((__m512)vload(x + i)));
#endif
  for (; i < count; ++i) out[i] = c10::BFloat16(x[i]);
}

// oneDNN micro-GEMMs (AMX for bf16 where present). A operands: K and V rows in place, P^T and
// dS^T (bf16 copies for bf16), K^T in panels; B operands: Q^T, dO^T, dO, Q and dS^T (VNNI pairs
// for bf16). dQ accumulates transposed, [D x padded].
template <typename T, typename Compute = ComputeType<T>>
struct BrgemmBackward : BrgemmTraits<T, Compute> {
  using Traits = BrgemmTraits<T, Compute>;
  using typename Traits::C;
  using Traits::kVnni;
  using Traits::mark_used;
  using Operand = std::conditional_t<kVnni, uint32_t, float>;
  const Problem& pb;
  TransposedPanels<T, C> kt;
  ComputeRows<T, C, 1> krows;
  ComputeRows<T, C, 2> vrows;

  BrgemmBackward(const Problem& problem, const T* k, const T* v)
      : pb(problem), kt(problem, k, pb.k_sb, pb.k_sh, pb.k_st), krows(problem, k, pb.k_sb, pb.k_sh, pb.k_st),
        vrows(problem, v, pb.v_sb, pb.v_sh, pb.v_st) {}

  struct Scratch {
    AlignedBuffer<C> qrows, dorows, pbuf, dsbuf, pad;
    AlignedBuffer<Operand> qt, dot, qw, dow, dsw;
    Scratch(const Problem& pb, int64_t P)
        : qrows(P * pb.dim), dorows(P * pb.dim), pbuf(kVnni ? kPanel * P : 0), dsbuf(kVnni ? kPanel * P : 0),
          pad(kPanel * pb.dim), qt(kVnni ? pb.dim / 2 * P : pb.dim * P), dot(kVnni ? pb.dim / 2 * P : pb.dim * P),
          qw(kVnni ? P / 2 * pb.dim : 0), dow(kVnni ? P / 2 * pb.dim : 0), dsw(kVnni ? kPanel / 2 * P : 0) {}
  };
  // Q^T / dO^T as B operands [D x padded] (pairs of D for bf16) and Q / dO rows [padded x D] (pairs of rows).
  void load_tile(Scratch& sc, const T* qh, const T* doh, const int32_t* rows, int64_t M, int64_t padded) const {
    const int64_t D = pb.dim;
    gather_rows(qh, pb.q_st, rows, M, padded, D, 1.0f, sc.qrows.get());
    gather_rows(doh, D, rows, M, padded, D, 1.0f, sc.dorows.get());
    if constexpr (kVnni) {
      transpose(padded, D / 2, reinterpret_cast<const uint32_t*>(sc.qrows.get()), D / 2, sc.qt.get(), padded);
      transpose(padded, D / 2, reinterpret_cast<const uint32_t*>(sc.dorows.get()), D / 2, sc.dot.get(), padded);
      pack_row_pairs(sc.qrows.get(), padded, D, sc.qw.get());
      pack_row_pairs(sc.dorows.get(), padded, D, sc.dow.get());
    } else {
      transpose(padded, D, sc.qrows.get(), D, sc.qt.get(), padded);
      transpose(padded, D, sc.dorows.get(), D, sc.dot.get(), padded);
      const float qscale = pb.scale * kLog2e;
      for (int64_t x = 0; x < D * padded; ++x) sc.qt.get()[x] *= qscale;
    }
  }
  const C* b_operand(const AlignedBuffer<Operand>& pairs_or_fp32) const {
    return reinterpret_cast<const C*>(pairs_or_fp32.get());
  }
  void scores(Scratch& sc, const HeadKV<T>& h, const KeyBlock& blk, int64_t padded, float* s) const {
    auto [a, lda] = krows.cover(h, blk, sc.pad.get());
    mark_used();
    at::native::cpublas::brgemm(blk.rows, padded, pb.dim, lda, padded, padded, false, a, b_operand(sc.qt), s, kVnni);
  }
  void grad_v(Scratch& sc, const KeyBlock& blk, int64_t, int64_t padded, const float* s, float* dv) const {
    const C* a = reinterpret_cast<const C*>(s);
    const C* b = sc.dorows.get();
    if constexpr (kVnni) {
      round_to_bf16(s, blk.rows * padded, sc.pbuf.get());
      a = sc.pbuf.get();
      b = b_operand(sc.dow);
    }
    mark_used();
    at::native::cpublas::brgemm(blk.rows, pb.dim, padded, padded, pb.dim, pb.dim, true, a, b, dv + blk.a0 * pb.dim, kVnni);
  }
  void grad_probs(Scratch& sc, const HeadKV<T>& h, const KeyBlock& blk, int64_t padded, float* dp) const {
    auto [a, lda] = vrows.cover(h, blk, sc.pad.get());
    mark_used();
    at::native::cpublas::brgemm(blk.rows, padded, pb.dim, lda, padded, padded, false, a, b_operand(sc.dot), dp, kVnni);
  }
  void grad_qk(Scratch& sc, const HeadKV<T>& h, const KeyBlock& blk, int64_t, int64_t padded, const float* ds,
               float* dk, float* dqt) const {
    const C* a = reinterpret_cast<const C*>(ds);
    const C* b_q = sc.qrows.get();
    const C* b_ds = reinterpret_cast<const C*>(ds);
    if constexpr (kVnni) {
      round_to_bf16(ds, blk.rows * padded, sc.dsbuf.get());
      for (int64_t q = 0; q < blk.rows / 2; ++q)
        for (int64_t i = 0; i < padded; i += kLanes)
          store_bf16_pairs(vload(ds + 2 * q * padded + i), vload(ds + (2 * q + 1) * padded + i), sc.dsw.get() + q * padded + i);
      a = sc.dsbuf.get();
      b_q = b_operand(sc.qw);
      b_ds = b_operand(sc.dsw);
    }
    mark_used();
    at::native::cpublas::brgemm(blk.rows, pb.dim, padded, padded, pb.dim, pb.dim, true, a, b_q, dk + blk.a0 * pb.dim, kVnni);
    at::native::cpublas::brgemm(pb.dim, padded, blk.rows, kPanel, padded, padded, true, kt.at(h, blk.a0), b_ds, dqt, kVnni);
  }
};

template <typename T, typename Kernel>
void backward_impl(const Problem& pb, const Kernel& kernel, const T* q, const T* k, const T* v, const T* out,
                   const T* dout, const float* lse, const Tiling& tl, int64_t parts, int64_t acc_rows, T* dq,
                   float* dk_parts, float* dv_parts) {
  const int64_t D = pb.dim;
  const int64_t group = pb.group();
  int64_t max_rows = 16;
  for (const Tile& t : tl.tiles) max_rows = std::max<int64_t>(max_rows, t.count);
  const int64_t P = round_up(max_rows, kLanes);
  const float exp_factor = Kernel::kPrescaled ? 1.0f : pb.scale * kLog2e;

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
    typename Kernel::Scratch kernel;
    AlignedBuffer<> s, dp, dqacc, dqrows, delta, lse2, orow, dorow;
    Scratch(const Problem& pb, int64_t P)
        : kernel(pb, P), s(kMaxKeyBlock * P), dp(kMaxKeyBlock * P), dqacc(P * pb.dim), dqrows(P * pb.dim), delta(P),
          lse2(P), orow(pb.dim), dorow(pb.dim) {}
  };
  std::vector<std::unique_ptr<Scratch>> scratch(at::get_num_threads() + 1);

  run_tasks(largest_first(task_cost), task_cost, [&](int64_t task, int64_t slot) {
    if (task < 0) {
      if (!scratch[slot]) scratch[slot] = std::make_unique<Scratch>(pb, P);
      return;
    }
    Scratch& sc = *scratch[slot];
    float* dk_acc = dk_parts + task * acc_rows * D;
    float* dv_acc = dv_parts + task * acc_rows * D;
    for (int64_t index : task_tiles[task]) {
      const Tile& tile = tl.tiles[index];
      if (tile.key_hi < tile.key_lo) continue;  // every row empty: zero gradients
      const int64_t M = tile.count;
      const int64_t padded = round_up(M, kLanes);
      const int64_t head_off = (tile.b * pb.q_heads + tile.h);
      const T* doh = dout + head_off * pb.seq_q * D;
      const T* oh = out + head_off * pb.seq_q * D;
      const float* lh = lse + head_off * pb.seq_q;
      const HeadKV<T> head{k + tile.b * pb.k_sb + (tile.h / group) * pb.k_sh,
                           v + tile.b * pb.v_sb + (tile.h / group) * pb.v_sh, tile.b, tile.h / group};
      const int32_t* rows = tl.rows.data() + tile.offset;
      TileLimits lim;
      lim.load(tl, tile, padded);
      kernel.load_tile(sc.kernel, q + tile.b * pb.q_sb + tile.h * pb.q_sh, doh, rows, M, padded);

      float *delta = sc.delta.get(), *lse2 = sc.lse2.get(), *dqacc = sc.dqacc.get();
      for (int64_t i = 0; i < padded; ++i) {
        const bool live = i < M && lim.lo[i] <= lim.hi[i];
        float dsum = 0.0f;
        if (live) {
          widen_row(oh + rows[i] * D, sc.orow.get(), D);
          widen_row(doh + rows[i] * D, sc.dorow.get(), D);
          for (int64_t d = 0; d < D; ++d) dsum += sc.dorow.get()[d] * sc.orow.get()[d];
        }
        delta[i] = dsum;
        // +inf makes P = 2^(S - lse2) exactly 0 for rows that attend nothing
        lse2[i] = live ? lh[rows[i]] * kLog2e : std::numeric_limits<float>::infinity();
      }
      std::fill(dqacc, dqacc + padded * D, 0.0f);
      float* s = sc.s.get();
      float* dp = sc.dp.get();
      const vfloat factor = vsplat(exp_factor), scale = vsplat(pb.scale);

      for_each_key_block<typename Kernel::Blocks>(tile, [&](const KeyBlock& blk) {
        const int64_t nb = blk.rows;
        kernel.scores(sc.kernel, head, blk, padded, s);
        mask_block(s, padded, blk, tile, lim, Columns{0, padded}, nullptr, kNegInf);
        for (int64_t j = 0; j < nb; ++j)
          for (int64_t i = 0; i < padded; i += kLanes)
            vstore(s + j * padded + i, vexp2(vload(s + j * padded + i) * factor - vload(lse2 + i)));
        kernel.grad_v(sc.kernel, blk, M, padded, s, dv_acc);
        kernel.grad_probs(sc.kernel, head, blk, padded, dp);
        for (int64_t j = 0; j < nb; ++j)
          for (int64_t i = 0; i < padded; i += kLanes) {
            float* x = dp + j * padded + i;
            vstore(x, vload(s + j * padded + i) * (vload(x) - vload(delta + i)) * scale);
          }
        kernel.grad_qk(sc.kernel, head, blk, M, padded, dp, dk_acc, dqacc);
      });
      const float* dqr = dqacc;  // dQ [padded x D]
      if constexpr (!Kernel::kOutputRows) {
        transpose(D, padded, dqacc, padded, sc.dqrows.get(), D);
        dqr = sc.dqrows.get();
      }
      T* dqh = dq + head_off * pb.seq_q * D;
      for (int64_t i = 0; i < M; ++i) store_row(dqr + i * D, 1.0f, D, dqh + rows[i] * D);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Decode (one query per head): memory-bound, so each key row is read once with a dot product
// (no tile padding), and long key ranges are split into chunks that threads share, merged
// afterwards through their softmax statistics (split-KV, as in flash-decoding).

// Keys per decode task: K and V rows of a chunk (256 KiB in fp32 at head_dim 64) stay in L2 while
// the query heads of a KV group take turns on them.
constexpr int64_t kDecodeChunk = 2048;

typedef float vfloat8 __attribute__((vector_size(32)));
typedef float vfloat4 __attribute__((vector_size(16)));

// Horizontal sum as a tree of vector adds (a lane-by-lane loop is one long dependency chain).
inline float hsum(vfloat x) {
#if defined(__AVX512F__)
  const vfloat8 h = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  const vfloat8 h = x;
#endif
  const vfloat4 f = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (f[0] + f[2]) + (f[1] + f[3]);
}

// kLanes consecutive elements of a row as fp32: bf16 and fp16 widened in registers (the decode
// step reads each key once, so a widened copy in memory would cost a store and a load per element).
template <typename T>
inline vfloat vload_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return vload(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // the bits, 16 places up (GCC's own widening took 3x the instructions)
#if defined(__AVX512F__)
    return (vfloat)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(__AVX2__)
    return (vfloat)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
    typedef uint16_t vbits __attribute__((vector_size(2 * kLanes), aligned(2)));
    return (vfloat)(__builtin_convertvector(*reinterpret_cast<const vbits*>(p), vint) << 16);
#endif
  } else {
#if defined(__AVX512F__)
    return (vfloat)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
    return (vfloat)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    vfloat v;
    for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
    return v;
#endif
  }
}

// Keys per block of a decode chunk: their K and V rows (16 KiB in fp32 at head_dim 64) stay in L1
// while every query head of the group reads them (an L2 re-read per head cost 40% at 3 heads).
constexpr int64_t kDecodeBlock = 32;

// Vector i of a row as fp32. kPairs (bf16 rows of whole 2 * kLanes element groups): vector 2c holds
// the even elements of group c, vector 2c + 1 the odd ones, each one shift or mask of the group's
// 32-bit words (a widening shuffle per vector made bf16 decode compute-bound); queries and outputs
// are permuted to match (pair_index).
template <typename T, bool kPairs>
inline vfloat row_vector(const T* row, int i) {
  if constexpr (kPairs) {
    const vint words = vloadi(reinterpret_cast<const int32_t*>(row) + (i / 2) * kLanes);
    return i % 2 == 0 ? (vfloat)(words << 16) : (vfloat)(words & (vint{} - 65536));  // high half: 0xFFFF0000
  } else {
    return vload_as_float(row + i * kLanes);
  }
}

// Where lane l of vector i of row_vector<T, kPairs> sits in the row.
template <bool kPairs>
inline int64_t pair_index(int i, int l) {
  return kPairs ? (i / 2) * 2 * kLanes + 2 * l + i % 2 : i * kLanes + l;
}

// Softmax statistics (max m, sum l, unnormalised output acc[D]) of `heads` queries of one KV head,
// pre-scaled to log2 units in q [heads x D], over the same keys [j0, j0 + n): per head h, m[h],
// l[h] and acc[h * D ..]. s holds the scores, [heads x ld_s]. NV = D / kLanes keeps a query and its
// accumulators in registers; NV = 0 handles any D. With fewer than 8 vectors per row, two
// accumulator sets break the FMA dependency between keys (8 or more suffice, and two would spill).
template <int NV, typename T, bool kPairs = false>
void decode_heads(int64_t heads, const float* q, const T* kh, int64_t k_st, const T* vh, int64_t v_st, int64_t j0,
                  int64_t n, int64_t D, float* s, int64_t ld_s, float* m_out, float* l_out, float* acc_out) {
  constexpr int kCap = NV > 0 ? NV : 64;
  constexpr int kSets = NV > 0 && NV < 8 ? 2 : 1;
  const int nv = NV > 0 ? NV : static_cast<int>(D / kLanes);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t b0 = 0; b0 < n; b0 += kDecodeBlock) {
    const int64_t b1 = std::min(n, b0 + kDecodeBlock);
    for (int64_t j = b1; j < std::min(n, b1 + kDecodeBlock); ++j)  // the next block's keys, while this one computes
      for (int64_t byte = 0; byte < row_bytes; byte += 64) __builtin_prefetch(reinterpret_cast<const char*>(kh + (j0 + j) * k_st) + byte);
    for (int64_t h = 0; h < heads; ++h) {
      vfloat qv[kCap];
      for (int i = 0; i < nv; ++i)
        for (int l = 0; l < kLanes; ++l) qv[i][l] = q[h * D + pair_index<kPairs>(i, l)];
      float* sh = s + h * ld_s;
      int64_t j = b0;
      // four keys at a time: a dot product is a chain of nv dependent FMAs, and four independent
      // chains keep the FMA units busy (one chain at a time ran at a third of their rate)
      for (; j + 4 <= b1; j += 4) {
        const T* kr = kh + (j0 + j) * k_st;
        vfloat dot[4];
        for (int g = 0; g < 4; ++g) dot[g] = row_vector<T, kPairs>(kr + g * k_st, 0) * qv[0];
        for (int i = 1; i < nv; ++i)
          for (int g = 0; g < 4; ++g) dot[g] += row_vector<T, kPairs>(kr + g * k_st, i) * qv[i];
        for (int g = 0; g < 4; ++g) sh[j + g] = hsum(dot[g]);
      }
      for (; j < b1; ++j) {
        const T* kr = kh + (j0 + j) * k_st;
        vfloat dot = row_vector<T, kPairs>(kr, 0) * qv[0];
        for (int i = 1; i < nv; ++i) dot += row_vector<T, kPairs>(kr, i) * qv[i];
        sh[j] = hsum(dot);
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* sh = s + h * ld_s;
    std::fill(sh + n, sh + round_up(n, kLanes), kNegInf);
    vfloat mx = vsplat(kNegInf);
    for (int64_t j = 0; j < n; j += kLanes) mx = vmax(mx, vload(sh + j));
    float m = kNegInf;
    for (int i = 0; i < kLanes; ++i) m = std::max(m, mx[i]);
    vfloat sum{};
    for (int64_t j = 0; j < n; j += kLanes) {
      const vfloat p = vexp2(vload(sh + j) - m);
      vstore(sh + j, p);
      sum += p;
    }
    m_out[h] = m;
    l_out[h] = hsum(sum);
  }
  std::fill(acc_out, acc_out + heads * D, 0.0f);
  for (int64_t b0 = 0; b0 < n; b0 += kDecodeBlock) {
    const int64_t b1 = std::min(n, b0 + kDecodeBlock);
    for (int64_t j = b1; j < std::min(n, b1 + kDecodeBlock); ++j)
      for (int64_t byte = 0; byte < row_bytes; byte += 64) __builtin_prefetch(reinterpret_cast<const char*>(vh + (j0 + j) * v_st) + byte);
    for (int64_t h = 0; h < heads; ++h) {
      const float* ph = s + h * ld_s;
      float* out = acc_out + h * D;
      vfloat acc[kSets][kCap];
      for (int i = 0; i < nv; ++i) {
        acc[0][i] = vload(out + i * kLanes);
        for (int set = 1; set < kSets; ++set) acc[set][i] = vfloat{};
      }
      int64_t j = b0;
      for (; j + kSets <= b1; j += kSets)
        for (int set = 0; set < kSets; ++set) {
          const T* vr = vh + (j0 + j + set) * v_st;
          const vfloat p = vsplat(ph[j + set]);
          for (int i = 0; i < nv; ++i) acc[set][i] += p * row_vector<T, kPairs>(vr, i);
        }
      for (; j < b1; ++j) {
        const T* vr = vh + (j0 + j) * v_st;
        for (int i = 0; i < nv; ++i) acc[0][i] += vsplat(ph[j]) * row_vector<T, kPairs>(vr, i);
      }
      for (int i = 0; i < nv; ++i) {
        vfloat total = acc[0][i];
        for (int set = 1; set < kSets; ++set) total += acc[set][i];
        vstore(out + i * kLanes, total);
      }
    }
  }
  if constexpr (kPairs) {  // vector order back to element order
    std::vector<float> row(D);
    for (int64_t h = 0; h < heads; ++h) {
      float* out = acc_out + h * D;
      for (int i = 0; i < nv; ++i)
        for (int l = 0; l < kLanes; ++l) row[pair_index<kPairs>(i, l)] = out[i * kLanes + l];
      std::copy(row.begin(), row.end(), out);
    }
  }
}

template <typename T>
void decode_heads_dispatch(int64_t heads, const float* q, const T* kh, int64_t k_st, const T* vh, int64_t v_st,
                           int64_t j0, int64_t n, int64_t D, float* s, int64_t ld_s, float* m, float* l, float* acc) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    switch (D % (2 * kLanes) ? 0 : D / kLanes) {
      case 2: return decode_heads<2, T, true>(heads, q, kh, k_st, vh, v_st, j0, n, D, s, ld_s, m, l, acc);
      case 4: return decode_heads<4, T, true>(heads, q, kh, k_st, vh, v_st, j0, n, D, s, ld_s, m, l, acc);
      case 8: return decode_heads<8, T, true>(heads, q, kh, k_st, vh, v_st, j0, n, D, s, ld_s, m, l, acc);
      default: break;  // other head_dims: widened vector by vector below
    }
  }
  switch (D / kLanes) {
    case 1: return decode_heads<1>(heads, q, kh, k_st, vh, v_st, j0, n, D, s, ld_s, m, l, acc);
    case 2: return decode_heads<2>(heads, q, kh, k_st, vh, v_st, j0, n, D, s, ld_s, m, l, acc);
    case 4: return decode_heads<4>(heads, q, kh, k_st, vh, v_st, j0, n, D, s, ld_s, m, l, acc);
    case 8: return decode_heads<8>(heads, q, kh, k_st, vh, v_st, j0, n, D, s, ld_s, m, l, acc);
    default: return decode_heads<0>(heads, q, kh, k_st, vh, v_st, j0, n, D, s, ld_s, m, l, acc);
  }
}

// Returns whether every output value is finite. Work is cut per (batch, KV head) into chunks of
// the union of its query heads' key ranges; a task takes one chunk and runs every query head of
// the group that reads part of it, one after the other, so a chunk's keys come from memory once
// (later heads find them in L2) however many query heads of the group are global (GQA).
// The keys and values one decode query row of sequence b reads: K/V of KV head h at
// k + h * pb.k_sh (rows pb.k_st apart), positions [start, length), its query at position length - 1.
template <typename T>
struct DecodeSequence {
  const T* k;
  const T* v;
  int64_t start, length;
};

template <typename T>
bool decode_impl(const Problem& pb, const T* q, const std::vector<DecodeSequence<T>>& sequences, const bool* route,
                 T* out, float* lse) {
  const int64_t D = pb.dim;
  const int64_t group = pb.group();
  const int64_t rows = pb.batch * pb.q_heads;
  struct Part {
    int64_t row, j0, j1;  // query row (b * q_heads + h) and its keys [j0, j1) in the task's chunk
  };
  struct Task {
    int64_t b, kv_head, first, last;  // parts [first, last)
  };
  std::vector<Part> parts;
  std::vector<Task> tasks;
  std::vector<double> costs;
  for (int64_t b = 0; b < pb.batch; ++b) {
    const int64_t start = sequences[b].start, pos = sequences[b].length - 1;
    const int64_t local_lo = std::max<int64_t>(start, pos - pb.window + 1);
    const int64_t sink_end = std::min(start + pb.sink, local_lo);  // the sink keys the window misses
    for (int64_t kv_head = 0; kv_head < pb.kv_heads; ++kv_head) {
      const int64_t first_row = b * pb.q_heads + kv_head * group;
      bool any_global = false;
      for (int64_t h = 0; h < group; ++h) any_global |= route[first_row + h];
      auto add_tasks = [&](int64_t begin, int64_t end) {  // keys [begin, end) read by some head of the group
        for (int64_t j0 = begin; j0 < end; j0 += kDecodeChunk) {
          const int64_t j1 = std::min(end, j0 + kDecodeChunk);
          Task task{b, kv_head, static_cast<int64_t>(parts.size()), 0};
          for (int64_t h = 0; h < group; ++h) {
            const int64_t row = first_row + h;
            // a global row reads [start, pos]; a local one its sink keys [start, sink_end) and window [local_lo, pos]
            const int64_t ranges[2][2] = {{start, route[row] ? pos + 1 : sink_end}, {route[row] ? pos + 1 : local_lo, pos + 1}};
            for (const auto& range : ranges) {
              const int64_t lo = std::max(j0, range[0]), hi = std::min(j1, range[1]);
              if (lo < hi) parts.push_back({row, lo, hi});
            }
          }
          task.last = static_cast<int64_t>(parts.size());
          // heads that read the same keys of the chunk run together (decode_heads)
          std::sort(parts.begin() + task.first, parts.end(),
                    [](const Part& a, const Part& b) { return std::tie(a.j0, a.j1, a.row) < std::tie(b.j0, b.j1, b.row); });
          costs.push_back(double(j1 - j0) + 16.0 * double(task.last - task.first) + 64.0);
          tasks.push_back(task);
        }
      };
      if (any_global) {
        add_tasks(start, pos + 1);
      } else {
        add_tasks(start, sink_end);
        add_tasks(local_lo, pos + 1);
      }
    }
  }
  std::fill(out, out + rows * D, from_float<T>(0.0f));  // rows that attend nothing (padded queries)
  std::fill(lse, lse + rows, kNegInf);
  std::vector<float> part_m(parts.size()), part_l(parts.size()), part_o(parts.size() * D);
  constexpr int64_t ld_s = kDecodeChunk + kLanes;
  struct Scratch {
    AlignedBuffer<> queries, scores;
    Scratch(int64_t D, int64_t group) : queries(group * D), scores(group * ld_s) {}
  };
  std::vector<std::unique_ptr<Scratch>> scratch(at::get_num_threads() + 1);
  run_tasks(largest_first(costs), costs, [&](int64_t index, int64_t slot) {
    if (index < 0) {
      if (!scratch[slot]) scratch[slot] = std::make_unique<Scratch>(D, group);  // a run has one part per head at most
      return;
    }
    Scratch& sc = *scratch[slot];
    const Task& task = tasks[index];
    const T* kh = sequences[task.b].k + task.kv_head * pb.k_sh;
    const T* vh = sequences[task.b].v + task.kv_head * pb.v_sh;
    for (int64_t first = task.first, last; first < task.last; first = last) {
      for (last = first + 1; last < task.last && parts[last].j0 == parts[first].j0 && parts[last].j1 == parts[first].j1;) ++last;
      for (int64_t i = first; i < last; ++i) {
        float* qr = sc.queries.get() + (i - first) * D;
        widen_row(q + task.b * pb.q_sb + (parts[i].row % pb.q_heads) * pb.q_sh, qr, D);
        for (int64_t d = 0; d < D; ++d) qr[d] *= pb.scale * kLog2e;
      }
      const Part& part = parts[first];
      decode_heads_dispatch(last - first, sc.queries.get(), kh, pb.k_st, vh, pb.v_st, part.j0, part.j1 - part.j0, D,
                            sc.scores.get(), ld_s, part_m.data() + first, part_l.data() + first, part_o.data() + first * D);
    }
  });
  // merge the parts of each row
  std::vector<std::vector<int64_t>> of_row(rows);
  for (size_t i = 0; i < parts.size(); ++i) of_row[parts[i].row].push_back(static_cast<int64_t>(i));
  std::vector<float> merged(D);
  bool finite = true;
  for (int64_t row = 0; row < rows; ++row) {
    if (of_row[row].empty()) continue;
    float m = kNegInf;
    for (int64_t i : of_row[row]) m = std::max(m, part_m[i]);
    float l = 0.0f;
    std::fill(merged.begin(), merged.end(), 0.0f);
    for (int64_t i : of_row[row]) {
      const float w = std::exp2(part_m[i] - m);
      l += w * part_l[i];
      for (int64_t d = 0; d < D; ++d) merged[d] += w * part_o[i * D + d];
    }
    for (int64_t d = 0; d < D; ++d) {
      out[row * D + d] = from_float<T>(merged[d] / l);
      finite &= std::isfinite(merged[d] / l);
    }
    lse[row] = (m + std::log2(l)) * kLn2;
  }
  return finite;
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
  TORCH_CHECK(window >= 1 && sink >= 0, "aha: window must be >= 1 and sink >= 0");
  TORCH_CHECK(std::isfinite(scale), "aha: scale must be finite");
  // past the last key a window or sink means every key: clamped, positions stay 32-bit
  pb.window = std::min(window, pb.seq_kv);
  pb.sink = std::min(sink, pb.seq_kv);
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

// Microkernels: the GEMMs a forward or backward runs on (the `microkernel` argument of the ops).
enum MicrokernelChoice : int64_t { kDefaultKernel = 0, kVectorKernel = 1, kBrgemmKernel = 2 };

// Whether oneDNN's bf16 micro-GEMMs (VNNI operands) run here. oneDNN decides at run time from the
// CPU and the ISA it may use (ONEDNN_MAX_CPU_ISA), and PyTorch raises where they cannot ("could not
// generate a kernel" on AVX-512 without AVX512-BF16), so this runs one, once per process, and
// checks its result: CPU flags alone are not enough.
bool brgemm_bf16_native() {
  static const bool works = [] {
    constexpr int64_t M = 16, N = 16, K = 32;
    const std::vector<c10::BFloat16> a(M * K, c10::BFloat16(1.0f)), b(K * N, c10::BFloat16(0.5f));
    std::vector<float> c(M * N, 0.0f);
    try {
      at::native::cpublas::brgemm(M, N, K, K, N, N, false, a.data(), b.data(), c.data(), true);
      at::native::cpublas::brgemm_release(true);
    } catch (const std::exception&) {
      return false;
    }
    return std::all_of(c.begin(), c.end(), [](float x) { return x == 0.5f * K; });
  }();
  return works;
}

// fp32, and fp16 and bf16 computed in fp32 where oneDNN has no bf16 micro-GEMMs.
bool brgemm_supports(at::ScalarType dtype) {
  return at::globalContext().userEnabledMkldnn() &&
         (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16);
}

bool has_amx_bf16() { return at::native::cpublas::could_pack(at::kBFloat16); }

// kDefaultKernel: oneDNN on CPUs with AMX (measured 1.2-3x faster there in fp32, bf16 and fp16),
// the hand-written kernels elsewhere (faster on AMD Zen 4).
int64_t resolve_microkernel(at::ScalarType dtype, int64_t choice) {
  TORCH_CHECK(choice >= kDefaultKernel && choice <= kBrgemmKernel, "aha: microkernel must be 0 (default), 1 (vector) or 2 (brgemm)");
  if (choice == kDefaultKernel) return has_amx_bf16() && brgemm_supports(dtype) ? kBrgemmKernel : kVectorKernel;
  TORCH_CHECK(choice != kBrgemmKernel || brgemm_supports(dtype), "aha: the oneDNN microkernel does not support ", dtype,
              " in this build on this CPU; use microkernel 1 (vector)");
  return choice;
}

constexpr const char* kVectorIsa =
#if defined(__AVX512F__)
    "avx512";
#elif defined(__AVX2__)
    "avx2";
#else
    "generic";
#endif

// What a (dtype, microkernel choice) runs on this CPU, e.g. "onednn-amx-bf16" or "avx512-fp32".
std::string microkernel_name(at::ScalarType dtype, int64_t choice) {
  const int64_t resolved = resolve_microkernel(dtype, choice);
  const std::string type = dtype == at::kFloat ? "fp32" : dtype == at::kBFloat16 ? "bf16" : dtype == at::kHalf ? "fp16" : "?";
  if (resolved == kBrgemmKernel) {
    if (dtype == at::kHalf || (dtype == at::kBFloat16 && !brgemm_bf16_native()))
      return "onednn-fp32 (" + type + " widened)";
    return std::string("onednn-") + (dtype == at::kBFloat16 && has_amx_bf16() ? "amx-" : "") + type;
  }
  if (dtype == at::kFloat || (dtype == at::kBFloat16 && kHasBf16Dot)) return std::string(kVectorIsa) + "-" + type;
  return std::string(kVectorIsa) + "-fp32 (" + type + " widened)";
}

template <typename T>
bool run_forward(const Problem& pb, int64_t microkernel, const T* q, const T* k, const T* v, const Tiling& tl, T* out,
                 float* lse) {
  if (microkernel == kBrgemmKernel) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (!brgemm_bf16_native()) {
        const BrgemmKernel<T, float> kernel(pb, k, v);
        return forward_impl(pb, kernel, q, k, v, tl, out, lse);
      }
    }
    const BrgemmKernel<T> kernel(pb, k, v);
    return forward_impl(pb, kernel, q, k, v, tl, out, lse);
  }
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (pb.k_st % 2 == 0) return forward_impl(pb, Bf16PairKernel{pb}, q, k, v, tl, out, lse);
  }
#endif
  return forward_impl(pb, VectorKernel<T>{pb}, q, k, v, tl, out, lse);
}

// -> (out, lse, finite): finite is a bool scalar, False when an output value is NaN or inf.
std::tuple<at::Tensor, at::Tensor, at::Tensor> aha_forward(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& route,
                                                           const at::Tensor& key_start, int64_t window, int64_t sink,
                                                           double scale, int64_t local_rows, int64_t global_rows,
                                                           int64_t microkernel) {
  const Problem pb = describe(q, k, v, route, key_start, window, sink, scale);
  const int64_t resolved = resolve_microkernel(q.scalar_type(), microkernel);
  at::Tensor out = at::empty({pb.batch, pb.q_heads, pb.seq_q, pb.dim}, q.options());
  at::Tensor lse = at::empty({pb.batch, pb.q_heads, pb.seq_q}, q.options().dtype(at::kFloat));
  bool finite = true;
  if (pb.seq_q == 1) {
    const at::Tensor ks = key_start.contiguous();
    AHA_DISPATCH(q.scalar_type(), {
      std::vector<DecodeSequence<scalar_t>> sequences(pb.batch);
      for (int64_t b = 0; b < pb.batch; ++b)
        sequences[b] = {k.const_data_ptr<scalar_t>() + b * pb.k_sb, v.const_data_ptr<scalar_t>() + b * pb.v_sb,
                        ks.const_data_ptr<int32_t>()[b], pb.seq_kv};
      finite = decode_impl<scalar_t>(pb, q.const_data_ptr<scalar_t>(), sequences, route.const_data_ptr<bool>(),
                                     out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>());
    });
  } else {
    const Tiling tl = tiles_for(pb, route, key_start, local_rows, global_rows);
    AHA_DISPATCH(q.scalar_type(),
                 finite = run_forward<scalar_t>(pb, resolved, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                                v.const_data_ptr<scalar_t>(), tl, out.mutable_data_ptr<scalar_t>(),
                                                lse.mutable_data_ptr<float>()));
  }
  return {out, lse, at::full({}, finite, q.options().dtype(at::kBool))};
}

// One decode step of R sequences whose keys and values sit in a paged cache, one block per sequence:
// kv_cache [blocks, kv_heads, block_size, 2 * dim] (keys then values along the last dim, which must
// be contiguous), blocks / lengths [R] int64 (each sequence's block and its number of keys; its
// query is at the last), q [R, q_heads, dim], route [R, q_heads] bool (True = global)
// -> (out [R, q_heads, dim], finite: a bool scalar, False when an output value is NaN or inf).
// The decode path of aha::forward for every sequence at once: no gather, one parallel region.
std::tuple<at::Tensor, at::Tensor> aha_decode_paged(const at::Tensor& q, const at::Tensor& kv_cache,
                                                    const at::Tensor& blocks, const at::Tensor& lengths,
                                                    const at::Tensor& route, int64_t window, int64_t sink,
                                                    double scale) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 4, "aha: q must be [requests, q_heads, dim], kv_cache [blocks, kv_heads, block_size, 2 * dim]");
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "aha: the C++ kernel runs on CPU tensors only");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type(), "aha: q and kv_cache dtypes differ");
  const int64_t requests = q.size(0), q_heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = kv_cache.size(1), block_size = kv_cache.size(2);
  TORCH_CHECK(kv_cache.size(3) == 2 * dim, "aha: kv_cache's last dim must be 2 * head_dim (keys, then values)");
  TORCH_CHECK(dim % 16 == 0, "aha: decode_paged takes a head_dim that is a multiple of 16, got ", dim);
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, "aha: q_heads must be a multiple of kv_heads");
  TORCH_CHECK(q.stride(2) == 1 && kv_cache.stride(3) == 1, "aha: the last dim must be contiguous");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong && blocks.numel() == requests &&
                  lengths.numel() == requests, "aha: blocks and lengths must be int64 [requests]");
  TORCH_CHECK(route.scalar_type() == at::kBool && route.numel() == requests * q_heads, "aha: route must be bool [requests, q_heads]");
  TORCH_CHECK(window >= 1 && sink >= 0, "aha: window must be >= 1 and sink >= 0");
  const at::Tensor block_of = blocks.contiguous(), length_of = lengths.contiguous(), route_c = route.contiguous();
  Problem pb{};
  pb.batch = requests;
  pb.q_heads = q_heads;
  pb.kv_heads = kv_heads;
  pb.seq_q = 1;
  pb.seq_kv = block_size;
  pb.dim = dim;
  pb.window = window;
  pb.sink = sink;
  pb.scale = static_cast<float>(scale);
  pb.q_sb = q.stride(0);
  pb.q_sh = q.stride(1);
  pb.k_sh = pb.v_sh = kv_cache.stride(1);
  pb.k_st = pb.v_st = kv_cache.stride(2);
  at::Tensor out = at::empty({requests, q_heads, dim}, q.options());
  at::Tensor lse = at::empty({requests, q_heads}, q.options().dtype(at::kFloat));
  bool finite = true;
  AHA_DISPATCH(q.scalar_type(), {
    std::vector<DecodeSequence<scalar_t>> sequences(requests);
    for (int64_t r = 0; r < requests; ++r) {
      const int64_t block = block_of.const_data_ptr<int64_t>()[r], length = length_of.const_data_ptr<int64_t>()[r];
      TORCH_CHECK(block >= 0 && block < kv_cache.size(0), "aha: block ", block, " is outside the cache");
      TORCH_CHECK(length >= 1 && length <= block_size, "aha: a sequence holds 1 to block_size keys, got ", length);
      const scalar_t* base = kv_cache.const_data_ptr<scalar_t>() + block * kv_cache.stride(0);
      sequences[r] = {base, base + dim, 0, length};
    }
    finite = decode_impl<scalar_t>(pb, q.const_data_ptr<scalar_t>(), sequences, route_c.const_data_ptr<bool>(),
                                   out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>());
  });
  return {out, at::full({}, finite, q.options().dtype(at::kBool))};
}

template <typename T>
void run_backward(const Problem& pb, int64_t microkernel, const T* q, const T* k, const T* v, const T* out,
                  const T* dout, const float* lse, const Tiling& tl, int64_t parts, int64_t acc_rows, T* dq,
                  float* dk_parts, float* dv_parts) {
  if (microkernel == kBrgemmKernel) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (!brgemm_bf16_native()) {
        const BrgemmBackward<T, float> kernel(pb, k, v);
        return backward_impl(pb, kernel, q, k, v, out, dout, lse, tl, parts, acc_rows, dq, dk_parts, dv_parts);
      }
    }
    const BrgemmBackward<T> kernel(pb, k, v);
    return backward_impl(pb, kernel, q, k, v, out, dout, lse, tl, parts, acc_rows, dq, dk_parts, dv_parts);
  }
  backward_impl(pb, VectorBackward<T>{pb}, q, k, v, out, dout, lse, tl, parts, acc_rows, dq, dk_parts, dv_parts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aha_backward(const at::Tensor& dout, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& out, const at::Tensor& lse,
                                                            const at::Tensor& route, const at::Tensor& key_start,
                                                            int64_t window, int64_t sink, double scale,
                                                            int64_t local_rows, int64_t global_rows,
                                                            int64_t microkernel) {
  const Problem pb = describe(q, k, v, route, key_start, window, sink, scale);
  const int64_t resolved = resolve_microkernel(q.scalar_type(), microkernel);
  const Tiling tl = tiles_for(pb, route, key_start, local_rows, global_rows);
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous() && lse.scalar_type() == at::kFloat, "aha: bad saved tensors");
  const at::Tensor dout_c = dout.contiguous().to(q.scalar_type());
  const int64_t heads = pb.batch * pb.kv_heads;
  const int64_t threads = at::get_num_threads();
  const int64_t parts = heads >= 2 * threads ? 1 : (2 * threads + heads - 1) / heads;
  const int64_t acc_rows = round_up(pb.seq_kv, kCoverAlign);  // covers of the oneDNN blocks end on a multiple of 16
  at::Tensor dq = at::empty({pb.batch, pb.q_heads, pb.seq_q, pb.dim}, q.options());
  at::Tensor dk_parts = at::zeros({pb.batch, pb.kv_heads, parts, acc_rows, pb.dim}, q.options().dtype(at::kFloat));
  at::Tensor dv_parts = at::zeros({pb.batch, pb.kv_heads, parts, acc_rows, pb.dim}, q.options().dtype(at::kFloat));
  AHA_DISPATCH(q.scalar_type(),
               run_backward<scalar_t>(pb, resolved, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                      v.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                                      dout_c.const_data_ptr<scalar_t>(), lse.const_data_ptr<float>(), tl, parts,
                                      acc_rows, dq.mutable_data_ptr<scalar_t>(), dk_parts.mutable_data_ptr<float>(),
                                      dv_parts.mutable_data_ptr<float>()));
  auto finish = [&](const at::Tensor& grads) {
    return (parts == 1 ? grads.squeeze(2) : grads.sum(2)).narrow(2, 0, pb.seq_kv).to(q.scalar_type()).contiguous();
  };
  return {dq, finish(dk_parts), finish(dv_parts)};
}

}  // namespace

// The ops' namespace: `aha`, or another one for a second build loaded into the same process
// (the tests load a portable AVX2 build as `aha_avx2`).
#ifndef AHA_OPS_NAMESPACE
#define AHA_OPS_NAMESPACE aha
#endif
#define AHA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define AHA_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

AHA_LIBRARY(AHA_OPS_NAMESPACE, m) {
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, Tensor route, Tensor key_start, int window, int sink, float scale, "
      "int local_rows, int global_rows, int microkernel) -> (Tensor, Tensor, Tensor)");
  m.def("microkernel(ScalarType dtype, int choice) -> str", &microkernel_name);
  m.def("decode_paged(Tensor q, Tensor kv_cache, Tensor blocks, Tensor lengths, Tensor route, int window, int sink, "
        "float scale) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor route, Tensor key_start, "
      "int window, int sink, float scale, int local_rows, int global_rows, int microkernel) -> (Tensor, Tensor, Tensor)");
}

AHA_LIBRARY_IMPL(AHA_OPS_NAMESPACE, CPU, m) {
  m.impl("forward", &aha_forward);
  m.impl("backward", &aha_backward);
  m.impl("decode_paged", &aha_decode_paged);
}

