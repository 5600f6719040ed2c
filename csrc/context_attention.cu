// Cached-context cross attention (SPEC 2.4): flash-style CUDA kernels, forward and backward.
//
// Design
// ------
// Forward: one block per (64 queries, query head, batch row). The Q tile stays in shared memory;
// K/V tiles of the row's valid keys (clamp(ctx_lens[b], 0, Nc)) stream through shared memory. Per
// key tile: S = Q K^T (tensor cores), an online softmax on S in float32 (running max and sum in
// registers, exp2 with the scale folded into log2 space), then O = alpha * O + P V with O in
// float32 registers (tensor-core accumulator fragments). Key tiles past the row's length are never
// visited, and rows of a tile at or beyond the length are zero-filled instead of loaded, so padded
// slots (even NaN) never reach the result and nothing is read out of bounds.
//
// Backward (three launches, deterministic, no atomics): delta = rowsum(dO * O) - dLSE; dQ with one
// block per query tile looping over key tiles; dK/dV with one block per (key tile, kv head) looping
// over the Hq/Hkv query heads of its GQA group and all query tiles, so each dK/dV element is summed
// by exactly one block in float32 registers and written once.
//
// head_dim is padded to DP in {64, 128, 256} (zero-filled columns, masked stores), so every multiple
// of 8 up to 256 works; 64 and 128 waste nothing.
//
// Matrix products go through WarpTile<T>: 16x16 warp tiles read from shared memory, nvcuda::wmma
// (m16n16k16, float32 accumulate) for half/bfloat16, plain FMA for float32 (tf32 would miss the
// float32 tolerance; float32 is the correctness path, not the fast one). WMMA hides which row an
// accumulator element holds, so each warp loads a 16x16 table of row indices into an accumulator
// fragment once: the same element of that fragment names the row of the element in any other.
//
// Expected performance (H100, bf16, D=128; to be measured, see benchmarks/README.md): the forward
// does 4 * Nq * len * D flops per head on tensor cores with K/V read once per 64-query tile. At
// Nq=4096, Nc=1024 the work is ~2 GFLOP per (batch, head): compute bound, so the gap to SDPA over the
// valid keys is the mma.sync-via-WMMA issue rate and the shared-memory round trips (S and P go
// through shared memory; loads are synchronous, not cp.async double-buffered). Expect roughly
// 0.4-0.7x of SDPA's (FlashAttention-2 backend) throughput from this design; reaching the 1.1x target
// needs register-resident S/P (mma.sync with a known fragment layout), cp.async/TMA pipelining and,
// on Hopper, wgmma. Padding costs nothing: work scales with the valid keys, not Nc.
//
// Registers: every warp holds at most 8 accumulator fragments (64 floats) besides one A and one B
// fragment; `nvcc -arch=sm_90 -Xptxas -v` shows no spills (CI checks).
#include "context_attention.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstring>
#include <type_traits>

namespace latte {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

// ------------------------------------------------------------------------------------------------
// Scalar conversions

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ------------------------------------------------------------------------------------------------
// Warp-level 16x16 tiles on shared memory: C(16x16, float32) += A(16xK) * B(Kx16).
// A_COL: A(m, k) = A[k * lda + m] (else A[m * lda + k]); B_COL: B(k, n) = B[n * ldb + k] (else B[k * ldb + n]).

template <typename T>
struct WarpTileWmma {
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  using Rows = Acc;  // element i holds the row index of element i of any Acc
  static constexpr int kElems = Acc::num_elements;

  __device__ static void zero(Acc& c) { nvcuda::wmma::fill_fragment(c, 0.f); }
  __device__ static void load_rows(Rows& r, const float* row_table) {
    nvcuda::wmma::load_matrix_sync(r, row_table, 16, nvcuda::wmma::mem_row_major);
  }
  __device__ static int row(const Rows& r, int i) { return static_cast<int>(r.x[i]); }

  template <bool A_COL, bool B_COL>
  __device__ static void mma(Acc& c, const T* A, int lda, const T* B, int ldb, int K) {
    using LA = typename std::conditional<A_COL, nvcuda::wmma::col_major, nvcuda::wmma::row_major>::type;
    using LB = typename std::conditional<B_COL, nvcuda::wmma::col_major, nvcuda::wmma::row_major>::type;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, LA> a;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, LB> b;
#pragma unroll 1  // unrolling hoists every fragment load and costs registers, not speed
    for (int k0 = 0; k0 < K; k0 += 16) {
      nvcuda::wmma::load_matrix_sync(a, A_COL ? A + k0 * lda : A + k0, lda);
      nvcuda::wmma::load_matrix_sync(b, B_COL ? B + k0 : B + k0 * ldb, ldb);
      nvcuda::wmma::mma_sync(c, a, b, c);
    }
  }
  __device__ static void store(float* dst, int ld, const Acc& c) {
    nvcuda::wmma::store_matrix_sync(dst, c, ld, nvcuda::wmma::mem_row_major);
  }
};

// float32: lane l owns row l / 2, columns (l % 2) * 8 .. + 8 of the 16x16 tile.
struct WarpTileFma {
  struct Acc {
    float x[8];
  };
  struct Rows {};
  static constexpr int kElems = 8;

  __device__ static void zero(Acc& c) {
#pragma unroll
    for (int i = 0; i < 8; ++i) c.x[i] = 0.f;
  }
  __device__ static void load_rows(Rows&, const float*) {}
  __device__ static int row(const Rows&, int) { return (threadIdx.x & 31) >> 1; }

  template <bool A_COL, bool B_COL>
  __device__ static void mma(Acc& c, const float* A, int lda, const float* B, int ldb, int K) {
    const int lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 8;
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      const float a = A_COL ? A[k * lda + r] : A[r * lda + k];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float b = B_COL ? B[(c0 + j) * ldb + k] : B[k * ldb + c0 + j];
        c.x[j] = fmaf(a, b, c.x[j]);
      }
    }
  }
  __device__ static void store(float* dst, int ld, const Acc& c) {
    const int lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) dst[r * ld + c0 + j] = c.x[j];
  }
};

template <typename T> struct WarpTileFor { using type = WarpTileWmma<T>; };
template <> struct WarpTileFor<float> { using type = WarpTileFma; };

// ------------------------------------------------------------------------------------------------
// Global <-> shared helpers

__device__ __forceinline__ int clamped_len(const void* lens, bool is64, int b, int nc) {
  if (lens == nullptr) return nc;
  const long long n = is64 ? static_cast<const long long*>(lens)[b] : static_cast<const int*>(lens)[b];
  return n < 0 ? 0 : (n > nc ? nc : static_cast<int>(n));
}

// ROWS x DP tile into shared memory (row pitch LD): row r < rows, column c < D from src[r * stride + c];
// everything else zero. 16-byte chunks; D % 8 == 0 keeps every chunk wholly inside or outside D.
template <typename T, int ROWS, int DP, int LD, int NT>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride, int rows, int D, bool vec) {
  constexpr int V = 16 / sizeof(T);
  constexpr int CPR = DP / V;
  for (int idx = threadIdx.x; idx < ROWS * CPR; idx += NT) {
    const int r = idx / CPR, c = (idx % CPR) * V;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < rows && c < D) {
      const T* s = src + r * stride + c;
      if (vec) {
        val = *reinterpret_cast<const uint4*>(s);
      } else {
        T tmp[V];
#pragma unroll
        for (int j = 0; j < V; ++j) tmp[j] = s[j];
        memcpy(&val, tmp, 16);
      }
    }
    *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
  }
}

// Writes one warp's 16 x 16 accumulator tile, times the per-row factor row_scale[row] (and `mult`),
// to dst rows row0.. (global row index grow0 + r < nrows) and columns col0.. (< D), through a
// 256-float per-warp staging area.
template <typename W, typename T>
__device__ __forceinline__ void write_tile(typename W::Acc& acc, const typename W::Rows& rows, const float* row_scale,
                                           float mult, float* stage, T* dst, int64_t stride, int grow0, int nrows,
                                           int col0, int D) {
#pragma unroll
  for (int i = 0; i < W::kElems; ++i) acc.x[i] *= (row_scale ? row_scale[W::row(rows, i)] : 1.f) * mult;
  W::store(stage, 16, acc);
  __syncwarp();
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < 256; e += 32) {
    const int r = e >> 4, c = col0 + (e & 15);
    if (grow0 + r < nrows && c < D) dst[static_cast<int64_t>(r) * stride + c] = from_float<T>(stage[e]);
  }
  __syncwarp();
}

constexpr int align128(int x) { return (x + 127) / 128 * 128; }
constexpr int kMaxSmemSm80 = 163 * 1024;  // opt-in dynamic shared memory per block on sm_80 (sm_90: 227 KB)

// ------------------------------------------------------------------------------------------------
// Tile configurations. BM: queries per block (or per step), BN: keys per step (or per block),
// WN: warps that split the head dim of one 16-row strip. Sized to fit the sm_80 limit (163 KB).

template <typename T, int DP>
struct Tiles {
  static constexpr bool kF32 = std::is_same<T, float>::value;
  // forward and dQ
  static constexpr int BM = (kF32 && DP == 256) ? 32 : 64;
  static constexpr int BN = (kF32 || DP == 256) ? 32 : 64;
  static constexpr int WN = DP == 256 ? 2 : 1;
  // dK/dV: KN keys per block, KM queries per step
  static constexpr int KN = (kF32 || DP == 256) ? 32 : 64;
  static constexpr int KM = KN;
  static constexpr int KWN = DP / 64;
};

template <typename T, int DP>
struct FwdCfg {
  using Tl = Tiles<T, DP>;
  static constexpr int BM = Tl::BM, BN = Tl::BN, WN = Tl::WN;
  static constexpr int NW = (BM / 16) * WN, NT = 32 * NW;
  static constexpr int PAD = 16 / sizeof(T);
  static constexpr int LD = DP + PAD, LDS = BN + 4, LDP = BN + PAD;
  static constexpr int F = DP / WN / 16;
  static constexpr int TPR = NT / BM;  // softmax threads per row
  static constexpr int OFF_ALPHA = 0;
  static constexpr int OFF_ROWID = align128(OFF_ALPHA + BM * 4);
  static constexpr int OFF_Q = align128(OFF_ROWID + 256 * 4);
  static constexpr int OFF_K = align128(OFF_Q + BM * LD * (int)sizeof(T));
  static constexpr int OFF_V = align128(OFF_K + BN * LD * (int)sizeof(T));
  static constexpr int OFF_S = align128(OFF_V + BN * LD * (int)sizeof(T));
  static constexpr int OFF_P = align128(OFF_S + BM * LDS * 4);
  static constexpr int SMEM = align128(OFF_P + BM * LDP * (int)sizeof(T));
  static_assert(OFF_Q + NW * 256 * 4 <= SMEM, "output staging must fit");
  static_assert(SMEM <= kMaxSmemSm80, "tiles must fit sm_80 shared memory");
  static_assert(NT % BM == 0 && TPR <= 32 && (TPR & (TPR - 1)) == 0, "softmax row split");
  static_assert(BN % TPR == 0, "softmax column split");
};

template <typename T, int DP>
struct BwdQCfg {
  using Tl = Tiles<T, DP>;
  static constexpr int BM = Tl::BM, BN = Tl::BN, WN = Tl::WN;
  static constexpr int NW = (BM / 16) * WN, NT = 32 * NW;
  static constexpr int PAD = 16 / sizeof(T);
  static constexpr int LD = DP + PAD, LDS = BN + 4, LDP = BN + PAD;
  static constexpr int F = DP / WN / 16;
  static constexpr int OFF_LSE = 0;
  static constexpr int OFF_DELTA = align128(OFF_LSE + BM * 4);
  static constexpr int OFF_ROWID = align128(OFF_DELTA + BM * 4);
  static constexpr int OFF_Q = align128(OFF_ROWID + 256 * 4);
  static constexpr int OFF_DO = align128(OFF_Q + BM * LD * (int)sizeof(T));
  static constexpr int OFF_K = align128(OFF_DO + BM * LD * (int)sizeof(T));
  static constexpr int OFF_V = align128(OFF_K + BN * LD * (int)sizeof(T));
  static constexpr int OFF_S = align128(OFF_V + BN * LD * (int)sizeof(T));
  static constexpr int OFF_DP = align128(OFF_S + BM * LDS * 4);
  static constexpr int OFF_DS = align128(OFF_DP + BM * LDS * 4);
  static constexpr int SMEM = align128(OFF_DS + BM * LDP * (int)sizeof(T));
  static_assert(OFF_Q + NW * 256 * 4 <= SMEM, "output staging must fit");
  static_assert(SMEM <= kMaxSmemSm80, "tiles must fit sm_80 shared memory");
};

template <typename T, int DP>
struct BwdKVCfg {
  using Tl = Tiles<T, DP>;
  static constexpr int BN = Tl::KN, BM = Tl::KM, WN = Tl::KWN;  // BN keys per block, BM queries per step
  static constexpr int NW = (BN / 16) * WN, NT = 32 * NW;
  static constexpr int PAD = 16 / sizeof(T);
  static constexpr int LD = DP + PAD, LDS = BN + 4, LDP = BN + PAD;
  static constexpr int F = DP / WN / 16;
  static constexpr int OFF_LSE = 0;
  static constexpr int OFF_DELTA = align128(OFF_LSE + BM * 4);
  static constexpr int OFF_ROWID = align128(OFF_DELTA + BM * 4);
  static constexpr int OFF_K = align128(OFF_ROWID + 256 * 4);
  static constexpr int OFF_V = align128(OFF_K + BN * LD * (int)sizeof(T));
  static constexpr int OFF_Q = align128(OFF_V + BN * LD * (int)sizeof(T));
  static constexpr int OFF_DO = align128(OFF_Q + BM * LD * (int)sizeof(T));
  static constexpr int OFF_S = align128(OFF_DO + BM * LD * (int)sizeof(T));
  static constexpr int OFF_DP = align128(OFF_S + BM * LDS * 4);
  static constexpr int OFF_P = align128(OFF_DP + BM * LDS * 4);
  static constexpr int OFF_DS = align128(OFF_P + BM * LDP * (int)sizeof(T));
  static constexpr int SMEM = align128(OFF_DS + BM * LDP * (int)sizeof(T));
  static_assert(OFF_K + NW * 256 * 4 <= SMEM, "output staging must fit");
  static_assert(SMEM <= kMaxSmemSm80, "tiles must fit sm_80 shared memory");
};

__device__ __forceinline__ void fill_row_table(float* table, int nt) {
  for (int i = threadIdx.x; i < 256; i += nt) table[i] = static_cast<float>(i >> 4);
}

// ------------------------------------------------------------------------------------------------
// Forward

template <typename T, int DP>
__global__ void __launch_bounds__(FwdCfg<T, DP>::NT, 1)
context_attention_fwd_kernel(const ContextAttentionParams p, bool vec) {
  using C = FwdCfg<T, DP>;
  using W = typename WarpTileFor<T>::type;
  constexpr int BM = C::BM, BN = C::BN, WN = C::WN, NW = C::NW, NT = C::NT, LD = C::LD, LDS = C::LDS,
                LDP = C::LDP, F = C::F, TPR = C::TPR;
  extern __shared__ __align__(128) unsigned char smem[];
  float* alpha_s = reinterpret_cast<float*>(smem + C::OFF_ALPHA);
  float* rowid = reinterpret_cast<float*>(smem + C::OFF_ROWID);
  T* Qs = reinterpret_cast<T*>(smem + C::OFF_Q);
  T* Ks = reinterpret_cast<T*>(smem + C::OFF_K);
  T* Vs = reinterpret_cast<T*>(smem + C::OFF_V);
  float* Ss = reinterpret_cast<float*>(smem + C::OFF_S);
  T* Ps = reinterpret_cast<T*>(smem + C::OFF_P);

  const int tid = threadIdx.x, warp = tid >> 5, wm = warp / WN, wn = warp % WN;
  const int q0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.Hq / p.Hkv);
  const int len = clamped_len(p.ctx_lens, p.ctx_lens_int64, b, p.Nc);
  const int rows_q = min(BM, p.Nq - q0);

  const T* qb = static_cast<const T*>(p.q) + b * p.q_stride_b + q0 * p.q_stride_n + h * p.q_stride_h;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;

  fill_row_table(rowid, NT);
  load_tile<T, BM, DP, LD, NT>(Qs, qb, p.q_stride_n, rows_q, p.D, vec);

  // softmax ownership: TPR consecutive threads share a row, each taking every TPR-th column
  const int srow = tid / TPR, ssub = tid % TPR;
  float m_run = -kInf, l_run = 0.f;
  const float sl2 = p.scale * kLog2e;

  typename W::Acc acc[F];
#pragma unroll
  for (int f = 0; f < F; ++f) W::zero(acc[f]);

  const int ntiles = (len + BN - 1) / BN;
  for (int t = 0; t < ntiles; ++t) {
    const int k0 = t * BN;
    __syncthreads();  // the previous tile's readers of Ks, Vs, Ps, alpha_s are done
    load_tile<T, BN, DP, LD, NT>(Ks, kb + k0 * p.k_stride_n, p.k_stride_n, len - k0, p.D, vec);
    load_tile<T, BN, DP, LD, NT>(Vs, vb + k0 * p.v_stride_n, p.v_stride_n, len - k0, p.D, vec);
    __syncthreads();

    // S = Q K^T, 16x16 blocks spread over the warps
    for (int blk = warp; blk < (BM / 16) * (BN / 16); blk += NW) {
      const int bi = blk / (BN / 16), bj = blk % (BN / 16);
      typename W::Acc s;
      W::zero(s);
      W::template mma<false, true>(s, Qs + bi * 16 * LD, LD, Ks + bj * 16 * LD, LD, DP);
      W::store(Ss + bi * 16 * LDS + bj * 16, LDS, s);
    }
    __syncthreads();

    // online softmax in log2 space; keys at or beyond len get p = 0
    {
      float x[BN / TPR];
      float mx = -kInf;
#pragma unroll
      for (int j = 0; j < BN / TPR; ++j) {
        const int c = ssub + j * TPR;
        x[j] = (k0 + c < len) ? Ss[srow * LDS + c] * sl2 : -kInf;
        mx = fmaxf(mx, x[j]);
      }
#pragma unroll
      for (int off = TPR / 2; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m_run, mx);
      const float m_use = m_new == -kInf ? 0.f : m_new;
      const float alpha = exp2f(m_run - m_use);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BN / TPR; ++j) {
        const float pj = exp2f(x[j] - m_use);
        sum += pj;
        Ps[srow * LDP + ssub + j * TPR] = from_float<T>(pj);
      }
#pragma unroll
      for (int off = TPR / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      l_run = l_run * alpha + sum;
      m_run = m_new;
      if (ssub == 0) alpha_s[srow] = alpha;
    }
    __syncthreads();

    // O = alpha * O + P V over this warp's 16 rows and DP / WN columns
    {
      typename W::Rows rows;
      W::load_rows(rows, rowid);
#pragma unroll
      for (int f = 0; f < F; ++f) {
#pragma unroll
        for (int i = 0; i < W::kElems; ++i) acc[f].x[i] *= alpha_s[wm * 16 + W::row(rows, i)];
        W::template mma<false, false>(acc[f], Ps + wm * 16 * LDP, LDP, Vs + wn * (DP / WN) + f * 16, LD, BN);
      }
    }
  }
  __syncthreads();  // all reads of Q/K/V/P done: the Q region becomes the output staging area
  if (ssub == 0) {
    alpha_s[srow] = l_run > 0.f ? 1.f / l_run : 0.f;
    if (srow < rows_q) {
      p.lse[(static_cast<int64_t>(b) * p.Hq + h) * p.Nq + q0 + srow] =
          l_run > 0.f ? (m_run + log2f(l_run)) * kLn2 : -kInf;
    }
  }
  __syncthreads();

  typename W::Rows rows;
  W::load_rows(rows, rowid);
  float* stage = reinterpret_cast<float*>(smem + C::OFF_Q) + warp * 256;
  T* ob = static_cast<T*>(p.out) + b * p.o_stride_b + (q0 + wm * 16) * p.o_stride_n + h * p.o_stride_h;
#pragma unroll
  for (int f = 0; f < F; ++f) {
    write_tile<W, T>(acc[f], rows, alpha_s + wm * 16, 1.f, stage, ob, p.o_stride_n, wm * 16, rows_q,
                     wn * (DP / WN) + f * 16, p.D);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward

// delta[b, h, i] = sum_d dO * O - dLSE: one warp per row.
template <typename T>
__global__ void __launch_bounds__(256) context_attention_bwd_delta_kernel(const ContextAttentionBwdParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int64_t total = static_cast<int64_t>(p.B) * p.Hq * p.Nq;
  if (row >= total) return;
  const int lane = threadIdx.x & 31;
  const int i = static_cast<int>(row % p.Nq);
  const int h = static_cast<int>((row / p.Nq) % p.Hq);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.Nq) * p.Hq));
  const T* o = static_cast<const T*>(p.out) + b * p.o_stride_b + i * p.o_stride_n + h * p.o_stride_h;
  const T* g = static_cast<const T*>(p.grad_out) + b * p.do_stride_b + i * p.do_stride_n + h * p.do_stride_h;
  float sum = 0.f;
  for (int d = lane; d < p.D; d += 32) sum += to_float(o[d]) * to_float(g[d]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) p.delta[row] = sum - (p.grad_lse ? p.grad_lse[row] : 0.f);
}

// Shared by dQ and dK/dV: S = Q K^T into Ss and dP = dO V^T into dPs (BM x BN, float32).
template <typename W, typename T, int BM, int BN, int DP, int LD, int LDS, int NW>
__device__ __forceinline__ void scores_and_dp(const T* Qs, const T* dOs, const T* Ks, const T* Vs, float* Ss,
                                              float* dPs, int warp) {
  constexpr int NB = (BM / 16) * (BN / 16);
  for (int blk = warp; blk < 2 * NB; blk += NW) {
    const int which = blk / NB, rest = blk % NB;
    const int bi = rest / (BN / 16), bj = rest % (BN / 16);
    typename W::Acc s;
    W::zero(s);
    if (which == 0) {
      W::template mma<false, true>(s, Qs + bi * 16 * LD, LD, Ks + bj * 16 * LD, LD, DP);
      W::store(Ss + bi * 16 * LDS + bj * 16, LDS, s);
    } else {
      W::template mma<false, true>(s, dOs + bi * 16 * LD, LD, Vs + bj * 16 * LD, LD, DP);
      W::store(dPs + bi * 16 * LDS + bj * 16, LDS, s);
    }
  }
}

// p = exp(scale * s - lse) for valid (query row, key) pairs, else 0; ds = p * (dp - delta).
__device__ __forceinline__ void prob_and_ds(float s, float dp, float sl2, float lse2, float delta, bool valid,
                                            float& pr, float& ds) {
  pr = (valid && lse2 > -kInf && lse2 < kInf) ? exp2f(s * sl2 - lse2) : 0.f;
  ds = valid ? pr * (dp - delta) : 0.f;
}

template <typename T, int DP>
__global__ void __launch_bounds__(BwdQCfg<T, DP>::NT, 1)
context_attention_bwd_dq_kernel(const ContextAttentionBwdParams p, bool vec) {
  using C = BwdQCfg<T, DP>;
  using W = typename WarpTileFor<T>::type;
  constexpr int BM = C::BM, BN = C::BN, WN = C::WN, NW = C::NW, NT = C::NT, LD = C::LD, LDS = C::LDS,
                LDP = C::LDP, F = C::F;
  extern __shared__ __align__(128) unsigned char smem[];
  float* lse_s = reinterpret_cast<float*>(smem + C::OFF_LSE);
  float* delta_s = reinterpret_cast<float*>(smem + C::OFF_DELTA);
  float* rowid = reinterpret_cast<float*>(smem + C::OFF_ROWID);
  T* Qs = reinterpret_cast<T*>(smem + C::OFF_Q);
  T* dOs = reinterpret_cast<T*>(smem + C::OFF_DO);
  T* Ks = reinterpret_cast<T*>(smem + C::OFF_K);
  T* Vs = reinterpret_cast<T*>(smem + C::OFF_V);
  float* Ss = reinterpret_cast<float*>(smem + C::OFF_S);
  float* dPs = reinterpret_cast<float*>(smem + C::OFF_DP);
  T* dSs = reinterpret_cast<T*>(smem + C::OFF_DS);

  const int tid = threadIdx.x, warp = tid >> 5, wm = warp / WN, wn = warp % WN;
  const int q0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.Hq / p.Hkv);
  const int len = clamped_len(p.ctx_lens, p.ctx_lens_int64, b, p.Nc);
  const int rows_q = min(BM, p.Nq - q0);
  const float sl2 = p.scale * kLog2e;

  const T* qb = static_cast<const T*>(p.q) + b * p.q_stride_b + q0 * p.q_stride_n + h * p.q_stride_h;
  const T* gb = static_cast<const T*>(p.grad_out) + b * p.do_stride_b + q0 * p.do_stride_n + h * p.do_stride_h;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
  const int64_t row0 = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq + q0;

  fill_row_table(rowid, NT);
  load_tile<T, BM, DP, LD, NT>(Qs, qb, p.q_stride_n, rows_q, p.D, vec);
  load_tile<T, BM, DP, LD, NT>(dOs, gb, p.do_stride_n, rows_q, p.D, vec);
  for (int r = tid; r < BM; r += NT) {
    lse_s[r] = r < rows_q ? p.lse[row0 + r] * kLog2e : kInf;
    delta_s[r] = r < rows_q ? p.delta[row0 + r] : 0.f;
  }

  typename W::Acc acc[F];
#pragma unroll
  for (int f = 0; f < F; ++f) W::zero(acc[f]);

  const int ntiles = (len + BN - 1) / BN;
  for (int t = 0; t < ntiles; ++t) {
    const int k0 = t * BN;
    __syncthreads();
    load_tile<T, BN, DP, LD, NT>(Ks, kb + k0 * p.k_stride_n, p.k_stride_n, len - k0, p.D, vec);
    load_tile<T, BN, DP, LD, NT>(Vs, vb + k0 * p.v_stride_n, p.v_stride_n, len - k0, p.D, vec);
    __syncthreads();
    scores_and_dp<W, T, BM, BN, DP, LD, LDS, NW>(Qs, dOs, Ks, Vs, Ss, dPs, warp);
    __syncthreads();
    for (int e = tid; e < BM * BN; e += NT) {
      const int r = e / BN, c = e % BN;
      float pr, ds;
      prob_and_ds(Ss[r * LDS + c], dPs[r * LDS + c], sl2, lse_s[r], delta_s[r], k0 + c < len && r < rows_q, pr, ds);
      dSs[r * LDP + c] = from_float<T>(ds);
    }
    __syncthreads();
#pragma unroll
    for (int f = 0; f < F; ++f) {
      W::template mma<false, false>(acc[f], dSs + wm * 16 * LDP, LDP, Ks + wn * (DP / WN) + f * 16, LD, BN);
    }
  }
  __syncthreads();  // the Q region becomes the staging area

  typename W::Rows rows;
  W::load_rows(rows, rowid);
  float* stage = reinterpret_cast<float*>(smem + C::OFF_Q) + warp * 256;
  T* dqb = static_cast<T*>(p.dq) + b * p.dq_stride_b + (q0 + wm * 16) * p.dq_stride_n + h * p.dq_stride_h;
#pragma unroll
  for (int f = 0; f < F; ++f) {
    write_tile<W, T>(acc[f], rows, nullptr, p.scale, stage, dqb, p.dq_stride_n, wm * 16, rows_q,
                     wn * (DP / WN) + f * 16, p.D);
  }
}

template <typename T, int DP>
__global__ void __launch_bounds__(BwdKVCfg<T, DP>::NT, 1)
context_attention_bwd_dkdv_kernel(const ContextAttentionBwdParams p, bool vec) {
  using C = BwdKVCfg<T, DP>;
  using W = typename WarpTileFor<T>::type;
  constexpr int BM = C::BM, BN = C::BN, WN = C::WN, NW = C::NW, NT = C::NT, LD = C::LD, LDS = C::LDS,
                LDP = C::LDP, F = C::F;
  extern __shared__ __align__(128) unsigned char smem[];
  float* lse_s = reinterpret_cast<float*>(smem + C::OFF_LSE);
  float* delta_s = reinterpret_cast<float*>(smem + C::OFF_DELTA);
  float* rowid = reinterpret_cast<float*>(smem + C::OFF_ROWID);
  T* Ks = reinterpret_cast<T*>(smem + C::OFF_K);
  T* Vs = reinterpret_cast<T*>(smem + C::OFF_V);
  T* Qs = reinterpret_cast<T*>(smem + C::OFF_Q);
  T* dOs = reinterpret_cast<T*>(smem + C::OFF_DO);
  float* Ss = reinterpret_cast<float*>(smem + C::OFF_S);
  float* dPs = reinterpret_cast<float*>(smem + C::OFF_DP);
  T* Ps = reinterpret_cast<T*>(smem + C::OFF_P);
  T* dSs = reinterpret_cast<T*>(smem + C::OFF_DS);

  const int tid = threadIdx.x, warp = tid >> 5, wm = warp / WN, wn = warp % WN;
  const int k0 = blockIdx.x * BN, hk = blockIdx.y, b = blockIdx.z;
  const int group = p.Hq / p.Hkv;
  const int len = clamped_len(p.ctx_lens, p.ctx_lens_int64, b, p.Nc);
  const int rows_k = min(BN, p.Nc - k0);
  const float sl2 = p.scale * kLog2e;

  T* dkb = static_cast<T*>(p.dk) + b * p.dk_stride_b + k0 * p.dk_stride_n + hk * p.dk_stride_h;
  T* dvb = static_cast<T*>(p.dv) + b * p.dv_stride_b + k0 * p.dv_stride_n + hk * p.dv_stride_h;

  if (k0 >= len) {  // keys that do not exist: zero gradients, nothing to read
    for (int e = tid; e < rows_k * p.D; e += NT) {
      const int r = e / p.D, c = e % p.D;
      dkb[r * p.dk_stride_n + c] = from_float<T>(0.f);
      dvb[r * p.dv_stride_n + c] = from_float<T>(0.f);
    }
    return;
  }

  const T* kb = static_cast<const T*>(p.k) + b * p.k_stride_b + k0 * p.k_stride_n + hk * p.k_stride_h;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_stride_b + k0 * p.v_stride_n + hk * p.v_stride_h;
  fill_row_table(rowid, NT);
  load_tile<T, BN, DP, LD, NT>(Ks, kb, p.k_stride_n, len - k0, p.D, vec);
  load_tile<T, BN, DP, LD, NT>(Vs, vb, p.v_stride_n, len - k0, p.D, vec);

  typename W::Acc acc_k[F], acc_v[F];
#pragma unroll
  for (int f = 0; f < F; ++f) {
    W::zero(acc_k[f]);
    W::zero(acc_v[f]);
  }

  for (int g = 0; g < group; ++g) {
    const int h = hk * group + g;
    for (int q0 = 0; q0 < p.Nq; q0 += BM) {
      const int rows_q = min(BM, p.Nq - q0);
      const int64_t row0 = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq + q0;
      const T* qb = static_cast<const T*>(p.q) + b * p.q_stride_b + q0 * p.q_stride_n + h * p.q_stride_h;
      const T* gb =
          static_cast<const T*>(p.grad_out) + b * p.do_stride_b + q0 * p.do_stride_n + h * p.do_stride_h;
      __syncthreads();  // previous step's readers of Q, dO, P, dS, lse_s, delta_s are done
      load_tile<T, BM, DP, LD, NT>(Qs, qb, p.q_stride_n, rows_q, p.D, vec);
      load_tile<T, BM, DP, LD, NT>(dOs, gb, p.do_stride_n, rows_q, p.D, vec);
      for (int r = tid; r < BM; r += NT) {
        lse_s[r] = r < rows_q ? p.lse[row0 + r] * kLog2e : kInf;
        delta_s[r] = r < rows_q ? p.delta[row0 + r] : 0.f;
      }
      __syncthreads();
      scores_and_dp<W, T, BM, BN, DP, LD, LDS, NW>(Qs, dOs, Ks, Vs, Ss, dPs, warp);
      __syncthreads();
      for (int e = tid; e < BM * BN; e += NT) {
        const int r = e / BN, c = e % BN;
        float pr, ds;
        prob_and_ds(Ss[r * LDS + c], dPs[r * LDS + c], sl2, lse_s[r], delta_s[r], k0 + c < len && r < rows_q, pr,
                    ds);
        Ps[r * LDP + c] = from_float<T>(pr);
        dSs[r * LDP + c] = from_float<T>(ds);
      }
      __syncthreads();
      // dV += P^T dO, dK += dS^T Q over this warp's 16 keys and DP / WN columns
#pragma unroll
      for (int f = 0; f < F; ++f) {
        const int col = wn * (DP / WN) + f * 16;
        W::template mma<true, false>(acc_v[f], Ps + wm * 16, LDP, dOs + col, LD, BM);
        W::template mma<true, false>(acc_k[f], dSs + wm * 16, LDP, Qs + col, LD, BM);
      }
    }
  }
  __syncthreads();  // the K region becomes the staging area

  typename W::Rows rows;
  W::load_rows(rows, rowid);
  float* stage = reinterpret_cast<float*>(smem + C::OFF_K) + warp * 256;
#pragma unroll
  for (int f = 0; f < F; ++f) {
    const int col = wn * (DP / WN) + f * 16;
    write_tile<W, T>(acc_k[f], rows, nullptr, p.scale, stage, dkb + wm * 16 * p.dk_stride_n, p.dk_stride_n, wm * 16,
                     rows_k, col, p.D);
    write_tile<W, T>(acc_v[f], rows, nullptr, 1.f, stage, dvb + wm * 16 * p.dv_stride_n, p.dv_stride_n, wm * 16,
                     rows_k, col, p.D);
  }
}

// ------------------------------------------------------------------------------------------------
// Host launchers

bool aligned16(const void* ptr, int64_t s0, int64_t s1, int64_t s2, int elem) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (s0 * elem) % 16 == 0 && (s1 * elem) % 16 == 0 &&
         (s2 * elem) % 16 == 0;
}

template <typename K>
void set_smem(K kernel, int bytes) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T, int DP>
void fwd_run(const ContextAttentionParams& p, cudaStream_t stream) {
  using C = FwdCfg<T, DP>;
  const int e = sizeof(T);
  const bool vec = aligned16(p.q, p.q_stride_b, p.q_stride_n, p.q_stride_h, e) &&
                   aligned16(p.k, p.k_stride_b, p.k_stride_n, p.k_stride_h, e) &&
                   aligned16(p.v, p.v_stride_b, p.v_stride_n, p.v_stride_h, e);
  auto kernel = context_attention_fwd_kernel<T, DP>;
  set_smem(kernel, C::SMEM);
  const dim3 grid((p.Nq + C::BM - 1) / C::BM, p.Hq, p.B);
  kernel<<<grid, C::NT, C::SMEM, stream>>>(p, vec);
}

template <typename T, int DP>
void bwd_run(const ContextAttentionBwdParams& p, cudaStream_t stream) {
  using CQ = BwdQCfg<T, DP>;
  using CK = BwdKVCfg<T, DP>;
  const int e = sizeof(T);
  const bool vec = aligned16(p.q, p.q_stride_b, p.q_stride_n, p.q_stride_h, e) &&
                   aligned16(p.k, p.k_stride_b, p.k_stride_n, p.k_stride_h, e) &&
                   aligned16(p.v, p.v_stride_b, p.v_stride_n, p.v_stride_h, e) &&
                   aligned16(p.grad_out, p.do_stride_b, p.do_stride_n, p.do_stride_h, e);
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Nq;
  context_attention_bwd_delta_kernel<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(p);

  auto dq_kernel = context_attention_bwd_dq_kernel<T, DP>;
  set_smem(dq_kernel, CQ::SMEM);
  dq_kernel<<<dim3((p.Nq + CQ::BM - 1) / CQ::BM, p.Hq, p.B), CQ::NT, CQ::SMEM, stream>>>(p, vec);

  auto kv_kernel = context_attention_bwd_dkdv_kernel<T, DP>;
  set_smem(kv_kernel, CK::SMEM);
  kv_kernel<<<dim3((p.Nc + CK::BN - 1) / CK::BN, p.Hkv, p.B), CK::NT, CK::SMEM, stream>>>(p, vec);
}

template <typename T, typename P>
void by_head_dim(const P& p, cudaStream_t stream, void (*run64)(const P&, cudaStream_t),
                 void (*run128)(const P&, cudaStream_t), void (*run256)(const P&, cudaStream_t)) {
  if (p.D <= 64) run64(p, stream);
  else if (p.D <= 128) run128(p, stream);
  else run256(p, stream);
}

template <typename T>
void fwd_dtype(const ContextAttentionParams& p, cudaStream_t s) {
  by_head_dim<T>(p, s, fwd_run<T, 64>, fwd_run<T, 128>, fwd_run<T, 256>);
}

template <typename T>
void bwd_dtype(const ContextAttentionBwdParams& p, cudaStream_t s) {
  by_head_dim<T>(p, s, bwd_run<T, 64>, bwd_run<T, 128>, bwd_run<T, 256>);
}

}  // namespace

void launch_context_attention_fwd(const ContextAttentionParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: fwd_dtype<float>(p, stream); break;
    case DType::kFloat16: fwd_dtype<__half>(p, stream); break;
    case DType::kBFloat16: fwd_dtype<__nv_bfloat16>(p, stream); break;
  }
}

void launch_context_attention_bwd(const ContextAttentionBwdParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: bwd_dtype<float>(p, stream); break;
    case DType::kFloat16: bwd_dtype<__half>(p, stream); break;
    case DType::kBFloat16: bwd_dtype<__nv_bfloat16>(p, stream); break;
  }
}

}  // namespace latte
